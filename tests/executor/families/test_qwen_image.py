"""Qwen-Image in the executor: the tiny model's text template, the guidance arithmetic, PipeFusion
(alone, with Ulysses, with CFG halves) on two ranks against the one-process loop and what it
refuses, `ditplan run`, and the cost model reading the tiny YAML. The serial loop against the
pipeline's own call, the YAML's figures, CFG, data and sequence parallelism run with every family's
tiny model (tests/executor/test_serial_loop.py, test_tiny_pipelines.py, test_parallel_pipelines.py,
test_families.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from executor_spawn import assert_follows_nccl_rules, recorded_communication, run_ranks  # noqa: E402
from qwen_image_worker import CHECKS, REFUSED, name_of  # noqa: E402

LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # one 8-bit level


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
    folder = tmp_path_factory.mktemp("qwen-image")
    with recorded_communication(folder / "communication"):
        outcomes = run_ranks(HERE / "qwen_image_worker.py", 2, [str(folder)], deadline_s=420)
    for rank, (code, output) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited with {code}:\n{output[-4000:]}"
    return {"folder": folder, **{rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)}}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [name_of(plan, guidance) for plan, guidance, _ in CHECKS])
def test_two_rank_plan_matches_the_one_process_loop(two_ranks, name):
    results = two_ranks[0]
    assert name in results, f"{name} was not run (an earlier check broke the process group?)"
    entry = results[name]
    assert "error" not in entry, f"{name}: {entry['error']}\n{entry.get('trace', '')}"
    assert entry["latent_diff"] <= LATENT_TOLERANCE, f"{name}: latents differ by {entry['latent_diff']:.3g} (scale {entry['latent_scale']:.3g})"
    assert entry["pixel_diff"] <= PIXEL_TOLERANCE, f"{name}: 8-bit images differ by {entry['pixel_diff']} levels"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("plan, words", list(zip(REFUSED, [("different token lengths", "cfg=2"), ("row strips", "vae=1")])))
def test_what_cannot_run_is_refused_alike_on_both_ranks(two_ranks, plan, words):
    messages = [two_ranks[rank][f"refusal|{plan}"] for rank in (0, 1)]
    assert all("message" in m for m in messages), messages
    assert messages[0] == messages[1]
    assert all(word in messages[0]["message"] for word in words), messages[0]


@pytest.mark.timeout(600)
def test_every_plan_follows_nccl_rules(two_ranks):
    assert_follows_nccl_rules(two_ranks["folder"] / "communication")


@pytest.mark.timeout(300)
def test_ditplan_run_with_ulysses_2(tmp_path):
    args = ["--model", "tiny-qwen-image", "--plan", "ulysses=2", "--nproc", "2", "--steps", "2", "--height", "128",
            "--width", "128", "--prompt", "a cat", "--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-m", "planner", "run", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "ulysses=2" in record["config"] and record["files"] == ["image-000.png"]
    assert (tmp_path / "out" / "image-000.png").is_file()


def test_the_cost_model_reads_the_tiny_yaml(capsys):
    from planner.cli import main

    code = main(["simulate", "--model", "tiny-qwen-image", "--cluster", "l40-pcie-8", "--gpus", "2", "--config", "ulysses=2",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["latency_s"] > 0
