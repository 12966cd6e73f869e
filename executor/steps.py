"""The one step loop every configuration runs, and the CFG all-gather the methods share.

A method describes how its steps are computed as a step program: a generator that does one
denoising step's work on this rank per resumption, yields when the step is done, and returns the
final latents (or None where this rank does not hold them). `run_steps` owns the loop around it:
the step count, the synchronised timing of each step, the per-step callback and the failure test
hook. Serial, CFG and sequence-parallel runs (`executor.loop`) compute a step as one transformer
call; PipeFusion (`executor.pipefusion`) as this rank's share of the step's patches, whose
messages may overlap the neighbouring steps.

Test hook: DITPLAN_FAIL_AT="RANK:STEP" makes that global rank raise when it is about to start that
step (under PipeFusion, the other stages are then still at work: mid-pipeline).
"""
from __future__ import annotations

import os
from typing import Callable, Generator

import torch
import torch.distributed as dist

from executor.device import now
from executor.timeline import active as active_timeline

FAIL_AT_ENV = "DITPLAN_FAIL_AT"

StepProgram = Generator[None, None, "torch.Tensor | None"]


class InjectedFailure(RuntimeError):
    """Raised by the DITPLAN_FAIL_AT test hook."""


def failure_step(rank: int) -> int | None:
    """The step at which DITPLAN_FAIL_AT asks this global rank to fail (None: it does not)."""
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return None
    fail_rank, _, step = spec.partition(":")
    return int(step or 0) if int(fail_rank) == rank else None


def run_steps(program: StepProgram, steps: int, device: torch.device,
              on_step: Callable[[int, float], None] | None = None, rank: int = 0) -> torch.Tensor | None:
    """Run `steps` steps of `program`; returns its final latents.

    `on_step(step_index, seconds)` is called when this rank has done each step, with the seconds
    the step took once the device finished its work.
    """
    fail_at = failure_step(rank)
    try:
        with torch.no_grad():
            for index in range(steps):
                if fail_at == index:
                    raise InjectedFailure(f"injected failure at step {index} ({FAIL_AT_ENV}={os.environ[FAIL_AT_ENV]})")
                started = now(device)
                next(program)
                finished = now(device)
                timeline = active_timeline()
                if timeline is not None:
                    timeline.step(index, started, finished)
                if on_step is not None:
                    on_step(index, finished - started)
            try:
                next(program)
            except StopIteration as done:
                return done.value
        raise RuntimeError(f"the step program yielded more than its {steps} steps")
    finally:
        program.close()  # on a failure: the program's own clean-up (installed processors) runs now


def gather_cfg_halves(tensor: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """[uncond, cond]: this rank's CFG half and its peer's, in cfg order (one all-gather)."""
    tensor = tensor.contiguous()  # empty_like keeps strides: the received halves must be contiguous too
    halves = [torch.empty_like(tensor) for _ in range(2)]
    dist.all_gather(halves, tensor, group=group)
    return halves
