"""Compute model: FLOPs and bytes of one transformer block at a token count, turned into seconds.

Time of one block on one GPU = max(GPU time, host launch time), where
- GPU time sums its GEMMs, its attention and its elementwise traffic;
- a GEMM (m x k) @ (k x n) runs as ceil(m/128) * ceil(n/128) output tiles of 128x128, one per SM
  at a time (cuBLAS' large-tile kernels), so it takes ceil(tiles / SMs) waves: a GEMM with fewer
  tiles than SMs leaves SMs idle. Each full wave runs at the GPU's achieved large-GEMM rate
  (`matmul_efficiency` x peak). This is why small patches (PipeFusion with many patches, SP with
  many ranks) run below peak: the efficiency depends on the operation's size through the tile count,
  with no fitted curve;
- attention (FlashAttention-2 through SDPA) runs one CTA per (batch x head x 128 queries), same wave rule,
  at `attention_efficiency` x peak;
- elementwise work (norms, modulation, activations, residuals, rotary embeddings, layout copies) is
  memory bound: `elementwise_passes` reads+writes of the block's hidden slab at the achieved DRAM
  bandwidth; the pass count is counted per family and block kind from the diffusers forward code
  (eager PyTorch launches each op separately, nothing is fused);
- host time: eager PyTorch issues every operator from Python (the cluster's `host_op_us` each, a
  property of the host CPU); when a block's kernels are shorter than that, the GPU waits on the host.
  This is what bounds scaling on fast GPUs: splitting a block over more ranks shrinks its GPU time
  but not its operator count (which sequence parallelism even raises).
A measured profile (Cluster.measured.compute) replaces all of this for the block kinds it covers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from costmodel.specs import ModelSpec
from costmodel.topology import Cluster, HardwareSpec

# L2 bandwidth microbenchmarks (e.g. chips-and-cheese on Ampere, Ada, Hopper) measure 2-5x the DRAM
# bandwidth; we take the low end.
L2_SPEEDUP = 2.0
TILE = 128  # output tile edge of cuBLAS' and FlashAttention-2's high-throughput kernels on Ampere/Ada/Hopper

# Per (family, block kind): operators launched per block and elementwise slab passes (reads + writes
# of batch x tokens x hidden x dtype, per row through the block), counted from diffusers' eager
# forward code. Recurring pieces: LayerNorm 1 op / 2 passes; adaLN modulate x*(1+scale)+shift
# 2 ops / 4 passes; gate x out + residual 2 ops / 5 passes; attention layout copy 1 op / 2 passes;
# GELU on the MLP activation 1 op / 2 x mlp_ratio passes; RMSNorm on q and k in fp32 ~6 ops /
# ~8 passes each; eager rotary embedding on q and k in fp32 ~8 ops / ~12 passes each.
KERNELS_AND_PASSES: dict[tuple[str, str], tuple[int, float]] = {
    ("pixart", "cross"): (30, 35.0),  # ada_norm_single BasicTransformerBlock: attn1, attn2, FF
    ("latte", "cross"): (30, 35.0),  # same block as PixArt's (spatial)
    ("latte", "temporal"): (24, 30.0),  # self-attention over frames + FF, plus two rearrange copies
    ("hunyuan", "cross"): (55, 60.0),  # PixArt-like plus LayerNorm q/k norms and 2D rotary on q/k
    ("sd3", "joint"): (44, 36.0),  # two streams of LN/modulate/FF; joint attention over the concatenation
    ("flux", "joint"): (90, 66.0),  # SD3's plus fp32 RMSNorm on q/k of both streams and rotary embeddings
    ("flux", "single"): (45, 62.0),  # fused qkv+MLP-in, RMSNorm q/k, rotary, concat [attn, mlp], fused out
    ("cogvideox", "single"): (52, 56.0),  # expert adaLN on text/video, LayerNorm q/k, rotary on the video part
}
DEFAULT_KERNELS_AND_PASSES: dict[str, tuple[int, float]] = {
    "cross": (30, 35.0), "joint": (44, 36.0), "single": (45, 40.0), "temporal": (24, 30.0),
}


def kernels_and_passes(family: str, kind: str) -> tuple[int, float]:
    return KERNELS_AND_PASSES.get((family, kind), DEFAULT_KERNELS_AND_PASSES[kind])


@dataclass(frozen=True)
class BlockWork:
    """What one rank computes in one block: `rows` are batch x tokens through the projections."""

    kind: str
    batch: int
    image_tokens: int  # local image tokens through the projections and MLP
    text_tokens: int  # local text tokens through the projections (joint/single blocks)
    attn_queries: int  # query tokens of the self/joint attention (per batch element)
    attn_keys: int  # key tokens each query sees
    head_fraction: float  # share of the heads this rank computes attention for (1/ulysses)
    skip_linear: bool = False  # HunyuanDiT: this block fuses a long skip (a 2h -> h linear)


def _gemm_seconds(hw: HardwareSpec, m: int, k: int, n: int, dtype_bytes: int) -> float:
    if m <= 0:
        return 0.0
    if hw.operations is not None:  # a profile's measured GEMM curve by size (costmodel.measured)
        return hw.operations.gemm_seconds(m, k, n)
    tiles = math.ceil(m / TILE) * math.ceil(n / TILE)
    waves = math.ceil(tiles / hw.sm_count)
    # One wave of full tiles: each SM does TILE*TILE*k multiply-adds at its share of the achieved rate.
    per_sm_rate = hw.peak_tflops * 1e12 * hw.matmul_efficiency / hw.sm_count
    flops_time = waves * 2.0 * TILE * TILE * k / per_sm_rate
    # Never faster than the actual FLOPs at the achieved rate (partial tiles are not free either).
    flops_time = max(flops_time, 2.0 * m * k * n / (hw.peak_tflops * 1e12 * hw.matmul_efficiency))
    bytes_time = (m * k + k * n + m * n) * dtype_bytes / (hw.memory_bandwidth_gbs * 1e9 * hw.memory_efficiency)
    return max(flops_time, bytes_time)


def attention_seconds(hw: HardwareSpec, batch_heads: float, queries: int, keys: int, head_dim: int) -> float:
    """FlashAttention-2 forward: 4 * queries * keys * head_dim FLOPs per (batch, head)."""
    if queries <= 0 or keys <= 0 or batch_heads <= 0:
        return 0.0
    if hw.operations is not None:
        return hw.operations.attention_seconds(batch_heads, queries, keys, head_dim)
    ctas = math.ceil(batch_heads) * math.ceil(queries / TILE)
    waves = math.ceil(ctas / hw.sm_count)
    per_sm_rate = hw.peak_tflops * 1e12 * hw.attention_efficiency / hw.sm_count
    wave_time = waves * 4.0 * TILE * keys * head_dim / per_sm_rate
    flop_time = 4.0 * batch_heads * queries * keys * head_dim / (hw.peak_tflops * 1e12 * hw.attention_efficiency)
    return max(wave_time, flop_time)


def elementwise_seconds(hw: HardwareSpec, nbytes: float, slab_bytes: float | None = None) -> float:
    """Streaming `nbytes` through memory-bound kernels whose input and output are `slab_bytes` each.

    When an op's input and output fit in L2 together, the next op finds its input there (L2 is
    write-back): such chains run at L2_SPEEDUP x the DRAM rate.
    """
    if hw.operations is not None:  # measured seconds per pass by its size (caches included)
        return hw.operations.elementwise_seconds(nbytes, slab_bytes)
    rate = hw.memory_bandwidth_gbs * 1e9 * hw.memory_efficiency
    if slab_bytes is not None and 2 * slab_bytes <= hw.l2_cache_mb * 1e6:
        rate *= L2_SPEEDUP
    return nbytes / rate


def activation_seconds(hw: HardwareSpec, elements: float) -> float:
    """The MLP activation's arithmetic beyond its memory passes: a profile's measured tanh-GELU
    (compute bound on CPUs); none on GPUs, where it hides in the passes counted above."""
    return hw.operations.activation_seconds(elements) if hw.operations is not None else 0.0


@lru_cache(maxsize=65536)
def _block_parts(hw: HardwareSpec, model: ModelSpec, work: BlockWork) -> tuple[float, float]:
    """(seconds outside the self/joint attention, seconds of the self/joint attention) on one GPU."""
    h = model.hidden_size
    r = model.mlp_ratio
    b = model.dtype_bytes
    B = work.batch
    img = B * work.image_tokens
    txt = B * work.text_tokens
    mlp = int(round(r * h))
    g = 0.0
    if work.kind in ("cross", "temporal"):
        g += _gemm_seconds(hw, img, h, 3 * h, b) + _gemm_seconds(hw, img, h, h, b)
        g += _gemm_seconds(hw, img, h, mlp, b) + _gemm_seconds(hw, img, mlp, h, b)
    elif work.kind == "joint":
        for rows in (img, txt):
            g += _gemm_seconds(hw, rows, h, 3 * h, b) + _gemm_seconds(hw, rows, h, h, b)
            g += _gemm_seconds(hw, rows, h, mlp, b) + _gemm_seconds(hw, rows, mlp, h, b)
    elif work.kind == "single":
        rows = img + txt
        if model.family == "flux":  # fused qkv + MLP-in, then fused out over [attn, mlp]
            g += _gemm_seconds(hw, rows, h, 3 * h + mlp, b) + _gemm_seconds(hw, rows, h + mlp, h, b)
        else:  # CogVideoX: separate projections, one stream over text + video
            g += _gemm_seconds(hw, rows, h, 3 * h, b) + _gemm_seconds(hw, rows, h, h, b)
            g += _gemm_seconds(hw, rows, h, mlp, b) + _gemm_seconds(hw, rows, mlp, h, b)
    other_attention = 0.0
    if work.kind == "cross":
        # Cross-attention to the text: q/out projections on image rows, k/v on the text states,
        # attention of every local image token (all heads) over all text tokens.
        g += 2 * _gemm_seconds(hw, img, h, h, b) + _gemm_seconds(hw, B * model.text_tokens, h, 2 * h, b)
        other_attention = attention_seconds(hw, B * model.num_heads, work.image_tokens, model.text_tokens, model.head_dim)
    if work.skip_linear:
        g += _gemm_seconds(hw, img, 2 * h, h, b)
    passes = kernels_and_passes(model.family, work.kind)[1]  # per row; joint blocks count both streams' rows
    g += elementwise_seconds(hw, passes * (img + txt) * h * b, (img + txt) * h * b)
    g += activation_seconds(hw, (img + txt) * mlp)
    attention = attention_seconds(hw, B * model.num_heads * work.head_fraction, work.attn_queries,
                                  work.attn_keys, model.head_dim)
    return g + other_attention, attention


def block_gpu_host(cluster: Cluster, model: ModelSpec, work: BlockWork, attention: float | None = None,
                   extra_gpu: float = 0.0, extra_ops: int = 0) -> tuple[float, float]:
    """(GPU seconds, host seconds) of one block on one GPU; the block takes the larger of the two.

    `attention` overrides the attention part (ring attention); `extra_gpu` and `extra_ops` add the
    GPU seconds and host operators a parallel method wraps around the block (layout copies, merges).
    A measured table gives the whole block's time, host included.
    """
    measured = cluster.measured
    if measured is not None:
        table = measured.compute.get((work.kind, model.hidden_size))
        if table is not None:
            return table(work.batch * (work.image_tokens + work.text_tokens)) + extra_gpu, 0.0
    other, attn = _block_parts(cluster.hardware, model, work)
    gpu = other + (attn if attention is None else attention) + extra_gpu
    host = (kernels_and_passes(model.family, work.kind)[0] + extra_ops) * cluster.host_op_us * 1e-6
    operations = cluster.hardware.operations
    if operations is not None and operations.serial_host:
        # The device is the dispatching thread itself (a profiled CPU): dispatch and work add up.
        return gpu + host, 0.0
    return gpu, host


def block_seconds(cluster: Cluster, model: ModelSpec, work: BlockWork, attention: float | None = None,
                  extra_gpu: float = 0.0, extra_ops: int = 0) -> float:
    """Seconds of one block on one GPU: max(GPU time, host time)."""
    return max(block_gpu_host(cluster, model, work, attention, extra_gpu, extra_ops))


def dense_seconds(hw: HardwareSpec, flops: float, efficiency_scale: float = 1.0) -> float:
    """A large dense workload (text encoders, VAE) at the achieved GEMM rate x `efficiency_scale`."""
    return flops / (hw.peak_tflops * 1e12 * hw.matmul_efficiency * efficiency_scale)
