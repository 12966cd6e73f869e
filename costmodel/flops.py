"""FLOPs and bytes of one transformer block, and of one whole denoising step, counted from its operations.

Every block is listed as the operations eager diffusers runs (after the rank's share of the work):
its GEMMs (m x k) @ (k x n), its attention calls (batch x heads, queries, keys), and its elementwise
traffic. The compute model (`costmodel.compute`) prices exactly these lists, and the same lists give
the FLOP figures `ditplan simulate` reports, so what is priced and what is counted cannot drift apart.
Conventions: 2 FLOPs per multiply-add; attention counts QK^T and PV (4 x queries x keys x head_dim
per head); the elementwise rest counts one FLOP per element an operator writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from costmodel.specs import ModelSpec

# Per (family, block kind): operators launched per block and elementwise slab passes (reads + writes
# of batch x tokens x hidden x dtype, per row through the block). Every shipped profile carries its
# model's own figures, counted from one forward of its module on the meta device
# (costmodel.profiler.module_count: every aten operator but views and allocations is a kernel; an
# attention call is one kernel; the passes are the bytes the non-matmul operators read and write);
# `ditplan models import` counts them too. These are the same counts for one model of each family,
# standing in for a profile written without them. Where the bytes go, counted: residual adds and gated
# residuals, adaLN modulation, LayerNorm/RMSNorm (RMSNorm in fp32), GELU over the MLP's 4x wider
# activation, the fp32 rotary embedding on q and k, and the layout copies around attention.
KERNELS_AND_PASSES: dict[tuple[str, str], tuple[float, float]] = {
    ("pixart", "cross"): (31, 41.0),  # PixArt-alpha: ada_norm_single BasicTransformerBlock
    ("latte", "cross"): (31, 41.0),  # the same block as PixArt's (spatial)
    ("latte", "temporal"): (23, 35.4),  # self-attention over frames + MLP
    ("hunyuan", "cross"): (71.3, 153.6),  # HunyuanDiT: LayerNorm q/k, 2-D rotary, long skips in half the blocks
    ("sd3", "joint"): (50.4, 41.9),  # SD3-medium (SD3.5-large's fp32 q/k RMSNorm adds 32 kernels)
    ("flux", "joint"): (95, 130.5),  # Flux: fp32 RMSNorm on q/k of both streams, rotary embeddings
    ("flux", "single"): (50, 125.5),  # fused qkv + MLP-in, concat [attention, MLP], fused out
    ("cogvideox", "single"): (59, 97.4),  # CogVideoX-5b (2b, without rotary: 41 kernels, 40 passes)
    ("wan", "cross"): (90, 185.2),  # Wan 14B: fp32 LayerNorm + modulate, RMSNorm q/k, 3-D rotary
    ("hunyuan-video", "joint"): (95, 122.3),  # Flux's double block
    ("hunyuan-video", "single"): (54, 125.3),  # Flux's single block
    ("qwen-image", "joint"): (95, 94.3),  # Flux-like double block, rotary on both streams' q/k
    ("sana", "cross"): (46.1, 88.0),  # linear attention's fp32 casts, GLUMBConv MLP with SiLU gating
}
# Families whose single-stream blocks fuse q/k/v with the MLP input and the attention output with the
# MLP output (one GEMM each); CogVideoX keeps them separate.
FUSED_SINGLE_FAMILIES = ("flux", "hunyuan-video")
# Families whose MLP is SANA's GLUMBConv: a 1x1 convolution to 2 x mlp channels (value and gate), a
# depthwise 3x3 convolution over the token grid, SiLU gating and a 1x1 convolution back.
GLU_CONV_FAMILIES = ("sana",)
DEPTHWISE_TAPS = 9
# Families whose last joint block only feeds the text into its attention (diffusers' SD3 blocks with
# `context_pre_only`): the text's q/k/v projection runs, its output projection and MLP do not.
CONTEXT_PRE_ONLY_FAMILIES = ("sd3",)
DEFAULT_KERNELS_AND_PASSES: dict[str, tuple[float, float]] = {
    "cross": (31, 41.0), "joint": (50.4, 41.9), "single": (50, 125.5), "temporal": (23, 35.4),
}


def kernels_and_passes(model: ModelSpec, kind: str) -> tuple[float, float]:
    """(eager operators per block, elementwise slab passes per row) of the model's `kind` blocks:
    counted from its module where its profile gives them, else its family's."""
    for group in model.blocks:
        if group.kind == kind and group.kernels is not None and group.passes is not None:
            return group.kernels, group.passes
    return KERNELS_AND_PASSES.get((model.family, kind), DEFAULT_KERNELS_AND_PASSES[kind])


