"""Compute measurements on one thread: GEMMs and SDPA attention at DiT block shapes, elementwise
passes, and the host cost of one eager operator inside a real diffusers block.

Each measurement is the median of a few repetitions after one warm-up call (the first call pays
for allocator growth and kernel selection, which a denoising loop pays once). torch is imported
inside the functions, so importing this module is free.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

# Block shapes as the cost model counts them: rows = batch x tokens through the projections; a block's GEMMs are
# (rows x h) @ (h x n) with n in {h, 3h, 4h} and the MLP's (rows x 4h) @ (4h x h). Rows from a
# PipeFusion patch of a small image (32) up to a CFG batch of a large one (8192).
GEMM_ROWS = (32, 128, 512, 2048, 8192)
GEMM_HIDDEN = (64, 128, 256, 512)
GEMM_SHAPES = tuple((rows, k, n) for rows in GEMM_ROWS for h in GEMM_HIDDEN for k, n in ((h, 4 * h), (4 * h, h)))
# SDPA: queries of a patch or a sequence shard against keys of the whole sequence; 8 (batch x heads);
# one series per head dimension, since the kernels' rate depends on it (CPU: 16 -> 64 nearly doubles).
ATTENTION_BATCH_HEADS = 8
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)
ATTENTION_SHAPES = tuple((q, k, d) for d in ATTENTION_HEAD_DIMS for q in (64, 256, 1024) for k in (256, 1024, 4096) if q <= k)
# tanh-GELU over an MLP activation of rows x 4h elements.
ACTIVATION_ELEMENTS = tuple(4**e for e in range(8, 13))
# On the CPU the elementwise rate is taken from a real block's own operators, not from a streaming
# `x * 1.5`: norms reduce then rescale, modulation broadcasts, layout copies stride, and such operators
# move their bytes up to twice as slowly as one contiguous pass. A PixArt block (ada_norm_single,
# hidden 256 = 4 heads x 64) over `rows` = batch x tokens (up to 256 tokens a sample, so attention
# stays small): slabs of 16 KiB to 16 MiB, cache-resident to DRAM.
BLOCK_ROWS = (16, 64, 256, 1024, 4096, 16384)
BLOCK_HIDDEN = 256
BLOCK_TOKENS = 256
BLOCK_TEXT_TOKENS = 16
REPEATS = 3
# On a GPU: batches of calls lasting about 2 ms each (at most 1000 calls), median of 7 batches.
GPU_BATCH_S = 2e-3
GPU_MAX_BATCH = 1000
GPU_REPEATS = 7
# The same operators at real DiT sizes for a GPU (a CPU thread's sizes would only time launches):
# rows from a PipeFusion patch to PixArt's 2048x2048 CFG batch (2 x 16384), hidden sizes of PixArt
# and Flux, head dimensions 64/72/128, passes from L2-resident to HBM-sized.
GPU_GEMM_SHAPES = tuple((rows, k, n) for rows in (256, 1024, 4096, 16384, 32768) for h in (1152, 3072)
                        for k, n in ((h, 4 * h), (4 * h, h)))
GPU_ATTENTION_SHAPES = tuple((q, k, d) for d in (64, 72, 128) for q in (1024, 4096, 16384) for k in (4096, 16384) if q <= k)
GPU_ELEMENTWISE_BYTES = tuple(2**e for e in range(16, 31, 2))
GPU_ACTIVATION_ELEMENTS = tuple(4**e for e in range(9, 15))


def _default(device: str, cpu: tuple, gpu: tuple) -> tuple:
    return gpu if device.startswith("cuda") else cpu


@dataclass(frozen=True)
class Sample:
    size: float  # FLOPs or bytes
    seconds: float
    shape: tuple[int, ...]


def half_dtype(capability_major: int) -> str:
    """The 16-bit dtype a GPU of this compute capability computes natively: bf16 from 8.0 (A100,
    L40, H100), fp16 before (V100, T4)."""
    return "bfloat16" if capability_major >= 8 else "float16"


def median_seconds(call: Callable[[], object], repeats: int = REPEATS, device: str = "cpu") -> float:
    """Median time of one `call` after one warm-up call.

    On the CPU (torch with one thread computes in the calling thread) this is the thread's CPU
    time of each call, so other processes sharing the cores do not stretch it: the profile
    describes the core, not the moment's load. On a GPU, see `_gpu_seconds`.
    """
    if device.startswith("cuda"):
        return _gpu_seconds(call, GPU_REPEATS)
    call()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        call()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def _gpu_seconds(call: Callable[[], object], repeats: int) -> float:
    """GPU time of one `call`: CUDA events around a batch of back-to-back calls, long enough
    (GPU_BATCH_S) that the launch latency of the first and the synchronisation after the last do
    not count, as in a denoising loop where kernels queue behind each other. Median over batches."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()
    start.record()
    call()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-7)
    batch = max(1, min(GPU_MAX_BATCH, round(GPU_BATCH_S / once)))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(batch):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / batch)
    return statistics.median(times)


def gemm_samples(shapes: tuple | None = None, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                 dtype: str = "float32") -> list[Sample]:
    import torch

    shapes = _default(device, GEMM_SHAPES, GPU_GEMM_SHAPES) if shapes is None else shapes
    samples = []
    import torch.nn.functional as F

    kind = getattr(torch, dtype)
    for m, k, n in shapes:
        # As nn.Linear runs it in diffusers' blocks: x @ W^T + bias.
        x, weight, bias = (torch.randn(*shape, device=device, dtype=kind) for shape in ((m, k), (n, k), (n,)))
        samples.append(Sample(2.0 * m * k * n, median_seconds(lambda: F.linear(x, weight, bias), device=device), (m, k, n)))
        tick()
    return samples


