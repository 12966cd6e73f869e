"""The profiler on GPU machines, checked on the CPU: its communication follows NCCL's rules (replayed
from a recorded gloo run), GPU operators are timed by CUDA events over batches of calls (torch.cuda
mocked), and process counts, backend, dtype and fingerprint follow the GPUs."""
from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from costmodel.errors import DitplanError
from costmodel.profiler import compute_bench, run
from costmodel.profiler.comm_bench import free_port

sys.path.insert(0, str(Path(__file__).parent))


@pytest.mark.timeout(300)
def test_communication_measurement_follows_nccl_rules(tmp_path):
    from executor.nccl_rules import check

    from profiler_comm_worker import measure_recorded

    context = multiprocessing.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=measure_recorded, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert check(tmp_path) == []


class _FakeGpu:
    """torch.cuda's events on a GPU whose every call of the timed operator takes 10 us."""

    per_call_s = 1e-5

    def __init__(self) -> None:
        self.clock = 0.0
        self.synchronized = 0

    def call(self) -> None:
        self.clock += self.per_call_s

    def event(self, enable_timing: bool = False):
        gpu = self

        class Event:
            def record(self) -> None:
                self.at = gpu.clock

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: "Event") -> float:
                return (end.at - self.at) * 1e3

        return Event()


def test_gpu_operators_are_timed_by_events_over_batches_without_a_sync_per_call(monkeypatch):
    gpu = _FakeGpu()
    monkeypatch.setattr(torch.cuda, "Event", gpu.event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: setattr(gpu, "synchronized", gpu.synchronized + 1))
    seconds = compute_bench.median_seconds(gpu.call, device="cuda")
    assert seconds == pytest.approx(gpu.per_call_s, rel=1e-9)
    assert gpu.synchronized == 0
    # Batches of about GPU_BATCH_S: 200 calls of 10 us each, so the launch of the first does not count.
    assert gpu.clock == pytest.approx(gpu.per_call_s * (2 + compute_bench.GPU_REPEATS * 200), rel=1e-9)


def test_process_counts_backend_and_dtype_follow_the_gpus():
    assert run.default_process_counts(gpus=8) == (2, 4, 8)
    assert run.default_process_counts(gpus=2) == (2,)
    assert run.communication_backend((2, 4), gpus=4) == "nccl"
    assert run.communication_backend((2, 4), gpus=0) == "gloo"
    with pytest.raises(DitplanError, match="this machine has 2 GPU"):
        run.communication_backend((2, 4), gpus=2)
    assert compute_bench.half_dtype(7) == "float16" and compute_bench.half_dtype(8) == "bfloat16"


def test_gpu_profiles_are_fingerprinted_by_their_gpus():
    base = "0123456789ab"
    assert run.gpu_fingerprint(base, "NVIDIA H100", 8) != base
    assert run.gpu_fingerprint(base, "NVIDIA H100", 8) != run.gpu_fingerprint(base, "NVIDIA L40", 8)
    assert run.gpu_fingerprint(base, "NVIDIA H100", 8) != run.gpu_fingerprint(base, "NVIDIA H100", 4)
