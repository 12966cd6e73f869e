"""Which configurations can run a given generation: every broken rule, in words.

`check_config` lists them all (the planner prunes with the list; the executor refuses to launch);
`ensure_valid_config` raises one DitplanError that names each.
"""
from __future__ import annotations

from costmodel.config import ParallelConfig
from costmodel.errors import DitplanError
from costmodel.pipeline_stages import WHOLE_DECODE
from costmodel.specs import ModelSpec, load_model


def _as_config(config: "ParallelConfig | str") -> ParallelConfig:
    return config if isinstance(config, ParallelConfig) else ParallelConfig.parse(str(config))


def check_generation(model: ModelSpec, height: int, width: int, frames: int, steps: int) -> list[str]:
    """Rules on the generation alone (size, frames, steps), whatever the configuration."""
    problems: list[str] = []
    for name, value in (("height", height), ("width", width), ("frames", frames), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be an integer >= 1")
    if problems:
        return problems
    unit = model.vae_spatial_factor * model.patch_size
    for name, value in (("height", height), ("width", width)):
        if value % unit:
            problems.append(
                f"{name}={value} is not a multiple of {unit} (VAE factor {model.vae_spatial_factor} x patch size "
                f"{model.patch_size}), so the latent does not split into whole patches"
            )
    if not model.is_video and frames != 1:
        problems.append(f"frames={frames} but {model.id} generates images; use frames=1")
    if model.vae_temporal_factor > 1 and (frames - 1) % model.vae_temporal_factor:
        problems.append(
            f"frames={frames}: {model.id}'s VAE compresses time {model.vae_temporal_factor}x, so frames must be "
            f"1 + a multiple of {model.vae_temporal_factor} (e.g. {model.default_frames})"
        )
    return problems


def check_config(config: "ParallelConfig | str", model: "ModelSpec | str", height: int, width: int, frames: int,
                 steps: int, gpus: int) -> list[str]:
    """Every rule `config` breaks for this model, resolution, frame count, step count and GPU count."""
    config = _as_config(config)
    model = load_model(model)
    problems = check_generation(model, height, width, frames, steps)
    if config.world_size != gpus:
        problems.append(
            f"dp x cfg x ulysses x ring x pipefusion = {config.dp} x {config.cfg} x {config.ulysses} x {config.ring} x "
            f"{config.pipefusion} = {config.world_size} GPUs, but {gpus} GPUs are given; the product must equal the GPU count"
        )
    if config.vae > 1 and model.family in WHOLE_DECODE:
        problems.append(f"vae={config.vae}: {WHOLE_DECODE[model.family]}; use vae=1")
    if config.cfg == 2 and not model.uses_cfg:
        problems.append(f"cfg=2 but {model.id} does not use classifier-free guidance, so there is no second half to split")
    if model.num_heads % config.ulysses:
        problems.append(f"ulysses={config.ulysses} does not divide {model.id}'s {model.num_heads} attention heads")
    elif model.num_kv_heads % config.ulysses:
        problems.append(f"ulysses={config.ulysses} does not divide {model.id}'s {model.num_kv_heads} key/value heads")
    units = len(model.pipeline_units)
    if config.pipefusion > units:
        pairing = " (a temporal block stays on the stage of the spatial block before it)" if units < model.num_blocks else ""
        problems.append(
            f"pipefusion={config.pipefusion} exceeds {model.id}'s {units} transformer blocks{pairing}; "
            "every stage needs at least one block"
        )
    if config.pipelines and config.warmup > steps:
        problems.append(f"warmup={config.warmup} exceeds steps={steps}; warmup steps are part of the step count")
    if not any(p.startswith("height=") and "multiple" in p for p in problems) and isinstance(height, int) and height >= 1:
        tframes, rows, cols = model.token_grid(height, width, frames)
        strips = config.patches * config.sp
        if tframes > 1 and config.patches == 1 and not model.has_temporal_blocks:
            # Sequence parallelism alone splits a video's flattened (frame, row, column) tokens evenly
            # (as xDiT does for 720p HunyuanVideo's 45 token rows over 8 GPUs); Latte's spatial blocks
            # attend within each frame, so its frames keep the row rule.
            if (tframes * rows * cols) % config.sp:
                problems.append(
                    f"the video has {tframes} x {rows} x {cols} = {tframes * rows * cols} tokens, which do not split "
                    f"into sp = {config.sp} equal parts"
                )
        elif rows % strips:
            problems.append(
                f"the latent has {rows} token rows ({height}/{model.vae_spatial_factor}/{model.patch_size}), which do not "
                f"split into patches x sp = {config.patches} x {config.sp} = {strips} equal strips; each strip must be a "
                f"whole number of patch rows ({model.patch_size} latent rows each)"
            )
    return problems


def ensure_valid_config(config: "ParallelConfig | str", model: "ModelSpec | str", height: int, width: int, frames: int,
                        steps: int, gpus: int) -> None:
    """Raise one DitplanError naming every broken rule."""
    config = _as_config(config)
    problems = check_config(config, model, height, width, frames, steps, gpus)
    if problems:
        name = model if isinstance(model, str) else model.id
        raise DitplanError(f"configuration {config} cannot run {name} at {width}x{height}"
                           f"{'' if frames == 1 else f'x{frames} frames'}, {steps} steps on {gpus} GPU(s): "
                           + "; ".join(problems) + ".")
