"""Model specs: the DiT architecture figures the cost model needs, loaded strictly from YAML.

Schema: profiles/models/README.md. `load_model("flux-dev")` reads profiles/models/flux-dev.yaml;
`load_model("path/to/model.yaml")` reads that file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from costmodel import strict
from costmodel.errors import DitplanError
from profiles import PROFILES_DIR

MODELS_DIR = PROFILES_DIR / "models"
FAMILIES = ("pixart", "sd3", "flux", "hunyuan", "cogvideox", "latte", "wan", "hunyuan-video", "qwen-image", "sana")
# cross: self-attention over image tokens + cross-attention to text + MLP (PixArt, HunyuanDiT, Latte spatial)
# joint: MM-DiT dual stream; image and text streams each have their own weights, attention is joint
# single: one stream over image+text tokens (Flux single blocks, CogVideoX)
# temporal: attention across frames at each spatial position (Latte), no text
BLOCK_KINDS = ("cross", "joint", "single", "temporal")
# softmax: scaled-dot-product attention; linear: ReLU-kernel linear attention (SANA), whose cost and
# whose state between ranks is a per-head (head_dim + 1) x head_dim key-value summary, not K and V
ATTENTION_KINDS = ("softmax", "linear")
# The deepest DiTs have well under a hundred blocks; the cost model walks the blocks one by one,
# so a count far past any real model is refused rather than walked.
MAX_BLOCKS = 10_000
# The training timesteps of the flow-matching schedulers (the expert boundary is a ratio of them).
TRAIN_TIMESTEPS = 1000


# Counted operator figures of one block (see costmodel.flops.kernels_and_passes) are bounded far
# above any real block: a few hundred eager operators and slab passes.
MAX_BLOCK_KERNELS = 2000
MAX_BLOCK_PASSES = 2000.0


@dataclass(frozen=True)
class BlockGroup:
    kind: str
    count: int
    # Counted from the module (costmodel.profiler.module_count): eager operators one block launches,
    # and the bytes its elementwise operators read and write in slab passes per row. None: the
    # family's figures (costmodel.flops.KERNELS_AND_PASSES) stand in.
    kernels: float | None = None
    passes: float | None = None


@dataclass(frozen=True)
class FaceAttention:
    """ConsisID: after every `every`-th block, the video tokens cross-attend to `tokens` face tokens of
    width `kv_dim` through q/kv/out projections of width `inner_dim`."""

    every: int
    tokens: int
    inner_dim: int
    kv_dim: int


@dataclass(frozen=True)
class TextEncoder:
    name: str
    params: float


@dataclass(frozen=True)
class ModelSpec:
    """One DiT pipeline's figures; `blocks` is the transformer's block sequence in execution order."""

    id: str
    family: str
    source: str
    uses_cfg: bool
    default_steps: int
    default_height: int
    default_width: int
    default_frames: int
    dtype_bytes: int
    params: float
    hidden_size: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    mlp_ratio: float
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    skip_connections: bool
    cross_attention_dim: int  # width of the text states the cross-attention's k/v read
    attention: str  # ATTENTION_KINDS
    face_attention: "FaceAttention | None"
    experts: int  # transformers of the same shape taking turns over the steps (Wan 2.2 A14B: 2)
    expert_boundary_ratio: float  # the first expert runs while t >= this x the training timesteps
    flow_shift: float  # the scheduler's shift of its flow-matching sigmas (where the boundary falls among the steps)
    blocks: tuple[BlockGroup, ...]
    text_tokens: int
    text_hidden: int
    text_joins_attention: bool
    encoders: tuple[TextEncoder, ...]
    vae_params: float
    vae_spatial_factor: int
    vae_temporal_factor: int
    vae_latent_channels: int
    vae_decode_flops_per_pixel: float
    path: str

    @cached_property  # the spec is frozen; simulations ask for it on every prediction
    def num_blocks(self) -> int:
        return sum(group.count for group in self.blocks)

    @cached_property
    def block_sequence(self) -> tuple[str, ...]:
        """Every block's kind, in execution order."""
        return tuple(group.kind for group in self.blocks for _ in range(group.count))

    @property
    def has_temporal_blocks(self) -> bool:
        """Latte: spatial blocks attend within each frame, temporal blocks across frames."""
        return any(group.kind == "temporal" for group in self.blocks)

    @cached_property
    def pipeline_units(self) -> tuple[tuple[int, ...], ...]:
        """Block indices grouped into the pieces a PipeFusion stage boundary may not cut: a temporal
        block runs in the same loop iteration as the spatial block before it (Latte), so the two stay
        on one stage; every other block is a unit of its own."""
        units: list[list[int]] = []
        for index, kind in enumerate(self.block_sequence):
            if kind == "temporal" and units:
                units[-1].append(index)
            else:
                units.append([index])
        return tuple(tuple(unit) for unit in units)

    @property
    def linear_attention(self) -> bool:
        return self.attention == "linear"

    @property
    def resident_params(self) -> float:
        """Transformer parameters held in memory: every expert stays loaded, one runs per step."""
        return self.params * self.experts

    def step_experts(self, steps: int) -> tuple[int, ...]:
        """The expert each of `steps` steps runs (0: the first, 1: the second).

        The steps' timesteps are those of the flow-matching schedulers Wan's pipelines use (UniPC
        with flow sigmas): sigmas evenly spaced from 1 down to 1/1000, shifted to
        shift x s / (1 + (shift - 1) x s), times 1000 training timesteps, truncated to integers;
        the first expert runs while t >= expert_boundary_ratio x 1000, as the pipeline decides."""
        if self.experts == 1:
            return (0,) * steps
        boundary = self.expert_boundary_ratio * TRAIN_TIMESTEPS
        shift = self.flow_shift
        experts = []
        for i in range(steps):
            s = 1.0 - i * (1.0 - 1.0 / TRAIN_TIMESTEPS) / steps
            t = int(shift * s / (1.0 + (shift - 1.0) * s) * TRAIN_TIMESTEPS)
            experts.append(0 if t >= boundary else 1)
        return tuple(experts)

    @property
    def encoder_params(self) -> float:
        return sum(encoder.params for encoder in self.encoders)

    @property
    def is_video(self) -> bool:
        return self.default_frames > 1

    def latent_frames(self, frames: int) -> int:
        """Latent frames after the VAE's temporal compression (CogVideoX: 49 frames -> 13)."""
        if self.vae_temporal_factor == 1:
            return frames
        return (frames - 1) // self.vae_temporal_factor + 1

    def token_grid(self, height: int, width: int, frames: int) -> tuple[int, int, int]:
        """(token frames, token rows, token columns) after the VAE and the patch embedding."""
        rows = height // self.vae_spatial_factor // self.patch_size
        cols = width // self.vae_spatial_factor // self.patch_size
        # CogVideoX 1.5 pads the latent frames up to a multiple of its temporal patch (21 -> 22).
        return max(1, -(-self.latent_frames(frames) // self.temporal_patch_size)), rows, cols

    def image_tokens(self, height: int, width: int, frames: int) -> int:
        tframes, rows, cols = self.token_grid(height, width, frames)
        return tframes * rows * cols


def list_models() -> list[str]:
    """Ids of the built-in models, real ones first, then the tiny ones."""
    names = sorted(path.stem for path in MODELS_DIR.glob("*.yaml"))
    return [n for n in names if not n.startswith("tiny-")] + [n for n in names if n.startswith("tiny-")]


def load_model(name_or_path: "str | ModelSpec") -> ModelSpec:
    """A model id or a YAML path -> ModelSpec; every schema break is a DitplanError naming file and key."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    return _load_model_file(str(strict.profile_path(str(name_or_path), MODELS_DIR, "model", list_models).resolve()))


@lru_cache(maxsize=64)
def _load_model_file(path_text: str) -> ModelSpec:
    path = Path(path_text)
    data = strict.read_yaml(path)
    w = str(path)
    strict.check_keys(
        data, w,
        ("id", "family", "source", "uses_cfg", "default_steps", "default_height", "default_width",
         "dtype_bytes", "transformer", "text", "vae"),
        ("default_frames", "build", "notes"),
    )
    tw = f"{w}: transformer"
    tr = strict.check_keys(
        data["transformer"], tw,
        ("params", "hidden_size", "num_heads", "head_dim", "mlp_ratio", "patch_size", "in_channels", "blocks"),
        ("num_kv_heads", "temporal_patch_size", "skip_connections", "cross_attention_dim", "repeat", "attention",
         "experts", "expert_boundary_ratio", "flow_shift", "face_attention", "notes"),
    )
    repeat = strict.integer(tr, "repeat", tw, maximum=MAX_BLOCKS, default=1)
    groups = []
    for index, entry in enumerate(strict.sequence(tr, "blocks", tw)):
        bw = f"{tw}.blocks[{index}]"
        strict.check_keys(entry, bw, ("kind", "count"), ("kernels", "passes"))
        counted = {key: strict.number(entry, key, bw, maximum=bound) if key in entry else None
                   for key, bound in (("kernels", MAX_BLOCK_KERNELS), ("passes", MAX_BLOCK_PASSES))}
        if (counted["kernels"] is None) != (counted["passes"] is None):
            raise DitplanError(f"{bw}: 'kernels' and 'passes' are counted together; give both or neither.")
        groups.append(BlockGroup(strict.text(entry, "kind", bw, choices=BLOCK_KINDS),
                                 strict.integer(entry, "count", bw, maximum=MAX_BLOCKS), **counted))
    blocks = tuple(groups) * repeat
    if sum(group.count for group in blocks) > MAX_BLOCKS:
        raise DitplanError(f"{tw}.blocks: {sum(group.count for group in blocks)} blocks in all (counts x repeat) is not "
                           f"allowed; a model has at most {MAX_BLOCKS}.")
    xw = f"{w}: text"
    tx = strict.check_keys(data["text"], xw, ("tokens", "hidden", "joins_attention", "encoders"), ("notes",))
    encoders = []
    for index, entry in enumerate(strict.sequence(tx, "encoders", xw)):
        ew = f"{xw}.encoders[{index}]"
        strict.check_keys(entry, ew, ("name", "params"), ("notes",))
        encoders.append(TextEncoder(strict.text(entry, "name", ew), strict.number(entry, "params", ew)))
    vw = f"{w}: vae"
    va = strict.check_keys(
        data["vae"], vw, ("params", "spatial_factor", "latent_channels"),
        ("temporal_factor", "decode_flops_per_pixel", "notes"),
    )
    hidden = strict.integer(tr, "hidden_size", tw)
    heads = strict.integer(tr, "num_heads", tw)
    head_dim = strict.integer(tr, "head_dim", tw)
    if heads * head_dim != hidden:
        raise DitplanError(f"{tw}: num_heads x head_dim = {heads} x {head_dim} = {heads * head_dim} must equal hidden_size {hidden}.")
    kv_heads = strict.integer(tr, "num_kv_heads", tw, default=heads)
    if heads % kv_heads:
        raise DitplanError(f"{tw}.num_kv_heads: {kv_heads} must divide num_heads {heads}.")
    model_id = strict.text(data, "id", w)
    if model_id != path.stem and path.parent.resolve() == MODELS_DIR.resolve():
        raise DitplanError(f"{w}.id: {model_id!r} must equal the file name {path.stem!r}.")
    experts = strict.integer(tr, "experts", tw, default=1)
    boundary = strict.number(tr, "expert_boundary_ratio", tw, default=0.0)
    if experts not in (1, 2):
        raise DitplanError(f"{tw}.experts: {experts} is not supported; it must be 1 or 2 "
                           "(a high-noise then a low-noise expert).")
    if experts == 2 and not 0.0 < boundary < 1.0:
        raise DitplanError(f"{tw}.expert_boundary_ratio: {boundary} must be between 0 and 1 (exclusive) "
                           "for two experts.")
    flow_shift = strict.number(tr, "flow_shift", tw, default=1.0)
    face = None
    if "face_attention" in tr:
        fw = f"{tw}.face_attention"
        fa = strict.check_keys(tr["face_attention"], fw, ("every", "tokens", "inner_dim", "kv_dim"), ("notes",))
        face = FaceAttention(*(strict.integer(fa, key, fw) for key in ("every", "tokens", "inner_dim", "kv_dim")))
    dtype_bytes = strict.integer(data, "dtype_bytes", w)
    if dtype_bytes not in (1, 2, 4):
        raise DitplanError(f"{w}.dtype_bytes: {dtype_bytes} is not allowed; it must be 1, 2 or 4.")
    return ModelSpec(
        id=model_id,
        family=strict.text(data, "family", w, choices=FAMILIES),
        source=strict.text(data, "source", w),
        uses_cfg=strict.boolean(data, "uses_cfg", w),
        default_steps=strict.integer(data, "default_steps", w),
        default_height=strict.integer(data, "default_height", w),
        default_width=strict.integer(data, "default_width", w),
        default_frames=strict.integer(data, "default_frames", w, default=1),
        dtype_bytes=dtype_bytes,
        params=strict.number(tr, "params", tw),
        hidden_size=hidden,
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=kv_heads,
        mlp_ratio=strict.number(tr, "mlp_ratio", tw),
        patch_size=strict.integer(tr, "patch_size", tw),
        temporal_patch_size=strict.integer(tr, "temporal_patch_size", tw, default=1),
        in_channels=strict.integer(tr, "in_channels", tw),
        skip_connections=strict.boolean(tr, "skip_connections", tw, default=False),
        cross_attention_dim=strict.integer(tr, "cross_attention_dim", tw, default=hidden),
        attention=strict.text(tr, "attention", tw, choices=ATTENTION_KINDS, default="softmax"),
        face_attention=face,
        experts=experts,
        expert_boundary_ratio=boundary,
        flow_shift=flow_shift,
        blocks=blocks,
        text_tokens=strict.integer(tx, "tokens", xw),
        text_hidden=strict.integer(tx, "hidden", xw),
        text_joins_attention=strict.boolean(tx, "joins_attention", xw),
        encoders=tuple(encoders),
        vae_params=strict.number(va, "params", vw),
        vae_spatial_factor=strict.integer(va, "spatial_factor", vw),
        vae_temporal_factor=strict.integer(va, "temporal_factor", vw, default=1),
        vae_latent_channels=strict.integer(va, "latent_channels", vw),
        # The SD-style VAE decoder costs about 6 MFLOP per output pixel: each up level runs six 3x3
        # convolutions (2 x 9 x C^2 FLOPs per pixel each) at 512 ch on H/4, 256 ch on H/2 and 128 ch on
        # H, plus the 512-ch mid block: ~1.6 TFLOP for a 512x512 image.
        vae_decode_flops_per_pixel=strict.number(va, "decode_flops_per_pixel", vw, default=6e6),
        path=str(path),
    )
