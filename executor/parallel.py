"""`executor.parallelize(pipe, plan=...)`: a diffusers pipeline run under a parallel plan.

The returned `ParallelPipeline` is called like the diffusers pipeline; rank 0 gets the output
(other ranks get None). Every rank of the job must make the same calls with the same arguments.

Seeds: prompt i draws its noise from its own generator seeded `seed + i` (seed = the `seed`
argument, or the passed generator's initial seed, or 0), so the same seed gives the same images
whatever the plan, data-parallel splits included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from executor.device import local_device, now, seconds_since
from executor.families import FamilyAdapter, GenerationRequest, adapter_for, model_id_of_pipeline
from executor.groups import ExecutorGroups, build_groups, init_distributed, launched_world_size
from executor.loop import denoise
from executor.pipefusion import prepare_stage, size_problems, stage_count_problems
from executor.sp import enable_sequence_parallel
from executor.vae import build_decode_group, decode_problems
from executor.vae import decode as decode_in_strips


@dataclass
class RunTimings:
    """Wall-clock seconds of the last call on this rank, per phase (each ends once the device has
    finished the phase's work)."""

    prepare_s: float = 0.0
    loop_s: float = 0.0
    decode_s: float = 0.0
    gather_s: float = 0.0
    end_to_end_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prepare_s": self.prepare_s, "loop_s": self.loop_s, "decode_s": self.decode_s,
                "gather_s": self.gather_s, "end_to_end_s": self.end_to_end_s, "step_s": list(self.step_s)}


@dataclass
class ParallelOutput:
    """What rank 0 gets: `images` (image families) or `frames` (video families: one frame list per prompt)."""

    images: Any = None
    frames: Any = None


def model_id_of(pipe: Any) -> str | None:
    """The ditplan model id a pipeline was built as (tiny pipelines record it), or its usual checkpoint's."""
    recorded = getattr(pipe, "ditplan_model_id", None)
    if recorded:
        return recorded
    return model_id_of_pipeline(pipe)


def model_problems(config: ParallelConfig, adapter: FamilyAdapter, model_id: str | None,
                   height: int | None = None, width: int | None = None, frames: int | None = None,
                   steps: int | None = None) -> list[str]:
    """Every rule `config` breaks for this pipeline (empty when it can run).

    Uses the cost model's rules (`costmodel.rules.check_config`) with the model's profile where one
    exists and the size is known, and checks the loaded transformer itself in any case, since a real
    checkpoint may differ from the profile of its id.
    """
    problems: list[str] = []
    if model_id is not None and None not in (height, width, frames, steps):
        from costmodel.rules import check_config
        from costmodel.specs import load_model

        try:
            problems.extend(check_config(config, load_model(model_id), height, width, frames, steps, config.world_size))
        except DitplanError:
            pass  # no profile for this id: the checks below still apply
    transformer_config = adapter.transformer.config
    heads = int(transformer_config.num_attention_heads)
    if config.cfg == 2 and not adapter.uses_cfg(2.0):
        problems.append(f"cfg=2 but {adapter.family} does not use classifier-free guidance, so there is no second half to split")
    if heads % config.ulysses:
        problems.append(f"ulysses={config.ulysses} does not divide the transformer's {heads} attention heads")
    if config.pipefusion > 1:
        problems.extend(stage_count_problems(adapter.transformer, adapter.family, config.pipefusion))
    return list(dict.fromkeys(problems))


def _refuse(config: ParallelConfig, problems: list[str]) -> None:
    if problems:
        raise DitplanError(f"plan {config} cannot run this model: " + "; ".join(problems) + ".")


