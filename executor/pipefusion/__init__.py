"""PipeFusion: patch-level pipeline parallelism with stale K/V.

`step_program(job, adapter, transformer, groups, config)` is how the executor's loop computes the
steps of configurations with `pipefusion > 1` or `patches > 1` (`ParallelConfig.pipelines`); see `pipeline` (the distributed patch
pipeline across steps), `sequential` (the one-process reference), `stages` (each family's
transformer cut into pieces), `stale_kv`, `schedulers` (patch-by-patch steps), `hybrid` (with
Ulysses/Ring inside the stages), `partition` and `loading` (a stage without the rest of the model).

`prepare_stage` cuts an already loaded transformer to this rank's stage (the executor may call it
right after loading; `denoise` calls it too, once); `load_stage_transformer` never loads the rest.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from costmodel.config import ParallelConfig
from costmodel.errors import DitplanError
from executor.pipefusion.job import PatchJob
from executor.pipefusion.layout import patch_problems
from executor.pipefusion.loading import load_stage_transformer
from executor.pipefusion.partition import keep_stage_only
from executor.pipefusion.pipeline import denoise_pipelined, pipeline_steps, stage_units
from executor.pipefusion.sequential import denoise_sequential, sequential_steps
from executor.pipefusion.stages import StagedTransformer, staged
from executor.steps import StepProgram

__all__ = ["step_program", "prepare_stage", "size_problems", "stage_count_problems", "load_stage_transformer", "patch_job",
           "denoise_pipelined", "denoise_sequential", "staged"]

_STAGE_ATTR = "_ditplan_pipefusion_stage"


def prepare_stage(transformer: torch.nn.Module, family: str, stage: int, stages: int) -> StagedTransformer:
    """This rank's stage of `transformer`, keeping only its share of the blocks (done once; later
    calls return the same stage, so a pipeline called many times is cut once)."""
    prepared = getattr(transformer, _STAGE_ATTR, None)
    if prepared is not None:
        staged_transformer, key = prepared
        if key != (family, stage, stages):
            raise DitplanError(
                f"PipeFusion: this transformer was already cut for stage {key[1]} of {key[2]}; it cannot run stage {stage} of {stages}."
            )
        return staged_transformer
    staged_transformer = staged(transformer, family)
    if stages == 1:  # nothing is cut: the transformer stays usable by any plan
        return staged_transformer
    if stages > staged_transformer.unit_count():
        raise DitplanError(
            f"PipeFusion: pipefusion={stages} is more than the {staged_transformer.unit_count()} blocks of this {family} "
            "transformer; every stage needs at least one block."
        )
    units = stage_units(staged_transformer.unit_weights, stages, stage)
    keep_stage_only(staged_transformer, units, stage == 0, stage == stages - 1)
    object.__setattr__(transformer, _STAGE_ATTR, (staged_transformer, (family, stage, stages)))
    return staged_transformer


def _latent_shaped(value: Any, shape: tuple[int, ...]) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape) == shape


def patch_job(job: Any, adapter: Any) -> PatchJob:
    """A PatchJob driving the executor's DenoiseJob through its family adapter.

    Adapter extras that hold a latent-sized tensor across steps (CogVideoX's DPM solver keeps the
    previous prediction there) are handed to the adapter strip by strip and reassembled.
    """
    branches = job.branches
    model_kwargs = adapter.batched_inputs(job, branches)
    full_shape = tuple(job.latents.shape)

    def model_input(latents: torch.Tensor, t: Any) -> torch.Tensor:
        x = adapter.model_input(job, latents, t)
        return torch.cat([x] * len(branches)) if len(branches) > 1 else x

    def guide(output: torch.Tensor, step_index: int, t: Any) -> torch.Tensor:
        noise = adapter.noise_prediction(job, output)
        if not job.do_cfg:
            return noise
        uncond, cond = noise.chunk(2)
        return adapter.combine_guidance(job, uncond, cond, step_index, t)

    def step(scheduler: Any, noise: torch.Tensor, t: Any, latents: torch.Tensor, step_index: int, patch: int | None) -> torch.Tensor:
        if patch is None:
            return adapter.step(replace(job, scheduler=scheduler), noise, t, latents, step_index)
        strip = scheduler._layout.latent_slice(patch)
        extras = {k: (v[..., strip, :] if _latent_shaped(v, full_shape) else v) for k, v in job.extras.items()}
        local = replace(job, scheduler=scheduler, extras=extras)
        result = adapter.step(local, noise, t, latents, step_index)
        for key, value in local.extras.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(latents.shape):
                if not _latent_shaped(job.extras.get(key), full_shape):
                    job.extras[key] = value.new_zeros(full_shape)
                job.extras[key][..., strip, :] = value
        return result

    return PatchJob(
        latents=job.latents, timesteps=list(job.timesteps), scheduler=job.scheduler, model_kwargs=model_kwargs,
        model_input=model_input, model_timestep=lambda t, batch: adapter.timestep_input(job, t, batch),
        guide=guide, step=step, cfg=job.do_cfg,
    )


def _stages_of(transformer: torch.nn.Module, family: str) -> StagedTransformer:
    """The stage view of `transformer`: the one it was cut with, else a fresh one (cuts nothing)."""
    prepared = getattr(transformer, _STAGE_ATTR, None)
    return prepared[0] if prepared is not None else staged(transformer, family)


def stage_count_problems(transformer: torch.nn.Module, family: str, pipefusion: int) -> list[str]:
    """Why this transformer cannot be cut into `pipefusion` stages (empty: it can). A stage holds
    whole units (Latte: a spatial and a temporal block together), at least one each."""
    if pipefusion == 1:
        return []
    units = _stages_of(transformer, family).unit_count()
    if pipefusion <= units:
        return []
    return [f"pipefusion={pipefusion} exceeds the {units} pipeline units of this {family} transformer; "
            "every stage needs at least one"]


def size_problems(job: Any, adapter: Any, config: ParallelConfig) -> list[str]:
    """Why `config`'s patches cannot cut this job's image (empty: they can), from the shapes alone,
    so every rank finds the same before any collective: at least one token row per patch, and
    every patch's tokens splitting evenly over the sequence-parallel ranks."""
    if not config.pipelines:
        return []
    stages = _stages_of(adapter.transformer, job.family)
    model_kwargs = patch_job(job, adapter).model_kwargs
    problems = stages.input_problems(model_kwargs, config.cfg)
    try:
        layout = stages.layout(job.latents, model_kwargs, config.patches)
    except DitplanError:
        rows = stages.layout(job.latents, model_kwargs, 1).token_rows
        return [*problems, f"patches={config.patches} exceeds the image's {rows} token rows; each patch needs at least one whole token row"]
    return [*problems, *patch_problems(layout, config.sp)]


def step_program(job: Any, adapter: Any, transformer: torch.nn.Module, groups: Any, config: ParallelConfig) -> StepProgram:
    """This rank's step program (executor.steps) of `job` under PipeFusion: every rank of the
    pipeline ends with the final latents."""
    pipe_ranks = groups.members("pipefusion") if groups is not None else [0]
    stage = groups.coordinate("pipefusion") if groups is not None else 0
    stages = prepare_stage(transformer, job.family, stage, config.pipefusion)
    work = patch_job(job, adapter)
    if config.pipefusion == 1 and config.cfg == 1 and config.sp == 1:
        return sequential_steps(work, stages, config.patches, config.warmup)
    # A one-stage "pipeline" with CFG halves or SP is the same patch-sequential algorithm, split.
    cfg_ranks = groups.members("cfg") if config.cfg == 2 else None
    return pipeline_steps(work, stages, pipe_ranks, groups.group("pipefusion"), config.patches, config.warmup,
                          cfg_ranks, groups.group("cfg") if cfg_ranks else None, groups.group("ulysses"), groups.group("ring"))
