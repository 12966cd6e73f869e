"""CFG, data and sequence parallel pipelines against the serial loop, per family.

Two process groups do every check: one of 2 ranks (CFG 2, DP 2, Ulysses 2, Ring 2 for every executor
family, and a refusal), one of 4 ranks (CFG 2 x DP 2, CFG 2 x Ulysses 2, USP 2x2 for every family; Ring 4
and Ulysses 4 on PixArt and Flux). Same seed, two prompts, three steps, fp32 on CPU with gloo.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from executor_spawn import assert_follows_nccl_rules, recorded_communication, run_ranks  # noqa: E402
from parallel_worker import configs_for  # noqa: E402

from executor.families import FAMILIES  # noqa: E402

WORKER = HERE / "parallel_worker.py"
LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # one 8-bit level


def _run(world: int, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp(f"world{world}")
    with recorded_communication(folder / "communication"):
        outcomes = run_ranks(WORKER, world, [str(world), str(folder)], deadline_s=420)
    for rank, (code, output) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited with {code}:\n{output[-4000:]}"
    return {"folder": folder, **{rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)}}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run(4, tmp_path_factory)


def _expected(world: int) -> list[str]:
    return [f"{family}|{config}" for family in FAMILIES for config in configs_for(world, family)]


def _assert_matches(results: dict, name: str) -> None:
    assert name in results, f"{name} was not run (an earlier check broke the process group?)"
    entry = results[name]
    assert "error" not in entry, f"{name}: {entry['error']}\n{entry.get('trace', '')}"
    assert entry["latent_diff"] <= LATENT_TOLERANCE, f"{name}: latents differ by {entry['latent_diff']:.3g} (scale {entry['latent_scale']:.3g})"
    assert entry["pixel_diff"] <= PIXEL_TOLERANCE, f"{name}: 8-bit images differ by {entry['pixel_diff']} levels"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", _expected(2))
def test_two_rank_plan_matches_serial(world2, name):
    _assert_matches(world2[0], name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", _expected(4))
def test_four_rank_plan_matches_serial(world4, name):
    _assert_matches(world4[0], name)


@pytest.mark.timeout(600)
def test_impossible_plan_is_refused_alike_on_every_rank(world2):
    messages = [world2[rank]["refusal|flux cfg=2"] for rank in (0, 1)]
    assert all("message" in m for m in messages), messages
    assert messages[0]["message"] == messages[1]["message"]
    assert "cfg=2" in messages[0]["message"] and "classifier-free guidance" in messages[0]["message"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_every_plan_follows_nccl_rules(world, request):
    """Every configuration both worlds ran (CFG, DP, Ulysses, Ring, USP and their hybrids, refusals
    included) replays under NCCL's rules without blocking or mismatching."""
    results = request.getfixturevalue(f"world{world}")
    assert_follows_nccl_rules(results["folder"] / "communication")
