"""The HunyuanVideo family (executor/families/hunyuan_video.py) on the tiny HunyuanVideo pipeline.

One process group of 2 ranks (hunyuan_video_worker.py) runs Ulysses 2, Ring 2, PipeFusion 2 with
warmup = steps and with stale K/V, and one-stage patches under Ulysses, Ring and DP, each against
the one-process run, with prompts whose text is mostly padding under the mask (and more patches than
text tokens, alone and under Ring); then the refusals (CFG 2 for a model with embedded guidance, a
row-strip decode, prompts that keep different text lengths). Then `ditplan run` on 2 ranks, the cost
model's reading of the tiny profile, and the tiny tokenizer's crop of the prompt template.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from executor_spawn import assert_follows_nccl_rules  # noqa: E402
from two_rank_checks import (  # noqa: E402
    LATENT_TOLERANCE,
    assert_matches_one_process,
    assert_refused_alike,
    ditplan_run_on_two_ranks,
    spawn_pair,
)
from hunyuan_video_worker import PLANS  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return spawn_pair(HERE / "hunyuan_video_worker.py", tmp_path_factory.mktemp("hunyuan_video2"))


@pytest.mark.timeout(480)
@pytest.mark.parametrize("plan", PLANS)
def test_two_rank_plan_matches_the_one_process_run(two_ranks, plan):
    assert_matches_one_process(two_ranks[0], plan)


@pytest.mark.timeout(480)
def test_the_padding_mask_matters_at_the_tolerance(two_ranks):
    # Unmasked padding would move one transformer call far beyond the latent tolerance, so the plans
    # above could not pass with a padded key leaking into their attention.
    assert two_ranks[0]["padding effect"]["value"] > 100 * LATENT_TOLERANCE


@pytest.mark.timeout(480)
def test_every_plan_follows_nccl_rules(two_ranks):
    assert_follows_nccl_rules(two_ranks["folder"] / "communication")


@pytest.mark.timeout(480)
@pytest.mark.parametrize("what, words", [
    ("cfg", "does not use classifier-free guidance"),
    ("vae strips", "VAE decoder cannot run in row strips"),
    ("mixed lengths", "keep different numbers of text tokens"),
])
def test_what_the_executor_cannot_run_is_refused_alike_in_words(two_ranks, what, words):
    assert_refused_alike(two_ranks, what, words)


@pytest.mark.timeout(300)
def test_ditplan_run_on_two_ranks(tmp_path):
    record = ditplan_run_on_two_ranks(tmp_path / "run", "tiny-hunyuan-video", "ring=2", "--steps", "2")
    assert "ring=2" in record["config"] and len(record["files"]) == 5  # one video of 5 frames


def test_the_cost_model_reads_the_tiny_profile(capsys):
    from planner.cli import main

    assert main(["simulate", "--model", "tiny-hunyuan-video", "--cluster", "l40-pcie-8", "--config", "ulysses=2"]) == 0
    assert "tiny-hunyuan-video" in capsys.readouterr().out


def test_the_tiny_tokenizer_crops_the_prompt_template_where_the_pipeline_does():
    # The pipeline drops the first crop_start tokens of the encoded template: with the tiny
    # tokenizer they are exactly the template's part before the prompt, so the prompt's tokens stay.
    import inspect

    from executor.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-hunyuan-video")
    template = inspect.signature(pipe.__call__).parameters["prompt_template"].default
    before, _ = template["template"].split("{}")
    assert len(pipe.tokenizer(before).input_ids) == template["crop_start"]
    _, _, mask = pipe.encode_prompt(prompt="a photo of a cat")
    assert int(mask.sum()) == 6  # a, photo, of, a, cat and the template's closing token
    assert pipe.tokenizer.padding_side == "right"  # padding at the end, where the transformer's key mask expects it