class ParallelPipeline:
    """A diffusers pipeline bound to a parallel configuration; call it like the pipeline."""

    def __init__(self, pipe: Any, config: ParallelConfig, placement: Placement, groups: ExecutorGroups,
                 plan: Any = None, model_id: str | None = None, show_progress: bool | None = None) -> None:
        self.pipe = pipe
        self.adapter = adapter_for(pipe)
        self.config = config
        self.placement = placement
        self.groups = groups
        self.plan = plan
        self.model_id = model_id
        self.rank = groups.rank
        self.device = local_device()
        self.show_progress = (self.rank == 0) if show_progress is None else (show_progress and self.rank == 0)
        self.last_timings = RunTimings()
        self.last_sizes: dict[str, Any] = {}
        self._sp_handles = []
        if config.sp > 1 and not config.pipelines:
            self._sp_handles = [_enable_sp(expert, self.adapter.family, groups) for expert in self.adapter.experts]
        if config.pipefusion > 1:
            # Drop the other stages' blocks of every expert now, before the first call (a no-op for
            # a transformer loaded as this stage alone).
            for expert in self.adapter.experts:
                prepare_stage(expert, self.adapter.family, groups.coordinate("pipefusion"), config.pipefusion)
        self._decode_group = build_decode_group(config, placement, self.rank)

    def layout(self) -> str:
        """The rank layout (coordinates and groups per axis), printable."""
        return self.groups.layout()

    def _request(self, prompt: Any, negative_prompt: str | None, height: int | None, width: int | None,
                 num_frames: int | None, num_inference_steps: int | None, guidance_scale: float | None,
                 generator: Any, seed: int | None, output_type: str, guidance_scale_2: float | None = None) -> GenerationRequest:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise DitplanError("prompt: give a text or a list of texts.")
        if isinstance(generator, list):
            if len(generator) != len(prompts):
                raise DitplanError(f"generator: {len(generator)} generators for {len(prompts)} prompts; give one per prompt.")
            generators = generator
        else:
            base = seed if seed is not None else (generator.initial_seed() if generator is not None else 0)
            generators = [torch.Generator("cpu").manual_seed(int(base) + i) for i in range(len(prompts))]
        return GenerationRequest(
            prompts=prompts, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames if self.adapter.is_video else None, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generators=generators, output_type=output_type, guidance_scale_2=guidance_scale_2,
        )

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", num_frames: int | None = None, seed: int | None = None,
                 return_dict: bool = True, guidance_scale_2: float | None = None) -> Any:
        """Generate; rank 0 returns the pipeline-like output (`.images` or `.frames`), other ranks None.

        `guidance_scale_2`: the low-noise expert's guidance scale (two-expert pipelines, as diffusers')."""
        started = now(self.device)
        timings = RunTimings()
        for handle in self._sp_handles:
            handle.new_generation()
        request = self._request(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                                guidance_scale, generator, seed, output_type, guidance_scale_2)
        job = self.adapter.prepare(request)
        # Refuse, on every rank alike and before any collective, what this plan cannot do at this size.
        problems = model_problems(self.config, self.adapter, self.model_id, job.height, job.width,
                                  job.num_frames, job.num_steps)
        if self.config.cfg == 2 and not job.do_cfg:
            problems.append(f"cfg=2 but guidance_scale={job.guidance_scale} turns classifier-free guidance off")
        if self.config.pipelines:
            problems.extend(size_problems(job, self.adapter, self.config))
        problems.extend(decode_problems(self.config, self.adapter, job))
        _refuse(self.config, problems)
        self.last_sizes = {"height": job.height, "width": job.width, "frames": job.num_frames,
                           "steps": job.num_steps, "guidance_scale": job.guidance_scale}
        share = _dp_share(len(request.prompts), self.config.dp, self.groups.coordinate("dp"))
        local = job.subset(share) if self.config.dp > 1 else job
        timings.prepare_s = seconds_since(started, self.device)

        latents = None
        loop_started = now(self.device)
        if share:
            progress = _progress_bar(local.num_steps) if self.show_progress else None

            def on_step(index: int, seconds: float) -> None:
                timings.step_s.append(seconds)
                if progress is not None:
                    progress.update()

            try:
                latents = denoise(local, self.adapter, self.config, self.groups, on_step=on_step)
            finally:
                if progress is not None:
                    progress.close()
        timings.loop_s = seconds_since(loop_started, self.device)

        decode_started = now(self.device)
        leader = self.groups.replica_leader
        result = None
        if share and self._decode_group is not None:
            result = decode_in_strips(self.adapter, local, latents, output_type, self._decode_group)
        elif share and leader and latents is not None:
            result = self.adapter.decode(local, latents, output_type)
        timings.decode_s = seconds_since(decode_started, self.device)

        gather_started = now(self.device)
        if self.config.dp > 1:
            result = self._gather_replicas(result if leader else None)
        timings.gather_s = seconds_since(gather_started, self.device)
        timings.end_to_end_s = seconds_since(started, self.device)
        self.last_timings = timings
        if self.rank != 0:
            return None
        if not return_dict:
            return (result,)
        return ParallelOutput(frames=result) if self.adapter.is_video else ParallelOutput(images=result)

    def _gather_replicas(self, local: Any) -> Any:
        """Replica leaders' outputs, in dp order, merged on rank 0 (one object gather). Tensors travel
        from the CPU: rank 0 would unpickle a GPU tensor onto the sender's device."""
        gathered: list[Any] | None = [None] * self.groups.world_size if self.rank == 0 else None
        dist.gather_object(_on_host(local), gathered, dst=0)
        if self.rank != 0:
            return None
        parts = [gathered[r] for r in self.groups.replica_leaders() if gathered[r] is not None]
        return _merge(parts)

    def close(self) -> None:
        """Undo the sequence-parallel processors installed on the transformers."""
        for handle in self._sp_handles:
            handle.remove()
        self._sp_handles = []


