"""This rank's device, the dtype it computes in, and timings and memory figures that are true on it.

CUDA runs asynchronously: the host returns from a kernel launch or a collective before the GPU has
done the work, so a wall-clock reading taken without synchronising measures enqueueing. Every
timed region of the executor ends with `synchronize(device)`, and GPU memory is the allocator's
peak (`torch.cuda.max_memory_allocated`), not the host process's resident size.
"""
from __future__ import annotations

import os
import time

import torch

from costmodel.errors import DitplanError
from costmodel.profiler.compute_bench import half_dtype


def local_device() -> torch.device:
    """This rank's device: GPU LOCAL_RANK where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_visible_gpus(processes: int) -> None:
    """Refuse more processes on this node than it has visible GPUs (where it has any: CPU runs take
    any count). Each rank binds GPU LOCAL_RANK; two ranks on one GPU would deadlock NCCL."""
    if not torch.cuda.is_available():
        return
    visible = torch.cuda.device_count()
    if processes > visible:
        raise DitplanError(
            f"{processes} processes on this node but only {visible} visible GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); every process needs a GPU of its own: "
            f"use --nproc {visible} or fewer, or a plan for {visible} GPUs."
        )


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that compute it natively (compute capability 8.0 and later), fp16 on older
    GPUs (T4, V100), fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return getattr(torch, half_dtype(torch.cuda.get_device_capability(device)[0]))


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished the work queued so far (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_since(started: float, device: torch.device) -> float:
    """Wall-clock seconds from `started` (a time.perf_counter() reading) to the end of the work
    queued on `device` so far."""
    synchronize(device)
    return time.perf_counter() - started


def now(device: torch.device) -> float:
    """A time.perf_counter() reading taken once `device` has finished the work queued so far."""
    synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The allocator's peak on a GPU since the last reset (None on the CPU, where the process's
    resident size is the figure to read)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
