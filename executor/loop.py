"""The denoising loop of every configuration: `executor.steps.run_steps` around one step program.

How a step is computed:
* serial: every branch in one transformer batch, as the diffusers pipeline does (one call per branch
  where the pipeline makes one, `FamilyAdapter.model_output`);
* CFG parallel (cfg=2): rank with cfg coordinate c runs branch c only ("uncond" on 0, "cond" on 1);
  one all-gather of the noise prediction per step, then identical guidance and scheduler step on
  both ranks, so their latents stay bit-identical;
* sequence parallel: the SP helper's processors are already installed on the transformer (see
  executor.parallel); every rank of the SP group runs the same call and gets the full output;
* PipeFusion (`ParallelConfig.pipelines`): this rank's share of the step's patches
  (`executor.pipefusion.step_program`);
* data parallel: handled one level up (each replica runs this loop on its share of the prompts).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from costmodel.config import ParallelConfig
from executor.families.base import DenoiseJob, FamilyAdapter
from executor.groups import ExecutorGroups
from executor.pipefusion import step_program
from executor.steps import StepProgram, gather_cfg_halves, run_steps


def denoise(
    job: DenoiseJob,
    adapter: FamilyAdapter,
    config: ParallelConfig | None = None,
    groups: ExecutorGroups | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor | None:
    """Run the job's denoising loop under `config`; returns the final latents.

    `on_step(step_index, seconds)` is called after every step (timings, progress bar). Every rank of
    a replica returns the final latents, except under PipeFusion, where `executor.pipefusion`
    decides (the replica leader always gets them).
    """
    config = config or ParallelConfig()
    assert config.cfg == 1 or job.do_cfg, f"{config}: refused at the entrance (executor.parallel), cfg=2 without guidance"
    if config.pipelines:
        program = step_program(job, adapter, adapter.experts, groups, config)
    else:
        program = _batch_steps(job, adapter, config, groups)
    return run_steps(program, len(job.timesteps), job.latents.device, on_step, groups.rank if groups is not None else 0)


def _batch_steps(job: DenoiseJob, adapter: FamilyAdapter, config: ParallelConfig, groups: ExecutorGroups | None) -> StepProgram:
    """A step: one transformer call on this rank's CFG branches, guidance, the scheduler step."""
    cfg_group: Any = groups.group("cfg") if config.cfg == 2 else None
    branches = (job.branches[groups.coordinate("cfg")],) if config.cfg == 2 else job.branches
    latents = job.latents
    for step_index, t in enumerate(job.timesteps):
        noise = adapter.noise_prediction(job, adapter.model_output(job, latents, t, branches))
        if config.cfg == 2:
            uncond, cond = gather_cfg_halves(noise, cfg_group)  # one all-gather per step
            noise = adapter.combine_guidance(job, uncond, cond, step_index, t)
        elif job.do_cfg:
            uncond, cond = noise.chunk(2)
            noise = adapter.combine_guidance(job, uncond, cond, step_index, t)
        latents = adapter.step(job, noise, t, latents, step_index)
        yield
    return latents
