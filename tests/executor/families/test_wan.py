"""The Wan family (executor/families/wan.py) on the tiny Wan 2.1 and Wan 2.2 (two experts) pipelines.

One process group of 2 ranks (wan_worker.py) runs, each against the one-process run: on tiny-wan2.1
PipeFusion 2 with warmup = steps and with stale K/V, and one-stage patches under Ulysses, Ring and
CFG (CFG 2, DP 2, Ulysses 2, Ring 2 and their 4-rank hybrids: tests/executor/test_parallel_pipelines.py);
on tiny-wan2.2, whose boundary falls inside the steps, Ulysses 2, Ring 2, CFG 2, PipeFusion 2 with
warmup = steps and with warmup 1 (each expert's first step whole, then stale K/V of its own); and
the refusals. Then `ditplan run` on 2 ranks and the cost model's reading of the tiny profiles.
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
from wan_worker import EXPERT_STEP_COUNTS, PLANS  # noqa: E402

LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # one 8-bit level


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("wan2")
    with recorded_communication(folder / "communication"):
        outcomes = run_ranks(HERE / "wan_worker.py", 2, [str(folder)], deadline_s=420)
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
@pytest.mark.parametrize("where, words", [("plan", "3 token rows"), ("transformer", "15 video tokens do not divide over ulysses=2")])
def test_tokens_that_do_not_split_are_refused_alike_in_words(two_ranks, where, words):
    # The plan is refused by the cost model's rule before anything runs; a transformer called
    # directly (a model without a profile) is refused by the sequence-parallel hooks.
    messages = [two_ranks[rank][f"refusal|{where}"] for rank in (0, 1)]
    assert all("message" in m for m in messages), messages
    assert messages[0]["message"] == messages[1]["message"]
    assert words in messages[0]["message"]


@pytest.mark.timeout(480)
def test_every_plan_follows_nccl_rules(two_ranks):
    assert_follows_nccl_rules(two_ranks["folder"] / "communication")


@pytest.mark.timeout(480)
@pytest.mark.parametrize("what, words", [("two experts", "no transformer_2"), ("expand_timesteps", "expand_timesteps"),
                                         ("guidance_scale_2", "one transformer"),
                                         ("vae strips", "VAE decoder cannot run in row strips")])
def test_what_the_executor_cannot_run_is_refused_in_words(two_ranks, what, words):
    # A boundary without its low-noise expert, TI2V (a timestep per token), a second guidance scale
    # without a second expert, a decode in row strips.
    message = two_ranks[0][f"refusal|{what}"]
    assert words in message.get("message", ""), message


@pytest.mark.timeout(300)
def test_ditplan_run_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    # Two experts cut into two stages; 4 steps cross the boundary (2 per expert).
    result = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-wan2.2", "--plan", "pipefusion=2,warmup=1", "--nproc", "2",
         "--steps", "4", "--guidance-scale-2", "3.0", "--seed", "3", "--prompt", "a cat", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and "pipefusion=2" in record["config"]
    assert len(record["files"]) == 5 and all((out / name).is_file() for name in record["files"])  # one video of 5 frames


@pytest.mark.parametrize("model, config", [("tiny-wan2.1", "ulysses=2"), ("tiny-wan2.2", "pipefusion=2,warmup=1")])
def test_the_cost_model_reads_the_tiny_profile(capsys, model, config):
    from planner.cli import main

    assert main(["simulate", "--model", model, "--cluster", "l40-pcie-8", "--config", config]) == 0
    assert model in capsys.readouterr().out


@pytest.mark.timeout(480)
def test_the_cost_model_places_the_boundary_where_the_pipeline_does(two_ranks):
    # The executor's expert of each step (the pipeline's rule on its scheduler's timesteps) is the
    # cost model's, at any step count; tiny-wan2.2's 4 default steps cross the boundary.
    from costmodel.specs import load_model

    spec = load_model("tiny-wan2.2")
    assert spec.experts == 2 and spec.step_experts(spec.default_steps) == (0, 0, 1, 1)
    executor = two_ranks[0]["experts|tiny-wan2.2"]
    assert set(executor) == {str(steps) for steps in EXPERT_STEP_COUNTS}
    for steps, experts in executor.items():
        assert tuple(experts) == spec.step_experts(int(steps)), steps
