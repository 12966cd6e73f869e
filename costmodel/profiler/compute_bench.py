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

# Block shapes (MECHANICS.md): rows = batch x tokens through the projections; a block's GEMMs are
# (rows x h) @ (h x n) with n in {h, 3h, 4h} and the MLP's (rows x 4h) @ (4h x h). Rows from a
# PipeFusion patch of a small image (32) up to a CFG batch of a large one (8192).
GEMM_ROWS = (32, 128, 512, 2048, 8192)
GEMM_HIDDEN = (64, 128, 256, 512)
GEMM_SHAPES = tuple((rows, k, n) for rows in GEMM_ROWS for h in GEMM_HIDDEN for k, n in ((h, 4 * h), (4 * h, h)))
# SDPA: queries of a patch or a sequence shard against keys of the whole sequence; 8 (batch x heads).
ATTENTION_BATCH_HEADS = 8
ATTENTION_SHAPES = tuple((q, k, d) for q in (64, 256, 1024) for k in (256, 1024, 4096) for d in (32, 64) if q <= k)
# One elementwise pass (a read or a write) of 16 KiB .. 64 MiB tensors: cache-resident to DRAM (and
# beyond 32 MiB, where glibc maps fresh pages for every temporary and page faults dominate).
ELEMENTWISE_BYTES = tuple(2**e for e in range(14, 27, 2))
REPEATS = 3


@dataclass(frozen=True)
class Sample:
    size: float  # FLOPs or bytes
    seconds: float
    shape: tuple[int, ...]


def _synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def median_seconds(call: Callable[[], object], repeats: int = REPEATS, device: str = "cpu") -> float:
    """Median wall time of `call` after one warm-up call (GPU work included: synchronised)."""
    sync = _synchronizer(device)
    call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_samples(shapes=GEMM_SHAPES, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                 dtype: str = "float32") -> list[Sample]:
    import torch

    samples = []
    kind = getattr(torch, dtype)
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=kind), torch.randn(k, n, device=device, dtype=kind)
        samples.append(Sample(2.0 * m * k * n, median_seconds(lambda: torch.matmul(a, b), device=device), (m, k, n)))
        tick()
    return samples


def attention_samples(shapes=ATTENTION_SHAPES, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                      dtype: str = "float32") -> list[Sample]:
    import torch
    import torch.nn.functional as F

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


def elementwise_samples(sizes=ELEMENTWISE_BYTES, tick: Callable[[], None] = lambda: None, device: str = "cpu",
                        dtype: str = "float32") -> list[Sample]:
    """`x * 1.5` reads one tensor and writes a fresh one: two passes of `size` bytes."""
    import torch

    samples = []
    kind = getattr(torch, dtype)
    width = torch.empty((), dtype=kind).element_size()
    for size in sizes:
        x = torch.randn(size // width, device=device, dtype=kind)
        samples.append(Sample(float(size), median_seconds(lambda: x * 1.5, device=device) / 2.0, (size,)))
        tick()
    return samples


def host_op_seconds(kernels_per_block: int) -> float:
    """Host seconds per eager operator: a diffusers PixArt block (BasicTransformerBlock with
    ada_norm_single, the executor's own code path) at a negligible size, divided by the operator
    count the cost model assigns to that block, so Python module calls, hooks and ATen dispatch
    are all in the figure."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(
        dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        norm_type="ada_norm_single", norm_elementwise_affine=False, num_embeds_ada_norm=1000,
    ).eval()
    hidden = torch.randn(1, 4, 16)
    text = torch.randn(1, 4, 16)
    timestep = torch.randn(1, 6 * 16)
    with torch.no_grad():
        call = lambda: block(hidden, encoder_hidden_states=text, timestep=timestep)  # noqa: E731
        per_block = min(median_seconds(call, repeats=20) for _ in range(3))
    return per_block / kernels_per_block
