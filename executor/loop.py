"""The denoising loop: the one place that owns it, for every configuration.

* serial: every branch in one transformer batch, as the diffusers pipeline does;
* CFG parallel (cfg=2): rank with cfg coordinate c runs branch c only ("uncond" on 0, "cond" on 1);
  one all-gather of the noise prediction per step, then identical guidance and scheduler step on
  both ranks, so their latents stay bit-identical;
* sequence parallel: the SP helper's processors are already installed on the transformer (see
  executor.parallel); every rank of the SP group runs the same call and gets the full output;
* PipeFusion (pipefusion > 1 or patches > 1): delegated to `executor.pipefusion.denoise`;
* data parallel: handled one level up (each replica runs this loop on its share of the prompts).

Test hook: DITPLAN_FAIL_AT="RANK:STEP" makes that global rank raise at that step (failure tests;
under PipeFusion as soon as the rank has done its part of the step before, mid-pipeline).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from costmodel.config import ParallelConfig
from executor.device import now, seconds_since
from executor.families.base import DenoiseJob, FamilyAdapter
from executor.groups import ExecutorGroups
from executor.pipefusion import denoise as pipefusion_denoise
from executor.pipefusion import runs_patches

FAIL_AT_ENV = "DITPLAN_FAIL_AT"


class InjectedFailure(RuntimeError):
    """Raised by the DITPLAN_FAIL_AT test hook."""


def _failure_step(rank: int) -> int | None:
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return None
    fail_rank, _, step = spec.partition(":")
    return int(step or 0) if int(fail_rank) == rank else None


def _injected_failure(step_index: int) -> InjectedFailure:
    return InjectedFailure(f"injected failure at step {step_index} ({FAIL_AT_ENV}={os.environ[FAIL_AT_ENV]})")


def _failing_after(on_step: Callable[[int, float], None] | None, fail_step: int | None) -> Callable[[int, float], None] | None:
    """`on_step` for PipeFusion, which owns its step loop: the test hook fires when this rank is done
    with the step before `fail_step` (mid-pipeline: the other stages are still at work)."""
    if fail_step is None:
        return on_step
    if fail_step == 0:
        raise _injected_failure(0)

    def on_step_then_fail(step_index: int, seconds: float) -> None:
        if on_step is not None:
            on_step(step_index, seconds)
        if step_index + 1 == fail_step:
            raise _injected_failure(fail_step)

    return on_step_then_fail


def denoise(
    job: DenoiseJob,
    adapter: FamilyAdapter,
    config: ParallelConfig | None = None,
    groups: ExecutorGroups | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor | None:
    """Run the job's denoising loop under `config`; returns the final latents.

    `on_step(step_index, seconds)` is called after every step (timings, progress bar). Every rank of
    a replica returns the final latents, except under PipeFusion, where `executor.pipefusion.denoise`
    decides (the replica leader always gets them).
    """
    config = config or ParallelConfig()
    transformer = adapter.transformer
    fail_step = _failure_step(groups.rank if groups is not None else 0)
    assert config.cfg == 1 or job.do_cfg, f"{config}: refused at the entrance (executor.parallel), cfg=2 without guidance"
    if runs_patches(config):
        return pipefusion_denoise(job, adapter, transformer, groups, config, _failing_after(on_step, fail_step))

    cfg_group = groups.group("cfg") if groups is not None else None
    branches = (job.branches[groups.coordinate("cfg")],) if config.cfg == 2 else job.branches

    latents = job.latents
    with torch.no_grad():
        for step_index, t in enumerate(job.timesteps):
            started = now(latents.device)
            if fail_step == step_index:
                raise _injected_failure(step_index)
            output = transformer(**adapter.transformer_kwargs(job, latents, t, branches))[0]
            noise = adapter.noise_prediction(job, output)
            if config.cfg == 2:
                # One all-gather per step: both ranks end up with [uncond, cond] in cfg order.
                noise = noise.contiguous()  # empty_like keeps strides: the received halves must be contiguous too
                halves = [torch.empty_like(noise) for _ in range(2)]
                dist.all_gather(halves, noise, group=cfg_group)
                noise = adapter.combine_guidance(job, halves[0], halves[1], step_index, t)
            elif job.do_cfg:
                uncond, cond = noise.chunk(2)
                noise = adapter.combine_guidance(job, uncond, cond, step_index, t)
            latents = adapter.step(job, noise, t, latents, step_index)
            if on_step is not None:
                on_step(step_index, seconds_since(started, latents.device))
    return latents