def _on_host(value: Any) -> Any:
    """`value` with every tensor in it copied to the CPU (lists and tuples of them too)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(item) for item in value)
    return value


def _merge(parts: list[Any]) -> Any:
    if not parts:
        return None
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, list):
        return [item for part in parts for item in part]
    import numpy as np

    return np.concatenate(parts)


def _dp_share(count: int, dp: int, replica: int) -> list[int]:
    """Prompt indices of one replica: contiguous, near-equal chunks in order (the first ones bigger)."""
    base, extra = divmod(count, dp)
    start = replica * base + min(replica, extra)
    return list(range(start, start + base + (1 if replica < extra else 0)))


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    # disable=None: no bar where stderr is not a terminal (logs would keep its every redraw).
    return tqdm(total=total, desc="denoising", unit="step", leave=False, disable=None)


def _enable_sp(transformer: torch.nn.Module, family: str, groups: ExecutorGroups) -> Any:
    return enable_sequence_parallel(transformer, family, groups.group("ulysses"), groups.group("ring"))


def _check_family(model_id: str | None) -> None:
    """Refuse a model whose profile is of a family the executor does not run (before any process group)."""
    if model_id is None:
        return
    from costmodel.specs import list_models, load_model
    from executor.families import declaration

    if model_id.endswith((".yaml", ".yml")) or model_id in list_models():
        declaration(load_model(model_id).family, subject=f"model {model_id}")


def parallelize(pipe: Any, plan: Any = "cfg=1", cluster: str | None = None, model: str | None = None,
                backend: str | None = None, height: int | None = None, width: int | None = None,
                frames: int | None = None, steps: int | None = None, show_progress: bool | None = None,
                prompts: int | None = None) -> ParallelPipeline:
    """Bind `pipe` to a plan for this job (call inside torchrun, or alone for a one-process plan).

    plan: a plan file path, a `planner.plan.Plan`, a configuration string ("cfg=2,ulysses=2") or
    "auto" (the planner searches `cluster` for the job's world size; `model`, `height`, `width`,
    `frames`, `steps` describe the generation to plan for and default to the model's; `prompts`, the
    number of prompts per call, caps the data-parallel replicas so none is left idle).
    Refuses a plan whose GPU count is not the world size, or that the model cannot take, on every
    rank before any collective.
    """
    _check_family(model or getattr(pipe, "ditplan_model_id", None))
    adapter_for(pipe)  # refuses a pipeline class the executor does not run, by name
    world = launched_world_size()
    from planner.plan import resolve_plan

    resolved = resolve_plan(plan, model=model or model_id_of(pipe), cluster=cluster, gpus=world, height=height,
                            width=width, frames=frames if adapter_for(pipe).is_video else None, steps=steps,
                            max_dp=prompts)
    config, placement, plan_object = resolved.config, resolved.placement, resolved.plan
    if config.world_size != world:
        raise DitplanError(
            f"plan {config} uses {config.world_size} GPUs but this job has {world} process(es); "
            f"launch it with --nproc {config.world_size} (or choose a plan for {world})."
        )
    adapter = adapter_for(pipe)
    model_id = model or getattr(plan_object, "model", None) or model_id_of(pipe)
    size = (getattr(plan_object, "height", None), getattr(plan_object, "width", None),
            getattr(plan_object, "frames", None), getattr(plan_object, "steps", None))
    _refuse(config, model_problems(config, adapter, model_id, *size))
    init_distributed(backend)
    groups = build_groups(config, placement)
    if torch.cuda.is_available():
        pipe.to(torch.device("cuda", torch.cuda.current_device()))
    return ParallelPipeline(pipe, config, placement, groups, plan=plan_object, model_id=model_id, show_progress=show_progress)