def attention_samples(shapes: tuple | None = None, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                      dtype: str = "float32") -> list[Sample]:
    import torch
    import torch.nn.functional as F

    shapes = _default(device, ATTENTION_SHAPES, GPU_ATTENTION_SHAPES) if shapes is None else shapes
    samples = []
    bh = ATTENTION_BATCH_HEADS
    kind = getattr(torch, dtype)
    for q, k, d in shapes:
        query = torch.randn(1, bh, q, d, device=device, dtype=kind)
        key, value = (torch.randn(1, bh, k, d, device=device, dtype=kind) for _ in range(2))
        seconds = median_seconds(lambda: F.scaled_dot_product_attention(query, key, value), device=device)
        samples.append(Sample(4.0 * bh * q * k * d, seconds, (bh, q, k, d)))
        tick()
    return samples


def elementwise_samples(sizes: tuple | None = None, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                        dtype: str = "float32") -> list[Sample]:
    """Seconds of one pass (a read or a write) by its bytes: on the CPU from a block's operators
    (`block_elementwise_samples`, `sizes` in rows); on a GPU, `x * 1.5`, which reads one tensor and
    writes a fresh one: two passes of `size` bytes."""
    import torch

    if not device.startswith("cuda"):
        return block_elementwise_samples(sizes, tick)
    sizes = GPU_ELEMENTWISE_BYTES if sizes is None else sizes
    samples = []
    kind = getattr(torch, dtype)
    width = torch.empty((), dtype=kind).element_size()
    for size in sizes:
        x = torch.randn(size // width, device=device, dtype=kind)
        samples.append(Sample(float(size), median_seconds(lambda: x * 1.5, device=device) / 2.0, (size,)))
        tick()
    return samples


def block_elementwise_samples(rows: tuple | None = None, tick: Callable[[], None] = lambda: None) -> list[Sample]:
    """Seconds of one slab pass by the slab's bytes, from a diffusers PixArt block on this thread.

    In each forward, every operator that is neither a matrix product, nor attention, nor the MLP's
    activation (whose arithmetic the activation table prices) is timed by its thread time, and the
    bytes it reads and writes are counted as `module_count` counts a profile's passes; their time over
    their bytes in slabs (rows x hidden x 4 bytes) is the seconds of one pass at that slab size."""
    import torch

    from costmodel.profiler.module_count import operator_modes

    untimed = {"attention", "gelu"}
    totals = {"seconds": 0.0, "bytes": 0.0}

    def tally(name: str, nbytes: float, seconds: float) -> None:
        if nbytes and name not in untimed:
            totals["seconds"] += seconds
            totals["bytes"] += nbytes

    hidden = BLOCK_HIDDEN
    block = pixart_block(hidden, head_dim=64)
    samples = []
    for count in BLOCK_ROWS if rows is None else rows:
        tokens = min(count, BLOCK_TOKENS)
        batch = max(1, count // tokens)
        x = torch.randn(batch, tokens, hidden)
        text = torch.randn(batch, BLOCK_TEXT_TOKENS, hidden)
        timestep = torch.randn(batch, 6 * hidden)
        slab = batch * tokens * hidden * x.element_size()
        per_pass = []
        with torch.no_grad():
            block(x, encoder_hidden_states=text, timestep=timestep)  # warm-up: allocator growth
            for _ in range(REPEATS):
                totals.update(seconds=0.0, bytes=0.0)
                with operator_modes(tally):
                    block(x, encoder_hidden_states=text, timestep=timestep)
                per_pass.append(totals["seconds"] / (totals["bytes"] / slab))
        samples.append(Sample(float(slab), statistics.median(per_pass), (batch, tokens, hidden)))
        tick()
    return samples


def activation_samples(sizes: tuple | None = None, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                       dtype: str = "float32") -> list[Sample]:
    """tanh-GELU (diffusers' GELU(approximate="tanh") in PixArt, SD3, Flux, CogVideoX, Latte MLPs)."""
    import torch
    import torch.nn.functional as F

    sizes = _default(device, ACTIVATION_ELEMENTS, GPU_ACTIVATION_ELEMENTS) if sizes is None else sizes
    samples = []
    kind = getattr(torch, dtype)
    for elements in sizes:
        x = torch.randn(elements, device=device, dtype=kind)
        samples.append(Sample(float(elements), median_seconds(lambda: F.gelu(x, approximate="tanh"), device=device), (elements,)))
        tick()
    return samples


def pixart_block(hidden: int, head_dim: int) -> object:
    """A diffusers PixArt block (BasicTransformerBlock with ada_norm_single, the executor's own code
    path) of that width, with seeded random weights, in eval mode."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    return BasicTransformerBlock(
        dim=hidden, num_attention_heads=hidden // head_dim, attention_head_dim=head_dim, cross_attention_dim=hidden,
        norm_type="ada_norm_single", norm_elementwise_affine=False, num_embeds_ada_norm=1000,
    ).eval()


def host_op_seconds(kernels_per_block: int) -> float:
    """Host seconds per eager operator: a PixArt block at a negligible size, divided by the operator
    count the cost model assigns to that block, so Python module calls, hooks and ATen dispatch
    are all in the figure."""
    import torch

    block = pixart_block(16, head_dim=8)
    hidden = torch.randn(1, 4, 16)
    text = torch.randn(1, 4, 16)
    timestep = torch.randn(1, 6 * 16)
    with torch.no_grad():
        call = lambda: block(hidden, encoder_hidden_states=text, timestep=timestep)  # noqa: E731
        per_block = min(median_seconds(call, repeats=20) for _ in range(3))
    return per_block / kernels_per_block