@lru_cache(maxsize=256)
def _last_joint(sequence: tuple[str, ...]) -> int:
    return len(sequence) - 1 - sequence[::-1].index("joint")


def text_output(model: ModelSpec, index: int, kind: str) -> bool:
    """Whether block `index` (of `kind`) carries the joint text on past its attention."""
    if kind != "joint" or model.family not in CONTEXT_PRE_ONLY_FAMILIES:
        return True
    return index != _last_joint(model.block_sequence)  # every block cost asks; the answer is per model


@dataclass(frozen=True)
class BlockWork:
    """What one rank computes in one block: `rows` are batch x tokens through the projections.

    The self/joint attention runs `attn_groups` independent sequences per sample and head, each of
    `attn_queries` queries over `attn_keys` keys: one sequence for most blocks, one per frame for
    Latte's spatial blocks, one per spatial position for its temporal blocks.
    """

    kind: str
    batch: int
    image_tokens: int  # local image tokens through the projections and MLP
    text_tokens: int  # local text tokens through the projections (joint/single blocks)
    attn_queries: int  # query tokens of one self/joint attention sequence
    attn_keys: int  # key tokens each query sees
    head_fraction: float  # share of the heads this rank computes attention for (1/ulysses)
    skip_linear: bool = False  # HunyuanDiT: this block fuses a long skip (a 2h -> h linear)
    attn_groups: int = 1  # independent attention sequences per sample (Latte: frames, or positions)
    text_output: bool = True  # False: the joint text only enters the attention (`text_output`)


@dataclass(frozen=True)
class BlockOps:
    """The operations of one block on one rank."""

    gemms: tuple[tuple[int, int, int], ...]  # (m, k, n)
    self_attention: tuple[float, int, int]  # (batch x heads, queries, keys): the one SP splits
    other_attention: tuple[tuple[float, int, int], ...]  # cross-attention to the text
    elementwise_bytes: float  # bytes the elementwise operators read and write
    slab_bytes: float  # one pass's size (decides whether a chain stays in L2)
    activation_elements: float  # elements through the MLP's activation


@dataclass(frozen=True)
class Flops:
    """FLOPs by kind, and the bytes the operations move (each operand read, each result written once)."""

    linear: float = 0.0
    attention: float = 0.0
    other: float = 0.0
    bytes: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.other

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.linear + other.linear, self.attention + other.attention, self.other + other.other,
                     self.bytes + other.bytes)

    def __mul__(self, factor: float) -> "Flops":
        return Flops(self.linear * factor, self.attention * factor, self.other * factor, self.bytes * factor)

    def as_dict(self) -> dict[str, float]:
        return {"linear_flops": self.linear, "attention_flops": self.attention, "other_flops": self.other,
                "bytes": self.bytes}


