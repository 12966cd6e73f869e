"""One rank of the communication measurement, recording its torch.distributed calls (spawned by
test_profiler_devices.py; the module is importable by name in the spawned process)."""
from __future__ import annotations


class _Drop:
    def put(self, message: object) -> None:
        pass


def measure_recorded(rank: int, world: int, port: int, folder: str) -> None:
    from executor.comm_trace import install

    install(folder)
    from costmodel.profiler import comm_bench

    comm_bench._worker(rank, world, port, "gloo", (4096,), _Drop())
