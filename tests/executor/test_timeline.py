"""Measured per-rank timelines (executor.timeline): the split of the steps' time, and a 2-rank
`ditplan run` that writes a Chrome trace in `ditplan simulate --trace`'s layout and each rank's
totals in run.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from executor.timeline import RankTimeline

ROOT = Path(__file__).resolve().parents[2]


def test_steps_split_into_compute_communication_and_waiting():
    timeline = RankTimeline(torch.device("cpu"), offset=0.0)
    timeline.step(0, 10.0, 14.0)
    timeline.events.append(("all_gather", "communication", 1, 11.0, 12.0))
    timeline.events.append(("wait for stage 0", "waiting", 0, 12.0, 12.5))
    timeline.events.append(("gather_object", "communication", 1, 20.0, 21.0))  # after the steps: not theirs
    assert timeline.totals() == {"steps_s": 4.0, "compute_s": 2.5, "communication_s": 1.0, "waiting_s": 0.5}
    events = timeline.chrome_events(3, origin=10.0)
    assert events[0] == {"name": "step 0", "cat": "compute", "ph": "X", "pid": 3, "tid": 0, "ts": 0.0, "dur": 4e6, "args": {}}


def test_timed_communication_is_recorded_around_the_call():
    timeline = RankTimeline(torch.device("cpu"))
    assert timeline.communication("all_reduce", lambda: 7) == 7
    (name, category, track, start, finish), = timeline.events
    assert (name, category, track) == ("all_reduce", "communication", 1) and finish >= start


@pytest.mark.timeout(300)
def test_run_trace_writes_every_ranks_timeline(tmp_path):
    trace = tmp_path / "trace.json"
    result = subprocess.run(
        [sys.executable, "-m", "executor", "--model", "tiny-pixart-alpha", "--plan", "pipefusion=2,patches=2,warmup=1",
         "--nproc", "2", "--steps", "3", "--out", str(tmp_path / "out"), "--trace", str(trace)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    assert {(e["pid"], e["name"]) for e in spans if e["cat"] == "compute"} == {(r, f"step {i}") for r in (0, 1) for i in range(3)}
    assert any(e["cat"] == "communication" and e["tid"] == 1 for e in spans)
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == {"rank 0", "rank 1", "compute", "communication"}
    per_rank = json.loads((tmp_path / "out" / "run.json").read_text())["per_rank"]
    for totals in (rank["timeline"] for rank in per_rank):
        assert totals["steps_s"] > 0 and totals["communication_s"] > 0
        parts = totals["compute_s"] + totals["communication_s"] + totals["waiting_s"]
        assert parts == pytest.approx(totals["steps_s"], rel=1e-6)
