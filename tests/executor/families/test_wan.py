"""The Wan family (executor/families/wan.py) on the tiny Wan 2.1 and Wan 2.2 (two experts) pipelines.

One process group of 2 ranks (wan_worker.py) runs, each against the one-process run: on tiny-wan2.1
PipeFusion 2 with warmup = steps and with stale K/V, and one-stage patches under Ulysses, Ring and
CFG (CFG 2, DP 2, Ulysses 2, Ring 2 and their 4-rank hybrids: tests/executor/test_parallel_pipelines.py);
on tiny-wan2.2, whose boundary falls inside the steps, Ulysses 2, Ring 2, CFG 2, PipeFusion 2 with
warmup = steps and with warmup 1 (each expert's first step whole, then stale K/V of its own); and
the refusals. Then `ditplan run` on 2 ranks and the cost model's reading of the tiny profiles.
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
    assert_matches_one_process,
    assert_refused_alike,
    ditplan_run_on_two_ranks,
    spawn_pair,
)
from wan_worker import EXPERT_STEP_COUNTS, PLANS  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return spawn_pair(HERE / "wan_worker.py", tmp_path_factory.mktemp("wan2"))


@pytest.mark.timeout(480)
@pytest.mark.parametrize("plan", PLANS)
def test_two_rank_plan_matches_the_one_process_run(two_ranks, plan):
    assert_matches_one_process(two_ranks[0], plan)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("where, words", [("plan", "3 token rows"), ("transformer", "15 video tokens do not divide over ulysses=2")])
def test_tokens_that_do_not_split_are_refused_alike_in_words(two_ranks, where, words):
    # The plan is refused by the cost model's rule before anything runs; a transformer called
    # directly (a model without a profile) is refused by the sequence-parallel hooks.
    assert_refused_alike(two_ranks, where, words)


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
    # Two experts cut into two stages; 4 steps cross the boundary (2 per expert).
    record = ditplan_run_on_two_ranks(tmp_path / "run", "tiny-wan2.2", "pipefusion=2,warmup=1", "--steps", "4",
                                      "--guidance-scale-2", "3.0")
    assert "pipefusion=2" in record["config"] and len(record["files"]) == 5  # one video of 5 frames


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
