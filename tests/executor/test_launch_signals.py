"""Stopping `ditplan run`: a signal to the launcher alone, or to its whole process group, ends every
worker within 10 s, leaves no output folder and prints one line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
STOPPED_WITHIN_S = 10.0


def _start_long_run(out: Path) -> tuple[subprocess.Popen, list[str]]:
    """A 2-process run long enough to be interrupted in its denoising loop; stdout lines are collected
    as they come (rank 0 prints the layout just before generating)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "planner", "run", "--model", "tiny-pixart-alpha", "--plan", "cfg=2", "--nproc", "2",
         "--out", str(out), "--steps", "1000", "--print-layout"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    return process, lines


def _workers(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if "executor.worker" in " ".join(_cmdline(child))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until_generating(process: subprocess.Popen, lines: list[str], timeout: float = 200.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it was interrupted: {process.stderr.read()}")
        if any("rank" in line for line in lines):
            workers = _workers(process)
            if len(workers) == 2:
                time.sleep(1.0)  # well inside the denoising loop
                return workers
        time.sleep(0.2)
    pytest.fail("the workers did not start generating in time")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, group", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGINT-launcher", "SIGTERM-launcher", "SIGINT-process-group"])
def test_a_signal_ends_every_worker_and_writes_nothing(tmp_path, signum, group):
    out = tmp_path / "out"
    process, _lines = _start_long_run(out)
    try:
        workers = _wait_until_generating(process, _lines)
        sent = time.monotonic()
        if group:
            os.killpg(process.pid, signum)  # what Ctrl-C in a terminal does
        else:
            process.send_signal(signum)  # what a job scheduler or a parent script does
        status = process.wait(timeout=60)
        while any(_alive(worker) for worker in workers) and time.monotonic() - sent < STOPPED_WITHIN_S:
            time.sleep(0.1)
        assert not [worker.pid for worker in workers if _alive(worker)], "workers outlived the launcher"
        assert time.monotonic() - sent < STOPPED_WITHIN_S
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert status == 128 + signum
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert signal.Signals(signum).name in lines[0] and "Traceback" not in stderr
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name != "out"], "a temporary folder was left behind"


@pytest.mark.timeout(300)
def test_a_killed_rank_is_named_with_its_signal(tmp_path):
    out = tmp_path / "out"
    process, lines = _start_long_run(out)
    try:
        workers = _wait_until_generating(process, lines)
        victim = next(worker for worker in workers if worker.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)  # what the kernel's out-of-memory killer does
        status = process.wait(timeout=60)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert status == 1
    assert "rank 1 was killed by SIGKILL" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_the_failure_line_names_the_rank_a_signal_killed_and_not_the_collateral_ones():
    from types import SimpleNamespace

    from executor.launch import _failure_line

    def failures(**codes):
        return {int(rank[1:]): SimpleNamespace(exitcode=code) for rank, code in codes.items()}

    assert _failure_line(failures(r0=143, r1=-9)) == ("ditplan run: rank 1 was killed by SIGKILL; the other ranks were stopped", 1)
    assert _failure_line(failures(r0=2, r1=-15, r2=143)) == (None, 2)  # rank 0's refusal, already printed
    assert _failure_line(failures(r0=1, r1=-15)) == (None, 1)  # rank 0 printed its error
    assert _failure_line(failures(r0=143))[0] == "ditplan run: rank 0 was stopped by SIGTERM; the other ranks were stopped"
