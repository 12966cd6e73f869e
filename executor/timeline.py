"""Measured per-rank timelines of a run, in the Chrome-trace layout of `ditplan simulate --trace`.

Each rank records, while a timeline is active: every denoising step (category "compute", track 0;
the step's span includes what happens inside it), every torch.distributed call it makes
("communication", track 1; on a GPU the device is synchronised before and after each call, so the
span is the transfer and the wait for the peers, not the enqueueing) and PipeFusion's waits for a
message from another stage ("waiting", track 0, inside the step). `totals()` splits the steps'
time into compute, communication and waiting; `chrome_events(rank)` gives the events for Perfetto.

The worker starts a timeline when DITPLAN_RUN_TRACE names the trace file to write (the launcher's
`--trace`), gathers every rank's events on rank 0 and writes them there; run.json then carries
each rank's totals.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import torch

from executor.device import now

RUN_TRACE_ENV = "DITPLAN_RUN_TRACE"
COMPUTE_TRACK, COMMUNICATION_TRACK = 0, 1

Result = TypeVar("Result")


@dataclass
class RankTimeline:
    """One rank's measured events: (name, category, track, start, finish) in epoch seconds."""

    device: torch.device
    events: list[tuple[str, str, int, float, float]] = field(default_factory=list)
    # Clock readings (executor.device.now) to epoch seconds: ranks on several nodes share the wall
    # clock, not the monotonic one.
    offset: float = field(default_factory=lambda: time.time() - now(torch.device("cpu")))

    def _timed(self, name: str, category: str, track: int, call: Callable[[], Result]) -> Result:
        started = now(self.device)
        try:
            return call()
        finally:
            self.events.append((name, category, track, started + self.offset, now(self.device) + self.offset))

    def communication(self, name: str, call: Callable[[], Result]) -> Result:
        return self._timed(name, "communication", COMMUNICATION_TRACK, call)

    def waiting(self, name: str, call: Callable[[], Result]) -> Result:
        return self._timed(name, "waiting", COMPUTE_TRACK, call)

    def step(self, index: int, started: float, finished: float) -> None:
        """A denoising step measured by the step loop (executor.device.now readings)."""
        self.events.append((f"step {index}", "compute", COMPUTE_TRACK, started + self.offset, finished + self.offset))

    def totals(self) -> dict[str, float]:
        """Seconds of the steps split into compute, communication and waiting (the last two counted
        inside the steps only)."""
        steps = [(start, finish) for _, category, _, start, finish in self.events if category == "compute"]

        def inside(category: str) -> float:
            return sum(finish - start for _, kind, _, start, finish in self.events
                       if kind == category and any(a <= start and finish <= b for a, b in steps))

        communication, waiting = inside("communication"), inside("waiting")
        total = sum(finish - start for start, finish in steps)
        return {"steps_s": total, "compute_s": max(0.0, total - communication - waiting),
                "communication_s": communication, "waiting_s": waiting}

    def chrome_events(self, rank: int, origin: float) -> list[dict[str, Any]]:
        """This rank's events as Chrome-trace "X" events (microseconds since `origin`, epoch seconds)."""
        return [{"name": name, "cat": category, "ph": "X", "pid": rank, "tid": track, "ts": (start - origin) * 1e6,
                 "dur": max(0.0, finish - start) * 1e6, "args": {}}
                for name, category, track, start, finish in self.events]


_active: RankTimeline | None = None


def active() -> RankTimeline | None:
    """The timeline being recorded in this process, if any."""
    return _active


@contextmanager
def recording(device: torch.device) -> Iterator[RankTimeline]:
    """Record this rank's timeline while inside."""
    global _active
    from executor.comm_trace import listen

    timeline = RankTimeline(device)
    _active = timeline
    listen(timeline)
    try:
        yield timeline
    finally:
        listen(None)
        _active = None


def track_names(world_size: int) -> list[dict[str, Any]]:
    """The metadata events naming each rank and its two tracks, as `ditplan simulate --trace` does."""
    events: list[dict[str, Any]] = []
    for rank in range(world_size):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": COMPUTE_TRACK, "args": {"name": "compute"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": COMMUNICATION_TRACK,
                       "args": {"name": "communication"}})
    return events
