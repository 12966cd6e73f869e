"""Start N ranks of a test worker script as torchrun would (RANK, WORLD_SIZE, MASTER_* set), with a deadline.

A worker that hangs or fails must surface: on the deadline every rank is killed and the caller
gets the exit codes (None for killed) and the output of each rank.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from costmodel.profiler.comm_bench import free_port


def run_ranks(script: Path, world: int, args: list[str], deadline_s: float, extra_env: dict[str, str] | None = None):
    """Run `python script ARGS` as `world` ranks; returns [(exit code or None, stdout+stderr), ...]."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "DITPLAN_COLLECTIVE_TIMEOUT_S": "120", **(extra_env or {})}
        processes.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    end = time.monotonic() + deadline_s
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(end - time.monotonic(), 0.1))
            results.append((process.returncode, output))
        except subprocess.TimeoutExpired:
            results.append((None, ""))
    for index, process in enumerate(processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            results[index] = (None, output)
    return results


@contextmanager
def recorded_communication(folder: Path) -> Iterator[Path]:
    """Processes started inside record their torch.distributed calls into `folder` (executor.comm_trace)."""
    from executor.comm_trace import TRACE_ENV

    previous = os.environ.get(TRACE_ENV)
    os.environ[TRACE_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            del os.environ[TRACE_ENV]
        else:
            os.environ[TRACE_ENV] = previous


def assert_follows_nccl_rules(folder: Path) -> None:
    """The recorded run would neither block nor mismatch under NCCL's rules (executor.nccl_rules)."""
    from executor.nccl_rules import check

    findings = check(folder)
    assert not findings, "\n".join(findings[:5])
