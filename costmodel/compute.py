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
from functools import lru_cache

from costmodel.flops import BlockWork, block_ops, kernels_and_passes
from costmodel.specs import ModelSpec
from costmodel.topology import Cluster, HardwareSpec

# L2 bandwidth microbenchmarks (e.g. chips-and-cheese on Ampere, Ada, Hopper) measure 2-5x the DRAM
# bandwidth; we take the low end.
L2_SPEEDUP = 2.0
TILE = 128  # output tile edge of cuBLAS' and FlashAttention-2's high-throughput kernels on Ampere/Ada/Hopper

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
    ops = block_ops(model, work)
    b = model.dtype_bytes
    g = sum(_gemm_seconds(hw, m, k, n, b) for m, k, n in ops.gemms)
    g += sum(attention_seconds(hw, batch_heads, queries, keys, model.head_dim)
             for batch_heads, queries, keys in ops.other_attention)
    g += elementwise_seconds(hw, ops.elementwise_bytes, ops.slab_bytes)
    g += activation_seconds(hw, ops.activation_elements)
    return g, attention_seconds(hw, *ops.self_attention, model.head_dim)


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
    host = (kernels_and_passes(model, work.kind)[0] + extra_ops) * cluster.host_op_us * 1e-6
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
