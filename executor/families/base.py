"""The family adapter interface: what the denoising loop (and PipeFusion) needs from a pipeline.

A diffusers pipeline's `__call__` mixes four things: preparing inputs (prompt encoding, initial
latents, timesteps), calling the transformer, combining guidance and stepping the scheduler, and
decoding. The executor has to cut that loop apart (CFG halves on different ranks, prompts on
different replicas, patches on different stages), so each family gets an adapter that exposes those
pieces separately while reusing the pipeline's own methods (`encode_prompt`, `prepare_latents`,
`retrieve_timesteps`, the VAE and its image/video processor).

Contract (the SP and PipeFusion code relies on it):

* `adapter.prepare(request)` returns a `DenoiseJob` for the request's prompts (under no_grad: CPU
  attention picks another kernel when gradients are on, which would change the last bits). It consumes the
  request's generators exactly as the pipeline's `__call__` does (latents first, then the scheduler
  steps), so running the loop on a job reproduces `pipe(..., output_type="latent")`.
* Guidance branches are named `"uncond"` and `"cond"`; when both are batched together the order is
  `("uncond", "cond")`, as every diffusers pipeline concatenates them.
* `adapter.transformer_kwargs(job, latents, t, branches)` gives the complete keyword arguments of
  one `transformer(**kwargs)` call over the given branches (batch = len(branches) * job.batch_size);
  `adapter.noise_prediction(job, output)` turns the transformer's output tensor into the noise
  prediction the scheduler takes (learned-sigma halves dropped, dtype fixed), per branch batch.
* `adapter.combine_guidance(job, uncond, cond, step_index, t)` and `adapter.step(job, noise, t,
  latents, step_index)` are the per-step arithmetic after the transformer; every rank that holds the
  same latents and noise gets bit-identical results.
* `adapter.decode(job, latents, output_type)` returns what the pipeline would return as images
  (PIL list, numpy, or per-prompt frame lists for video).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import torch

from costmodel.errors import DitplanError

if TYPE_CHECKING:  # the family modules import these; base.py stays importable on its own
    from executor.pipefusion.stages import StagedTransformer
    from executor.sp import SequenceParallelHandle
    from executor.sp.processors import SequenceShard

BRANCHES: tuple[str, ...] = ("uncond", "cond")


@dataclass
class GenerationRequest:
    """One call's inputs, already normalised (what the user passed to the parallel pipeline).

    `generators` holds one torch.Generator per prompt (the executor seeds prompt i with seed + i), so
    any split of the prompts across replicas draws the same noise for each prompt as one batch does.
    `height`, `width`, `num_frames`, `num_inference_steps` and `guidance_scale` of None take the
    pipeline's defaults.
    """

    prompts: list[str]
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    generators: list[torch.Generator] | None = None
    output_type: str = "pil"
    # The low-noise expert's guidance scale (two-expert pipelines; None: `guidance_scale`).
    guidance_scale_2: float | None = None

    def subset(self, indices: Sequence[int]) -> "GenerationRequest":
        """The same request for a subset of the prompts (data parallelism)."""
        generators = None if self.generators is None else [self.generators[i] for i in indices]
        return replace(self, prompts=[self.prompts[i] for i in indices], generators=generators)


@dataclass
class DenoiseJob:
    """Everything one denoising loop needs, for a batch of `batch_size` prompts.

    latents: the initial latents in the layout the transformer and scheduler use (`latent_layout`:
        "BCHW" for PixArt/SD3/HunyuanDiT, "BSC" for Flux's packed 2x2 tokens in row-major order,
        "BFCHW" for CogVideoX, "BCFHW" for Latte).
    timesteps: the scheduler's timesteps for this job, in loop order.
    scheduler: a private copy of the pipeline's scheduler with `set_timesteps` done (stateful:
        multistep solvers keep history, so each job steps its own copy).
    branch_inputs: per guidance branch ("cond", and "uncond" when CFG is on), the transformer keyword
        arguments that carry a batch dimension of `batch_size` (text states, masks, pooled states,...).
    shared_inputs: transformer keyword arguments without a batch dimension (rotary tables, position
        ids, flags), identical for every branch.
    guidance_scale: the CFG weight (Flux-dev: the embedded guidance; CFG itself off).
    token_grid: (frames, rows, cols) of image tokens the transformer attends over, after patchify;
        PipeFusion splits `rows` into patches, SP splits the flattened sequence.
    extras: family-specific values (scheduler step kwargs, sizes for decoding, learned-sigma flag...).
    expert_boundary: where the pipeline has two experts (Wan 2.2 A14B), the timestep from which down
        the second runs (`expert_of`); None: one transformer runs every step.
    """

    family: str
    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    branch_inputs: dict[str, dict[str, Any]]
    shared_inputs: dict[str, Any]
    guidance_scale: float
    batch_size: int
    height: int
    width: int
    num_frames: int
    latent_layout: str
    token_grid: tuple[int, int, int]
    output_type: str = "pil"
    extras: dict[str, Any] = field(default_factory=dict)
    expert_boundary: float | None = None

    def expert_of(self, t: Any) -> int:
        """Which of the adapter's `experts` runs timestep t: the first while t >= expert_boundary,
        the second below it (the rule of Wan 2.2's pipeline)."""
        return 0 if self.expert_boundary is None or t >= self.expert_boundary else 1

    @property
    def step_experts(self) -> list[int]:
        """The expert of each step, in loop order."""
        return [self.expert_of(t) for t in self.timesteps]

    @property
    def do_cfg(self) -> bool:
        """True when the job has an unconditional branch (classifier-free guidance)."""
        return "uncond" in self.branch_inputs

    @property
    def branches(self) -> tuple[str, ...]:
        """The guidance branches in the order diffusers batches them."""
        return tuple(b for b in BRANCHES if b in self.branch_inputs)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def subset(self, indices: Sequence[int]) -> "DenoiseJob":
        """This job for some of its prompts (data parallelism).

        Preparing once for all prompts and then taking rows keeps every prompt's inputs exactly what
        the whole batch gives (some pipelines encode text differently for a batch of one: Latte
        trims the padding only then), so any split of the prompts reproduces the batched run.
        """
        rows = list(indices)
        extras = dict(self.extras)
        step_kwargs = dict(extras.get("step_kwargs") or {})
        if isinstance(step_kwargs.get("generator"), list):
            step_kwargs["generator"] = [step_kwargs["generator"][i] for i in rows]
        if step_kwargs:
            extras["step_kwargs"] = step_kwargs
        return replace(
            self,
            latents=self.latents[rows],
            scheduler=copy.deepcopy(self.scheduler),
            branch_inputs={b: {k: _take_rows(v, rows) for k, v in inputs.items()} for b, inputs in self.branch_inputs.items()},
            batch_size=len(rows),
            extras=extras,
        )


def _take_rows(value: Any, rows: list[int]) -> Any:
    if isinstance(value, dict):
        return {key: _take_rows(item, rows) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value[rows]
    return value


def concat_batches(values: list[Any]) -> Any:
    """Concatenate per-branch values along the batch dimension (tensors, dicts of them, or None)."""
    first = values[0]
    if len(values) == 1 or first is None:
        return first
    if isinstance(first, dict):
        return {key: concat_batches([value[key] for value in values]) for key in first}
    return torch.cat(values)


class RequestBasics(NamedTuple):
    """See `FamilyAdapter.basics`."""

    height: int
    width: int
    steps: int
    guidance: float
    do_cfg: bool
    batch: int


class FamilyAdapter:
    """Base adapter: subclasses set the class attributes and implement `prepare` and `decode`.

    The defaults here implement the pieces most families share (the transformer call layout,
    standard CFG, a plain `scheduler.step`).
    """

    family: ClassVar[str] = ""
    latent_layout: ClassVar[str] = "BCHW"
    # The transformer's keyword for the (noisy) latent input and for the timestep.
    latent_kwarg: ClassVar[str] = "hidden_states"
    timestep_kwarg: ClassVar[str] = "timestep"
    # Video families take `num_frames`; image families ignore it.
    is_video: ClassVar[bool] = False
    # Branch inputs holding text states (their token counts add up to what the transformer sees).
    text_state_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def experts(self) -> list[torch.nn.Module]:
        """The transformers that take turns over the steps (`DenoiseJob.expert_of`): the transformer
        alone, or Wan 2.2 A14B's high-noise and low-noise experts. Parallel methods install on each."""
        return [self.transformer]

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether a job at this guidance scale has an unconditional branch."""
        return guidance_scale > 1.0

    def default_guidance_scale(self) -> float:
        """The pipeline `__call__`'s default guidance scale."""
        return float(self.call_default("guidance_scale"))

    def default_steps(self) -> int:
        return int(self.call_default("num_inference_steps"))

    def call_default(self, name: str) -> Any:
        """The default of a pipeline `__call__` parameter (so the adapter behaves as the pipeline does)."""
        return inspect.signature(self.pipe.__call__).parameters[name].default

    # -- preparing ---------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        """Encode prompts, draw initial latents, set timesteps: a job for `request`'s prompts."""
        raise NotImplementedError

    def fresh_scheduler(self) -> Any:
        """A private copy of the pipeline's scheduler (set_timesteps must be called on it)."""
        return copy.deepcopy(self.pipe.scheduler)

    def basics(self, request: GenerationRequest, default_height: int, default_width: int | None = None) -> "RequestBasics":
        """What every `prepare` starts from: the request's size (or the family's default), steps and
        guidance scale (or the pipeline's), whether it runs an unconditional branch, its prompt count.
        Refuses a second guidance scale where no second expert takes it."""
        steps, guidance = self.steps_and_guidance(request)
        if request.guidance_scale_2 is not None and len(self.experts) == 1:
            raise DitplanError(f"guidance_scale_2={request.guidance_scale_2}: it guides the second of two experts, and "
                               f"this {self.family} pipeline has one transformer.")
        return RequestBasics(
            height=request.height or default_height, width=request.width or (default_width or default_height),
            steps=steps, guidance=guidance, do_cfg=self.uses_cfg(guidance), batch=len(request.prompts),
        )

    def steps_and_guidance(self, request: GenerationRequest) -> tuple[int, float]:
        """The request's steps and guidance scale, or the pipeline's defaults."""
        steps = request.num_inference_steps or self.default_steps()
        guidance = self.default_guidance_scale() if request.guidance_scale is None else float(request.guidance_scale)
        return int(steps), guidance

    # -- one transformer call -------------------------------------------------------------------
    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latent as the transformer reads it at timestep t (scheduler input scaling)."""
        return job.scheduler.scale_model_input(latents, t)

    def timestep_input(self, job: DenoiseJob, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The timestep tensor for a transformer batch of `batch` rows."""
        return t.expand(batch)

    def transformer_kwargs(
        self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor, branches: Sequence[str]
    ) -> dict[str, Any]:
        """Keyword arguments for one `transformer(**kwargs)` call over `branches`, batched in order.

        `latents` has `job.batch_size` rows; the transformer input repeats it once per branch.
        """
        branches = tuple(branches)
        model_input = self.model_input(job, latents, t)
        hidden = torch.cat([model_input] * len(branches)) if len(branches) > 1 else model_input
        kwargs: dict[str, Any] = {
            self.latent_kwarg: hidden,
            self.timestep_kwarg: self.timestep_input(job, t, hidden.shape[0]),
            **self.batched_inputs(job, branches),
        }
        kwargs["return_dict"] = False
        return kwargs

    def batched_inputs(self, job: DenoiseJob, branches: Sequence[str]) -> dict[str, Any]:
        """The transformer keyword arguments of `branches` besides the latents and the timestep: the
        branch inputs concatenated in order, then the shared inputs."""
        kwargs = {key: concat_batches([job.branch_inputs[b][key] for b in branches]) for key in job.branch_inputs[branches[0]]}
        kwargs.update(job.shared_inputs)
        return kwargs

    def model_output(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
        """The transformer's output over `branches`, batched in order: one call of the expert of
        timestep t, as most pipelines make it."""
        return self.experts[job.expert_of(t)](**self.transformer_kwargs(job, latents, t, branches))[0]

    def noise_prediction(self, job: DenoiseJob, output: torch.Tensor) -> torch.Tensor:
        """The scheduler-ready noise from the transformer's output tensor (default: as is)."""
        return output

    def combine_guidance(
        self, job: DenoiseJob, uncond: torch.Tensor, cond: torch.Tensor, step_index: int, t: torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance: uncond + w * (cond - uncond)."""
        return uncond + job.guidance_scale * (cond - uncond)

    def step(self, job: DenoiseJob, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        """One scheduler step x_t -> x_{t-1} with the job's scheduler."""
        return job.scheduler.step(noise, t, latents, **job.extras.get("step_kwargs", {}), return_dict=False)[0]

    # -- the end ------------------------------------------------------------------------------
    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        """Final latents -> images as the pipeline returns them ("latent" returns the latents)."""
        raise NotImplementedError


# -- the family declaration ---------------------------------------------------------------------
@dataclass(frozen=True)
class BlockDescription:
    """A built transformer's blocks in the cost model's terms (the figures a tiny model's YAML holds).

    `blocks` are the cost model's block groups ([{"kind": "cross", "count": 4}, ...]); `mlp_width` the
    MLP's inner width (the YAML's mlp_ratio is it over the hidden size); `figures` the `transformer:`
    fields this family reads otherwise than from `num_attention_heads`, `attention_head_dim`,
    `patch_size` and `in_channels` of the config (Flux packs 2x2 latent pixels per token, HunyuanDiT
    has long skips, ...).
    """

    blocks: list[dict[str, Any]]
    mlp_width: int
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TinyTransformer:
    """A seeded tiny transformer of one family and inputs shaped as its pipeline passes them.

    `latents` has `batch` rows; with `guided` (classifier-free guidance) they are the rows
    [uncond, cond] of one sample, else independent samples. `inputs` holds every keyword argument of
    a transformer call except the latents and the timestep. `make_scheduler()` gives a fresh
    scheduler of the kind the family's pipeline uses.
    """

    model: torch.nn.Module
    latents: torch.Tensor
    inputs: dict[str, Any]
    make_scheduler: Callable[[], Any]
    guided: bool = True
    latent_kwarg: str = "hidden_states"
    # The transformer takes the scheduler's timestep divided by this (Flux: sigma = t / 1000).
    timestep_divisor: float = 1.0

    def timestep(self, t: float | Sequence[float], batch: int | None = None) -> torch.Tensor:
        """The timestep tensor of one call: scheduler timestep `t` for every row, or one per row."""
        rows = batch if batch is not None else self.latents.shape[0]
        values = [float(v) for v in t] if isinstance(t, Sequence) else [float(t)] * rows
        timesteps = torch.tensor(values, dtype=torch.float32)
        return timesteps if self.timestep_divisor == 1.0 else timesteps / self.timestep_divisor

    def call_kwargs(self, t: float | Sequence[float] = (500.0, 250.0)) -> dict[str, Any]:
        """Every keyword argument of `model(**kwargs)` on the latents at scheduler timestep(s) `t`."""
        return {self.latent_kwarg: self.latents, "timestep": self.timestep(t), **self.inputs, "return_dict": False}


SequenceParallelInstaller = Callable[[torch.nn.Module, "SequenceShard", "SequenceParallelHandle"], None]


@dataclass(frozen=True)
class Family:
    """Everything the executor knows about one DiT family, declared once in its module
    (`executor/families/<module>.py` ends with `FAMILY = Family(...)`); every registry of the
    executor is derived from these declarations (see `executor.families`).
    """

    # The cost model's family id (`costmodel.specs.FAMILIES`, a model YAML's `family:`).
    name: str
    # diffusers pipeline class name -> ditplan model id of its usual checkpoint (what plan="auto"
    # plans for when the pipeline does not say which model it is).
    pipelines: Mapping[str, str]
    adapter: type[FamilyAdapter]
    # (transformer, shard, handle) -> None: registers on `handle` the hooks that cut the family's
    # tokens (and rotary tables) to this rank's share, and installs the SP attention processors.
    install_sequence_parallel: SequenceParallelInstaller
    # The SP attention processor class that PipeFusion x SP installs in a stage's stale-KV layers.
    sp_processor: type
    # The PipeFusion cutter: the transformer's forward piece by piece.
    stages: type[StagedTransformer]
    # tiny_transformer(seed=0, batch=2, rows=16, cols=16, layers=4, heads=4, head_dim=8): a seeded
    # tiny transformer and matching inputs, for single-transformer tests (rows, cols: latent size).
    tiny_transformer: Callable[..., TinyTransformer]
    # Built transformer -> its blocks in the cost model's terms (the tiny YAMLs' figures).
    describe_blocks: Callable[[torch.nn.Module], BlockDescription]
    # Whether text tokens join the image tokens' self-attention (SD3, Flux, CogVideoX).
    joins_attention: bool
    # Transformer config overrides for the cheapest model with the same buffers (stage loading
    # copies the non-persistent buffers from it): one block of each kind.
    one_block_config: Mapping[str, Any] = field(default_factory=lambda: {"num_layers": 1})
    # For a pipeline class whose checkpoints differ in configuration (Flux: dev embeds the guidance
    # scale, schnell does not): loaded pipeline -> ditplan model id. None: `pipelines` says.
    checkpoint_of: Callable[[Any], str] | None = None

    def model_id_of(self, pipe: Any) -> str | None:
        """The ditplan model id of a loaded pipeline of this family's usual checkpoint."""
        if self.checkpoint_of is not None:
            return self.checkpoint_of(pipe)
        return self.pipelines.get(type(pipe).__name__)
