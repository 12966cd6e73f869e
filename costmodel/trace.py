"""Chrome-trace (Perfetto) events of a predicted timeline: one process per rank, a compute track
and a communication track."""
from __future__ import annotations

from typing import Any

from costmodel.sim_setup import Setup

def event(name: str, category: str, rank: int, track: int, start: float, finish: float, **args: Any) -> dict[str, Any]:
    return {"name": name, "cat": category, "ph": "X", "pid": rank, "tid": track, "ts": start * 1e6,
            "dur": max(0.0, finish - start) * 1e6, "args": args}


def trace_patch(trace: list, ranks: list[int], free: float, start: float, finish: float, t: int, m: int, s: int) -> None:
    for rank in ranks:
        if start > free + 1e-12:
            trace.append(event("waiting", "waiting", rank, 0, free, start))
        trace.append(event(f"step {t} patch {m}", "compute", rank, 0, start, finish, step=t, patch=m, stage=s))


def trace_warmup(st: Setup, trace: list, full: list, t: int, clock: float) -> None:
    """Warmup step t (the whole image through the stages in turn), starting at `clock`."""
    for s, cost in enumerate(full):
        for g in st.groups["pipefusion"]:
            trace.append(event(f"warmup step {t}", "compute", g[s], 0, clock, clock + cost.compute, step=t, stage=s))
            if cost.comm:
                trace.append(event("sequence-parallel communication", "communication", g[s], 1,
                                    clock + cost.compute, clock + cost.compute + cost.comm))
        clock += cost.compute + cost.comm


def trace_steps(trace: list, world: int, steps: int, step_compute: float, step_comm: float,
                straggle: float = 0.0) -> None:
    """Steps one after another on every rank: compute, then the step's exposed communication, then
    (on a jittery machine) the step's total wait for the slowest rank."""
    per_step = step_compute + step_comm + straggle
    for rank in range(world):
        for t in range(steps):
            start = t * per_step
            trace.append(event(f"step {t}", "compute", rank, 0, start, start + step_compute, step=t))
            if step_comm:
                trace.append(event(f"step {t} communication", "communication", rank, 1,
                                   start + step_compute, start + step_compute + step_comm, step=t))
            if straggle:
                trace.append(event("waiting for the slowest rank", "waiting", rank, 0,
                                   start + step_compute + step_comm, start + per_step, step=t))


def name_tracks(trace: list, world: int) -> None:
    """The metadata events that label each rank and its two tracks."""
    for rank in range(world):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "communication"}})
