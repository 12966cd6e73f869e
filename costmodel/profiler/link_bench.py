"""The link between nodes, measured by `ditplan profile --nnodes K`: one process per node (the
profiling process itself) joins a gloo group at the rendezvous endpoint and runs the patterns of
comm_bench across the nodes, the same sizes, repetitions and timing rule (slowest rank, median).

Each node runs this with its node rank; node 0 hosts the group's store at the endpoint, so the
endpoint must be node 0's address as the other nodes reach it (GLOO_SOCKET_IFNAME picks the
interface gloo's connections use, as for `ditplan run`).
"""
from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import Callable

from costmodel.errors import DitplanError
from costmodel.profiler import comm_bench

JOIN_TIMEOUT_S = 300.0  # the other nodes start their `ditplan profile` by hand or by srun, not at once


def measure(node_rank: int, nnodes: int, endpoint: str, sizes: tuple[int, ...] | None = None,
            tick: Callable[[], None] = lambda: None) -> dict[str, list[tuple[int, float]]]:
    """{pattern: [(bytes per rank, seconds), ...]} across `nnodes` nodes, one process each; the same
    on every node. `tick` is called ROUNDS x len(PATTERNS) x len(sizes) times."""
    import torch
    import torch.distributed as dist

    sizes = comm_bench.SIZES if sizes is None else sizes
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{endpoint}", rank=node_rank, world_size=nnodes,
                                timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    except (RuntimeError, ValueError) as error:
        raise DitplanError(f"--rdzv-endpoint {endpoint}: could not join the other {nnodes - 1} node(s) there "
                           f"({error}); start `ditplan profile` with the same flags on every node.") from None
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(comm_bench.ROUNDS):
            for pattern in comm_bench.PATTERNS:
                for nbytes in sizes:
                    call = comm_bench._operation(pattern, nbytes, node_rank, nnodes, "cpu")
                    call()
                    for _ in range(max(1, comm_bench.repeats_for(nbytes) // comm_bench.ROUNDS)):
                        dist.barrier()
                        start = time.perf_counter()
                        call()
                        times.setdefault((pattern, nbytes), []).append(time.perf_counter() - start)
                    tick()
        samples: dict[str, list[tuple[int, float]]] = {pattern: [] for pattern in comm_bench.PATTERNS}
        for (pattern, nbytes), series in sorted(times.items()):
            slowest = torch.tensor(series, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            samples[pattern].append((nbytes, statistics.median(slowest.tolist())))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return samples
