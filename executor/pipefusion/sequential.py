"""The patch-sequential stale-KV algorithm in one process (`pipefusion=1, patches=M`).

Within a step, patch m runs through all blocks while every self-attention layer's buffer holds
fresh K/V for patches 0..m (image rows and, for joint attention, text strips) and the previous
step's for the rest: exactly what every stage of the distributed pipeline sees, whatever the stage
count. So this is the reference each distributed plan with the same patches and warmup must
reproduce, and a way to see PipeFusion's image quality without a cluster. With two experts (Wan 2.2
A14B) each step runs its expert, and each expert's first `warmup` steps are full-image steps
(`costmodel.config.warmup_steps`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from costmodel.config import warmup_steps
from executor.pipefusion.job import PatchJob
from executor.pipefusion.schedulers import PatchScheduler
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Cond, StagedTransformer, expert_stages
from executor.pipefusion.stale_kv import StaleKVState, install_stale_kv
from executor.steps import StepProgram, run_steps


@torch.no_grad()
def denoise_sequential(job: PatchJob, stages: StagedTransformer | Sequence[StagedTransformer], patches: int, warmup: int,
                       on_step: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """Final latents of the patch-sequential algorithm (with patches=1 or warmup >= steps: the serial loop).

    `stages`: the transformer, or one per expert (`PatchJob.step_experts` says which runs each
    step). `on_step(step_index, seconds)` is called after every step."""
    return run_steps(sequential_steps(job, stages, patches, warmup), len(job.timesteps), job.latents.device, on_step)


def sequential_steps(job: PatchJob, stages: StagedTransformer | Sequence[StagedTransformer], patches: int,
                     warmup: int) -> StepProgram:
    """The step program (executor.steps) of the patch-sequential algorithm."""
    experts = expert_stages(stages)
    latents = job.latents.clone()
    layout = experts[0].layout(job.model_input(latents, job.timesteps[0]), job.model_kwargs, patches)
    scheduler = PatchScheduler(job.scheduler, layout, tuple(latents.shape))
    state = StaleKVState(buffer_tokens=layout.image_tokens)
    # Each expert's layers keep their own buffers; one expert's K/V are never another's.
    handles = [install_stale_kv(expert.stale_layers(range(expert.unit_count())), state) for expert in experts]
    step_experts = job.experts_of_steps()
    full_image = warmup_steps(step_experts, warmup)
    try:
        for i, t in enumerate(job.timesteps):
            expert = step_experts[i]
            if i and expert != step_experts[i - 1]:
                handles[step_experts[i - 1]].release_buffers()
            current = experts[expert]
            x = job.model_input(latents, t)
            timestep = job.model_timestep(t, x.shape[0])
            cond = current.condition(x, timestep, job.model_kwargs)
            state.text_tokens = state.text_buffer_tokens = current.text_tokens(cond)
            if full_image[i] or patches == 1:
                state.mode, state.index = ("fill" if patches > 1 else "off"), None
                noise = job.guide(current.forward(x, timestep, job.model_kwargs, layout), i, t)
                latents = job.step(scheduler, noise, t, latents, i, None)
            else:
                _patch_step(job, current, scheduler, state, layout, latents, x, cond, t, i, patches)
            yield
    finally:
        for handle in handles:
            handle.remove()
    return latents


def _patch_step(job: PatchJob, stages: StagedTransformer, scheduler: PatchScheduler, state: StaleKVState, layout: PatchLayout,
                latents: torch.Tensor, x: torch.Tensor, cond: Cond, t: Any, i: int, patches: int) -> None:
    """One step, patch after patch, updating `latents` in place."""
    state.mode = "patch"
    image = stages.embed(x, cond)
    for m in range(patches):
        index, text_index = layout.token_index(m, latents.device), layout.text_slice(m, state.text_buffer_tokens)
        state.index, state.text_index, state.text_tokens = index, text_index, text_index.stop - text_index.start
        carry = stages.select(image, index, text_index)
        for unit in range(stages.unit_count()):
            carry = stages.run_unit(unit, carry, cond, index, text_index)
        noise = job.guide(stages.head(carry, cond, layout, m), i, t)
        with scheduler.patch(m):
            strip = job.step(scheduler, noise, t, layout.take_latent(latents, m), i, m)
        layout.put_latent(latents, m, strip)
