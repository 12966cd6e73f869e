"""Qwen-Image in the executor: the tiny model's text template, the guidance arithmetic, PipeFusion
(alone, with Ulysses, with CFG halves) on two ranks against the one-process loop and what it
refuses, `ditplan run`, and the cost model reading the tiny YAML. The serial loop against the
pipeline's own call, the YAML's figures, CFG, data and sequence parallelism run with every family's
tiny model (tests/executor/test_serial_loop.py, test_tiny_pipelines.py, test_parallel_pipelines.py,
test_families.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from executor_spawn import assert_follows_nccl_rules  # noqa: E402
from qwen_image_worker import PLANS_WITH_CFG, PLANS_WITHOUT_CFG, REFUSED, without_cfg  # noqa: E402
from two_rank_checks import (  # noqa: E402
    assert_matches_one_process,
    assert_refused_alike,
    ditplan_run_on_two_ranks,
    spawn_pair,
)


@pytest.fixture(scope="module")
def pipe():
    from executor.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    return build_tiny_pipeline("tiny-qwen-image")


@pytest.mark.timeout(120)
def test_the_template_prefix_the_pipeline_drops_is_exactly_the_system_part(pipe):
    # The pipeline drops a fixed number of leading tokens after encoding: with the tiny vocabulary
    # that must be the template's system part, to the token, as with Qwen's own.
    template = pipe.prompt_template_encode
    prefix = template[: template.index("{}")]
    ids = pipe.tokenizer(prefix).input_ids
    assert len(ids) == pipe.prompt_template_encode_start_idx
    embeds, mask = pipe.encode_prompt(["a photo of a cat"], device=torch.device("cpu"))
    # "a photo of a cat" then "<|im_end|>", newline, "<|im_start|>", "assistant", newline.
    assert embeds.shape[1] == 5 + 5 and mask is None


@pytest.mark.timeout(120)
def test_guidance_keeps_the_conditional_norm_per_token(pipe):
    from executor.families import GenerationRequest, adapter_for

    adapter = adapter_for(pipe)
    job = adapter.prepare(GenerationRequest(prompts=["a cat"], num_inference_steps=2, generators=[torch.Generator().manual_seed(0)]))
    assert job.do_cfg and job.guidance_scale == 4.0  # the pipeline's true_cfg_scale
    assert job.branch_inputs["uncond"]["encoder_hidden_states"].shape[1] == 5  # "" in the template
    generator = torch.Generator().manual_seed(1)
    uncond, cond = torch.randn(2, 1, 16, 64, generator=generator)
    guided = adapter.combine_guidance(job, uncond, cond, 0, job.timesteps[0])
    assert torch.allclose(guided.norm(dim=-1), cond.norm(dim=-1), rtol=1e-5)
    plain = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(torch.nn.functional.normalize(guided, dim=-1), torch.nn.functional.normalize(plain, dim=-1), atol=1e-6)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_pair(HERE / "qwen_image_worker.py", tmp_path_factory.mktemp("qwen-image"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [*map(without_cfg, PLANS_WITHOUT_CFG), *PLANS_WITH_CFG])
def test_two_rank_plan_matches_the_one_process_loop(two_ranks, name):
    assert_matches_one_process(two_ranks[0], name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("plan, words", list(zip(REFUSED, [("different token lengths", "cfg=2"), ("row strips", "vae=1")])))
def test_what_cannot_run_is_refused_alike_on_both_ranks(two_ranks, plan, words):
    for word in words:
        assert_refused_alike(two_ranks, plan, word)


@pytest.mark.timeout(600)
def test_every_plan_follows_nccl_rules(two_ranks):
    assert_follows_nccl_rules(two_ranks["folder"] / "communication")


@pytest.mark.timeout(300)
def test_ditplan_run_with_ulysses_2(tmp_path):
    record = ditplan_run_on_two_ranks(tmp_path / "out", "tiny-qwen-image", "ulysses=2", "--steps", "2", "--height", "128",
                                      "--width", "128")
    assert "ulysses=2" in record["config"] and record["files"] == ["image-000.png"]


def test_the_cost_model_reads_the_tiny_yaml(capsys):
    from planner.cli import main

    code = main(["simulate", "--model", "tiny-qwen-image", "--cluster", "l40-pcie-8", "--gpus", "2", "--config", "ulysses=2",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["latency_s"] > 0