def block_ops(model: ModelSpec, work: BlockWork) -> BlockOps:
    """The GEMMs, attention calls and elementwise traffic of one block, as diffusers runs them."""
    h = model.hidden_size
    b = model.dtype_bytes
    B = work.batch
    img = B * work.image_tokens
    txt = B * work.text_tokens
    mlp = int(round(model.mlp_ratio * h))
    gemms: list[tuple[int, int, int]] = []

    def attention_and_mlp(rows: int) -> None:  # q/k/v and output projections, MLP in and out
        gemms.extend([(rows, h, 3 * h), (rows, h, h)])
        if model.family in GLU_CONV_FAMILIES:  # the depthwise convolution as a GEMM of its 9 taps
            gemms.extend([(rows, h, 2 * mlp), (rows, DEPTHWISE_TAPS, 2 * mlp), (rows, mlp, h)])
        else:
            gemms.extend([(rows, h, mlp), (rows, mlp, h)])

    if work.kind in ("cross", "temporal"):
        attention_and_mlp(img)
    elif work.kind == "joint":
        attention_and_mlp(img)
        if work.text_output:
            attention_and_mlp(txt)
        else:
            gemms.append((txt, h, 3 * h))
    elif work.kind == "single":
        if model.family in FUSED_SINGLE_FAMILIES:  # fused qkv + MLP-in, then fused out over [attention, MLP]
            gemms.extend([(img + txt, h, 3 * h + mlp), (img + txt, h + mlp, h)])
        else:  # CogVideoX: separate projections, one stream over text + video
            attention_and_mlp(img + txt)
    other: list[tuple[float, int, int]] = []
    if work.kind == "cross":
        # Cross-attention to the text: q/out projections on image rows, k/v on the text states (Latte
        # repeats the text for every frame it attends from), every image token (all heads) over the text.
        text_rows = B * model.text_tokens * max(1, work.attn_groups if model.has_temporal_blocks else 1)
        gemms.extend([(img, h, h), (img, h, h), (text_rows, model.cross_attention_dim, 2 * h)])
        other.append((float(B * model.num_heads), work.image_tokens, model.text_tokens))
    face = model.face_attention
    if face is not None and work.kind != "temporal":
        # ConsisID's face cross-attention follows ceil(L / every) of the L blocks: spread evenly over
        # the blocks (the FLOPs are exact, the split between stages is even).
        share = -(-model.num_blocks // face.every) / model.num_blocks
        rows = round(img * share)
        gemms.extend([(rows, h, face.inner_dim), (round(B * face.tokens * share), face.kv_dim, 2 * face.inner_dim),
                      (rows, face.inner_dim, h)])
        other.append((B * face.inner_dim / model.head_dim * share, work.image_tokens, face.tokens))
    if work.skip_linear:
        gemms.append((img, 2 * h, h))
    passes = kernels_and_passes(model, work.kind)[1]  # per row; joint blocks count both streams' rows
    slab = (img + txt) * h * b
    heads = B * model.num_heads * work.head_fraction * work.attn_groups
    if model.linear_attention:
        # ReLU linear attention over the same tokens as queries and keys: the (d+1) x d summary
        # [V; 1]^T K and its product with Q, 2 x 2 x tokens x d x (d+1) FLOPs per head, which is
        # softmax attention's count with d + 1 keys.
        self_attention = (heads, work.attn_queries, model.head_dim + 1)
    else:
        self_attention = (heads, work.attn_queries, work.attn_keys)
    return BlockOps(tuple(gemms), self_attention, tuple(other), passes * slab, slab, float((img + txt) * mlp))


def ops_flops(model: ModelSpec, ops: BlockOps) -> Flops:
    """FLOPs and bytes of a block's operations."""
    b = model.dtype_bytes
    d = model.head_dim
    linear = sum(2.0 * m * k * n for m, k, n in ops.gemms)
    gemm_bytes = sum((m * k + k * n + m * n) * b for m, k, n in ops.gemms)
    attention = 0.0
    attention_bytes = 0.0
    for batch_heads, queries, keys in (ops.self_attention, *ops.other_attention):
        attention += 4.0 * batch_heads * queries * keys * d
        attention_bytes += batch_heads * (2 * queries + 2 * keys) * d * b  # q and output; k and v
    other = ops.elementwise_bytes / (2 * b) + ops.activation_elements  # one FLOP per element written
    return Flops(linear, attention, other, gemm_bytes + attention_bytes + ops.elementwise_bytes)


def block_flops(model: ModelSpec, work: BlockWork) -> Flops:
    return ops_flops(model, block_ops(model, work))


def per_block_flops(model: ModelSpec, height: int, width: int, frames: int) -> list[tuple[str, Flops]]:
    """(kind, FLOPs) of every block in execution order for one step of the whole batch (both CFG halves)."""
    batch = 2 if model.uses_cfg else 1
    tframes, rows, cols = model.token_grid(height, width, frames)
    tokens = tframes * rows * cols
    per_frame = rows * cols
    text = model.text_tokens if model.text_joins_attention else 0
    half = model.num_blocks // 2
    blocks = []
    for index, kind in enumerate(model.block_sequence):
        if kind == "temporal":
            work = BlockWork(kind, batch, tokens, 0, tframes, tframes, 1.0, attn_groups=per_frame)
        elif model.has_temporal_blocks:
            work = BlockWork(kind, batch, tokens, 0, per_frame, per_frame, 1.0, attn_groups=tframes)
        else:
            skip = model.skip_connections and index > half
            work = BlockWork(kind, batch, tokens, text, tokens + text, tokens + text, 1.0, skip,
                             text_output=text_output(model, index, kind))
        blocks.append((kind, block_flops(model, work)))
    return blocks


@lru_cache(maxsize=1024)
def step_flops(model: ModelSpec, height: int, width: int, frames: int) -> Flops:
    """One denoising step of the whole transformer on one GPU: the whole batch (both CFG halves),
    every block at full sequence length, plus the text's context projection into the blocks."""
    batch = 2 if model.uses_cfg else 1
    total = Flops()
    for _, flops in per_block_flops(model, height, width, frames):
        total = total + flops
    context = 2.0 * batch * model.text_tokens * model.text_hidden * model.hidden_size
    return total + Flops(linear=context, bytes=(model.text_hidden * model.hidden_size) * model.dtype_bytes)
