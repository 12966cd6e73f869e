"""Transformer-level proof of sequence parallelism: for each executor family, its tiny random
transformer (`Family.tiny_transformer`) run with Ulysses 2, Ring 2 (one spawn of 2 ranks) and USP 2x2, Ring 4, Ulysses 4 (one spawn
of 4 ranks) matches the serial call on every rank within 1e-5 (fp32, CPU, gloo).

Each spawn runs all its checks (sp_worker.py) and reports them per check, so one family's failure
shows as that family's test failing; a rank that dies or hangs fails every test of its spawn, with
the ranks' output, within the launcher's deadline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor.comm_trace import TRACE_ENV
from executor.families import FAMILIES
from executor.nccl_rules import check

WORKER = Path(__file__).resolve().parent / "sp_worker.py"
COMMUNICATION: dict[int, Path] = {}  # world size -> the folder of its ranks' recorded calls
TOLERANCE = 1e-5
DEADLINE_S = 400  # both spawns on a 2-core machine take about a minute each


def run_ranks(world: int, workdir: Path) -> list[dict[str, object]]:
    """Start `world` worker processes and return each rank's results; kill them all if one fails or time runs out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", TRACE_ENV: str(workdir / "communication")}
    COMMUNICATION[world] = workdir / "communication"
    init_file = workdir / "init"
    processes = []
    for rank in range(world):
        log = open(workdir / f"rank{rank}.log", "w")
        command = [sys.executable, str(WORKER), str(rank), str(world), str(init_file), str(workdir / f"result{rank}.json")]
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + DEADLINE_S
    failed_at = None
    while any(p.poll() is None for p, _ in processes):
        if any(p.poll() not in (None, 0) for p, _ in processes) and failed_at is None:
            failed_at = time.monotonic()  # give the others a moment to report their side, then stop them
        if time.monotonic() > deadline or (failed_at is not None and time.monotonic() > failed_at + 15):
            break
        time.sleep(0.2)
    for process, log in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()
    logs = "\n".join(f"--- rank {rank} (exit {p.returncode}) ---\n{(workdir / f'rank{rank}.log').read_text()[-3000:]}" for rank, (p, _) in enumerate(processes))
    if any(p.returncode != 0 for p, _ in processes):
        raise AssertionError(f"SP worker ranks failed or timed out:\n{logs}")
    return [json.loads((workdir / f"result{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, object]]:
    return run_ranks(2, tmp_path_factory.mktemp("sp2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict[str, object]]:
    return run_ranks(4, tmp_path_factory.mktemp("sp4"))


def assert_close_on_every_rank(results: list[dict[str, object]], check: str) -> None:
    for rank, result in enumerate(results):
        value = result.get(check, "missing: the worker never reached this check")
        assert isinstance(value, float), f"rank {rank}, {check}: {value}"
        assert value <= TOLERANCE, f"rank {rank}, {check}: max abs diff {value:.3g} > {TOLERANCE}"


@pytest.mark.timeout(DEADLINE_S + 60)
@pytest.mark.parametrize("family", [*FAMILIES, "primitive"])
@pytest.mark.parametrize("layout", ["ulysses=2,ring=1", "ulysses=1,ring=2"])
def test_two_rank_layouts_match_serial(two_ranks, family, layout):
    assert_close_on_every_rank(two_ranks, f"{family}/{layout}")


@pytest.mark.timeout(DEADLINE_S + 60)
@pytest.mark.parametrize("family", [*FAMILIES, "primitive"])
@pytest.mark.parametrize("layout", ["ulysses=2,ring=2", "ulysses=1,ring=4", "ulysses=4,ring=1"])
def test_four_rank_layouts_match_serial(four_ranks, family, layout):
    assert_close_on_every_rank(four_ranks, f"{family}/{layout}")


@pytest.mark.timeout(DEADLINE_S + 60)
def test_flux_text_is_split_where_it_divides_and_whole_where_it_does_not(two_ranks, four_ranks):
    # Six text tokens: three per rank over 2 ranks; over 4 they do not divide and stay whole.
    for results, layouts, expected in ((two_ranks, ["ulysses=2,ring=1", "ulysses=1,ring=2"], [True, 3]),
                                       (four_ranks, ["ulysses=2,ring=2", "ulysses=1,ring=4", "ulysses=4,ring=1"], [False, 6])):
        for layout in layouts:
            for rank, result in enumerate(results):
                assert result[f"flux/{layout}/text"] == expected, f"rank {rank}, {layout}: {result[f'flux/{layout}/text']}"


@pytest.mark.timeout(DEADLINE_S + 60)
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_serial_transformer(two_ranks, four_ranks, family):
    for results in (two_ranks, four_ranks):
        for rank, result in enumerate(results):
            assert result[f"{family}/removed"] == 0.0, f"rank {rank}: after handle.remove(): {result[f'{family}/removed']}"


@pytest.mark.timeout(DEADLINE_S + 60)
@pytest.mark.parametrize(
    "check, words",
    [
        ("refuse/tokens", ["9 image tokens", "ulysses=2", "multiple of"]),
        ("refuse/heads", ["3 heads", "ulysses=2", "heads % ulysses"]),
        ("refuse/shapes", ["hidden_states: rank 0 [2, 16, 16], rank 1 [2, 36, 16]"]),
        ("refuse/twice", ["already enabled", "remove()"]),
    ],
)
def test_sizes_that_do_not_fit_are_refused_on_every_rank(two_ranks, check, words):
    for rank, result in enumerate(two_ranks):
        message = result[check]
        assert isinstance(message, str) and message.startswith("DitplanError: "), f"rank {rank}, {check}: {message}"
        for word in words:
            assert word in message, f"rank {rank}, {check}: {word!r} not in {message!r}"


@pytest.mark.timeout(DEADLINE_S + 60)
def test_every_layout_follows_nccl_rules(two_ranks, four_ranks):
    """Ulysses, Ring, USP on every family replay under NCCL's rules without blocking or mismatching."""
    for world in (2, 4):
        findings = check(COMMUNICATION[world])
        assert not findings, "\n".join(findings[:5])
