"""A plan in another engine's terms: xDiT's launch flags, diffusers' context-parallel configuration.

`emit(plan, engine)` returns `EngineSettings`: what to run, the settings as that engine names them,
and, in words, each part of the plan the engine cannot express (the rest of the plan still runs
there, without that part).

xDiT (xfuser's `xFuserArgs`): `--ulysses_degree`, `--ring_degree`, `--pipefusion_parallel_degree`,
`--num_pipeline_patch`, `--warmup_steps`, `--use_cfg_parallel`, `--data_parallel_degree`,
`--use_parallel_vae`, and the generation's `--height`, `--width`, `--num_frames`,
`--num_inference_steps`. Its rank order is fixed (sequence parallel innermost, then PipeFusion, CFG,
data parallel), as this project's default placement; on one node another placement is expressed by
reordering CUDA_VISIBLE_DEVICES.

diffusers: `ContextParallelConfig(ulysses_degree=..., ring_degree=...)` passed to
`transformer.enable_parallelism`; it has no patch pipeline, no CFG or data parallelism inside one
pipeline, and no parallel VAE.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from costmodel.config import DEFAULT_PLACEMENT, Placement
from costmodel.errors import DitplanError

ENGINES: tuple[str, ...] = ("xdit", "diffusers")

# xDiT's example script per family (its repository's examples/ folder).
XDIT_EXAMPLES = {
    "pixart": "examples/pixartalpha_example.py", "sd3": "examples/sd3_example.py", "flux": "examples/flux_example.py",
    "hunyuan": "examples/hunyuandit_example.py", "cogvideox": "examples/cogvideox_example.py",
    "latte": "examples/latte_example.py",
}
# Families whose diffusers transformer ships a context-parallel plan (`_cp_plan`), which
# `enable_parallelism` needs.
DIFFUSERS_CP_FAMILIES = ("flux",)


@dataclass(frozen=True)
class EngineSettings:
    """`command`: a launch line or code; `settings`: name -> value as the engine names them;
    `flags`: the command-line flags alone (xDiT); `cannot_express`: what the engine lacks, in words."""

    engine: str
    command: str
    settings: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    cannot_express: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "command": self.command, "settings": dict(self.settings),
                "flags": list(self.flags), "cannot_express": list(self.cannot_express)}

    def render(self) -> str:
        lines = [f"{self.engine}:", f"  {self.command}" if "\n" not in self.command
                 else "\n".join(f"  {line}" for line in self.command.splitlines())]
        if self.cannot_express:
            lines.append(f"not expressible in {self.engine}:")
            lines.extend(f"  - {note}" for note in self.cannot_express)
        else:
            lines.append(f"the whole plan is expressed in {self.engine}.")
        return "\n".join(lines)


def _placement_note(plan: Any, engine: str) -> list[str]:
    if plan.placement.order == DEFAULT_PLACEMENT:
        return []
    return [f"the rank placement {','.join(plan.placement.order)} (innermost first): {engine} orders ranks "
            f"{','.join(DEFAULT_PLACEMENT)}, so its groups land on other GPUs than the plan's"]


def device_order(plan: Any) -> list[int] | None:
    """GPU of each rank of an engine that places ranks in the default order, such that every group
    lands on the plan's GPUs (plan rank r runs on GPU r); None where the default order is the plan's."""
    if plan.placement.order == DEFAULT_PLACEMENT:
        return None
    default = Placement(plan.config)
    return [plan.placement.rank_of(default.coordinates(rank)) for rank in range(plan.gpus)]


def _one_node(plan: Any) -> bool:
    from costmodel.topology import load_cluster

    return load_cluster(plan.cluster, gpus=plan.gpus, nodes=plan.nodes).nodes == 1


def _family(plan: Any) -> str:
    from costmodel.specs import load_model

    return load_model(plan.model).family


def xdit(plan: Any) -> EngineSettings:
    """xDiT's launch: torchrun over the plan's GPUs with xFuserArgs flags."""
    config = plan.config
    settings: dict[str, Any] = {
        "ulysses_degree": config.ulysses, "ring_degree": config.ring,
        "pipefusion_parallel_degree": config.pipefusion, "data_parallel_degree": config.dp,
        "height": plan.height, "width": plan.width, "num_inference_steps": plan.steps,
    }
    order = device_order(plan)
    # One node: reordering the visible GPUs puts xDiT's rank x where the plan puts the same coordinates.
    prefix = [f"CUDA_VISIBLE_DEVICES={','.join(map(str, order))}"] if order and _one_node(plan) else []
    notes = _placement_note(plan, "xDiT") if order and not prefix else []
    if config.pipefusion > 1:
        settings["num_pipeline_patch"] = config.patches
        settings["warmup_steps"] = config.warmup
    elif config.uses_patches:
        notes.append(f"patches={config.patches} without PipeFusion stages: xDiT splits patches only with "
                     "--pipefusion_parallel_degree > 1")
    if plan.frames > 1:
        settings["num_frames"] = plan.frames
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    if config.cfg == 2:
        settings["use_cfg_parallel"] = True
        flags.append("--use_cfg_parallel")
    replica = config.world_size // config.dp
    if config.vae > 1:
        settings["use_parallel_vae"] = True
        flags.append("--use_parallel_vae")
        if config.vae != replica:
            notes.append(f"vae={config.vae}: xDiT's parallel VAE decodes over all {replica} GPUs of a replica, "
                         f"not {config.vae} of them")
    family = _family(plan)
    script = XDIT_EXAMPLES.get(family, f"<xDiT example script for {family}>")
    command = shlex.join([*prefix, "torchrun", f"--nproc_per_node={plan.gpus}", script, "--model", f"<{plan.model} checkpoint>",
                          *flags])
    return EngineSettings("xdit", command, settings, flags, notes)


def diffusers(plan: Any) -> EngineSettings:
    """diffusers' context parallelism: Ulysses and Ring on the transformer; the rest in words."""
    config = plan.config
    notes = []
    if config.pipelines:
        notes.append(f"PipeFusion (pipefusion={config.pipefusion}, patches={config.patches}, warmup={config.warmup}): "
                     "diffusers has no patch pipeline over stages")
    if config.cfg == 2:
        notes.append("cfg=2: diffusers runs both guidance halves in one batch on every rank (no CFG parallelism)")
    if config.dp > 1:
        notes.append(f"dp={config.dp}: diffusers parallelises one pipeline; run {config.dp} independent jobs, "
                     f"each on {config.world_size // config.dp} GPU(s), and split the prompts between them")
    if config.vae > 1:
        notes.append(f"vae={config.vae}: diffusers decodes on one GPU (no patch-parallel VAE); "
                     "vae.enable_tiling() lowers its memory instead")
    family = _family(plan)
    sp = config.sp
    if sp > 1 and family not in DIFFUSERS_CP_FAMILIES:
        notes.append(f"ulysses={config.ulysses}, ring={config.ring}: diffusers' {family} transformer has no "
                     "context-parallel plan, so enable_parallelism refuses it")
    notes += _placement_note(plan, "diffusers")
    settings = {"ulysses_degree": config.ulysses, "ring_degree": config.ring}
    if sp > 1:
        command = (
            "from diffusers import ContextParallelConfig\n"
            f"pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree={config.ulysses}, "
            f"ring_degree={config.ring}))  # under torchrun --nproc_per_node={sp}"
        )
    else:
        command = "# no context parallelism: run the pipeline as it is, one GPU per job"
    return EngineSettings("diffusers", command, settings, [], notes)


def emit(plan: Any, engine: str) -> EngineSettings:
    """The plan (a `planner.plan.Plan`) as `engine`'s settings."""
    if engine == "xdit":
        return xdit(plan)
    if engine == "diffusers":
        return diffusers(plan)
    raise DitplanError(f"--emit {engine!r}: the engines are {', '.join(ENGINES)}.")
