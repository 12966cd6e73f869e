"""The HunyuanVideo family (executor/families/hunyuan_video.py) on the tiny HunyuanVideo pipeline.

One process group of 2 ranks (hunyuan_video_worker.py) runs Ulysses 2, Ring 2, PipeFusion 2 with
warmup = steps and with stale K/V, and one-stage patches under Ulysses, Ring and DP, each against
the one-process run, with prompts whose text is mostly padding under the mask (and more patches than
text tokens, alone and under Ring); then the refusals (CFG 2 for a model with embedded guidance, a
row-strip decode, prompts that keep different text lengths). Then `ditplan run` on 2 ranks, the cost
model's reading of the tiny profile, and the tiny tokenizer's crop of the prompt template.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from executor_spawn import assert_follows_nccl_rules, recorded_communication, run_ranks  # noqa: E402
from hunyuan_video_worker import PLANS  # noqa: E402

LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # one 8-bit level


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("hunyuan_video2")
    with recorded_communication(folder / "communication"):
        outcomes = run_ranks(HERE / "hunyuan_video_worker.py", 2, [str(folder)], deadline_s=420)
    for rank, (code, output) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited with {code}:\n{output[-4000:]}"
    return {"folder": folder, **{rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("plan", PLANS)
def test_two_rank_plan_matches_the_one_process_run(two_ranks, plan):
    results = two_ranks[0]
    assert plan in results, f"{plan} was not run (an earlier check broke the process group?)"
    entry = results[plan]
    assert "error" not in entry, f"{plan}: {entry['error']}\n{entry.get('trace', '')}"
    assert entry["latent_diff"] <= LATENT_TOLERANCE, f"{plan}: latents differ by {entry['latent_diff']:.3g}"
    assert entry["pixel_diff"] <= PIXEL_TOLERANCE, f"{plan}: 8-bit frames differ by {entry['pixel_diff']} levels"


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
    messages = [two_ranks[rank][f"refusal|{what}"] for rank in (0, 1)]
    assert all("message" in m for m in messages), messages
    assert messages[0]["message"] == messages[1]["message"]
    assert words in messages[0]["message"]


@pytest.mark.timeout(300)
def test_ditplan_run_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-hunyuan-video", "--plan", "ring=2", "--nproc", "2",
         "--steps", "2", "--seed", "3", "--prompt", "a red car", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and "ring=2" in record["config"]
    assert len(record["files"]) == 5 and all((out / name).is_file() for name in record["files"])  # one video of 5 frames


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
