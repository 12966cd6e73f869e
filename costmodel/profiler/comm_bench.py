"""Communication measurements over torch.distributed (gloo on CPUs, NCCL where CUDA is present):
point-to-point, all-to-all and all-gather from 4 KiB to 64 MiB per rank, for one process count.

One group of processes per process count (spawned, one thread each); rank 0 reports every
(pattern, bytes) sample through a queue. The time of one sample is the slowest rank's, per
repetition, after a barrier (on the CPU, after a pass over memory that evicts the caches, as a
block's compute does between the collectives of a run); the median over repetitions is kept.
Sizes are the bytes each rank contributes, as the cost model's communication tables count them:
its send buffer for all-to-all and point-to-point (every rank sends to the next in a ring and
receives from the previous), its input slab for all-gather.

The same processes then measure how long synchronized ranks wait for the slowest of them: each
runs the same GEMMs for a segment of a given length, then all of them exchange one number, over and
over. Where the ranks' speed jitters (CPU cores shared with other work), every exchange waits for
the slowest rank; what that costs, as a fraction of the segment, per segment length, is the
straggle table (see `_straggle`).
"""
from __future__ import annotations

import multiprocessing
import queue as queue_module
import socket
import statistics
import time
from typing import Callable

from costmodel.errors import DitplanError

PATTERNS = ("p2p", "all_to_all", "all_gather")
SIZES = tuple(4096 * 4**e for e in range(8))  # 4 KiB .. 64 MiB
NO_PROGRESS_TIMEOUT_S = 120.0  # the slowest step: spawning processes that import torch (~5-10 s each on a loaded machine)


ROUNDS = 2
# In a denoising loop a collective follows a block's compute, which has pushed the collective's buffers
# and the transport's own state out of the core's caches; after such a pass a gloo all-to-all takes
# 1.2-1.8 times as long as back to back (benchmarks/cold_collectives.py). On the CPU each timed call
# therefore follows a pass over this many bytes (beyond a core's L2).
EVICT_BYTES = 16 * 2**20
# Segment lengths of the straggle measurement, from a sequence-parallel layer's milliseconds to a CFG
# step's fraction of a second, and the seconds each is repeated for (the waits come in bursts).
STRAGGLE_SEGMENTS_S = (0.01, 0.05, 0.25)
STRAGGLE_SECONDS = 3.0
# The smallest straggle fraction recorded (a machine without jitter measures about 0, or a little
# below it); the table is interpolated in log-log space, which needs positive values.
STRAGGLE_FLOOR = 1e-4


def repeats_for(nbytes: int) -> int:
    """Repetitions over all rounds: many for latency-bound messages (cheap, and their times have a
    long tail when other processes share the cores), few for 64 MiB."""
    return 40 if nbytes <= 65536 else 12 if nbytes <= 4 * 2**20 else 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _operation(pattern: str, nbytes: int, rank: int, world: int, device: str) -> Callable[[], None]:
    import torch
    import torch.distributed as dist

    elements = max(world, nbytes // 4 // world * world)  # all-to-all splits evenly over the ranks
    send = torch.ones(elements, device=device)
    if pattern == "all_to_all":
        receive = torch.empty_like(send)
        return lambda: dist.all_to_all_single(receive, send)
    if pattern == "all_gather":
        parts = [torch.empty_like(send) for _ in range(world)]
        return lambda: dist.all_gather(parts, send)
    receive = torch.empty_like(send)
    target, source = (rank + 1) % world, (rank - 1) % world
    # One group: NCCL may block an ungrouped send until its receiver posts, and every rank sends first.
    operations = [dist.P2POp(dist.isend, send, target), dist.P2POp(dist.irecv, receive, source)]

    def exchange() -> None:
        for request in dist.batch_isend_irecv(operations):
            request.wait()

    return exchange


def _straggle(world: int, device: str, sync: Callable[[], None], segments: tuple[float, ...], seconds: float,
              tick: Callable[[], None]) -> list[tuple[float, float]]:
    """[(mean segment seconds, fraction of it the ranks wait for the slowest)] per segment length.

    Each rank times its segment and its exchange every iteration. The last rank to arrive waits only
    for the exchange itself, every other rank also for that rank, so the mean over ranks of the
    exchange time less its minimum is what the iteration lost to the slowest rank (the slowest
    compute less the mean compute), whatever the exchange costs."""
    import torch
    import torch.distributed as dist

    a = torch.randn(256, 256, device=device)
    b = torch.randn(256, 1024, device=device)
    flag = torch.zeros(1, device=device)

    def gemms(count: int) -> None:
        for _ in range(count):
            torch.mm(a, b)
        sync()

    gemms(5)
    start = time.perf_counter()
    gemms(20)
    one = torch.tensor([(time.perf_counter() - start) / 20], dtype=torch.float64, device=device)
    dist.all_reduce(one, op=dist.ReduceOp.MAX)  # every rank runs the same number of GEMMs
    points = []
    for target in segments:
        count = max(1, round(target / one.item()))
        iterations = max(5, round(seconds / target))
        times = torch.zeros(2, iterations, dtype=torch.float64, device=device)  # compute, exchange
        dist.barrier()
        for i in range(iterations):
            begin = time.perf_counter()
            gemms(count)
            middle = time.perf_counter()
            dist.all_reduce(flag)
            sync()
            times[0, i], times[1, i] = middle - begin, time.perf_counter() - middle
        every = [torch.empty_like(times) for _ in range(world)]
        dist.all_gather(every, times)
        stacked = torch.stack(every)  # rank, (compute, exchange), iteration
        compute_s = stacked[:, 0].mean().item()
        lost_s = (stacked[:, 1].mean(dim=0) - stacked[:, 1].min(dim=0).values).mean().item()
        # Waits beyond the compute itself mean processes outnumber cores (the profile says so); the
        # table's rule is a fraction of at most 1.
        points.append((compute_s, min(1.0, max(STRAGGLE_FLOOR, lost_s / compute_s))))
        tick()
    return points


def _worker(rank: int, world: int, port: int, backend: str, sizes: tuple[int, ...], results,
            straggle: tuple[tuple[float, ...], float] = ((), 0.0)) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    # device_id: NCCL creates the communicator now, on this rank's GPU, instead of at first use.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device(device) if backend == "nccl" else None)
    sync = (lambda: torch.cuda.synchronize()) if backend == "nccl" else (lambda: None)
    if backend == "nccl":
        evict = lambda: None  # noqa: E731 - the buffers live in GPU memory, the kernels on the stream
    else:
        scratch = torch.ones(EVICT_BYTES // 4)
        evict = lambda: scratch.add_(1.0)  # noqa: E731
    times: dict[tuple[str, int], list[float]] = {}
    try:
        # Rounds over the whole sweep rather than all repetitions of one size in a row, so a burst of
        # load from elsewhere on the machine spreads over many sizes instead of ruining one.
        for _ in range(ROUNDS):
            for pattern in PATTERNS:
                for nbytes in sizes:
                    call = _operation(pattern, nbytes, rank, world, device)
                    call()
                    sync()
                    for _ in range(max(1, repeats_for(nbytes) // ROUNDS)):
                        evict()
                        dist.barrier()
                        start = time.perf_counter()
                        call()
                        sync()
                        times.setdefault((pattern, nbytes), []).append(time.perf_counter() - start)
                    if rank == 0:
                        results.put(("tick",))
        for (pattern, nbytes), series in times.items():
            slowest = torch.tensor(series, dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rank == 0:
                results.put(("sample", pattern, nbytes, statistics.median(slowest.tolist())))
        tick = (lambda: results.put(("tick",))) if rank == 0 else (lambda: None)
        for segment_s, fraction in _straggle(world, device, sync, *straggle, tick):
            if rank == 0:
                results.put(("straggle", segment_s, fraction))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(("done",))


def ticks(sizes: tuple[int, ...] | None = None) -> int:
    """How often `measure` calls its `tick`."""
    return ROUNDS * len(PATTERNS) * len(SIZES if sizes is None else sizes) + len(STRAGGLE_SEGMENTS_S)


def measure(world: int, backend: str = "gloo", sizes: tuple[int, ...] | None = None,
            tick: Callable[[], None] = lambda: None
            ) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[float, float]]]:
    """({pattern: [(bytes per rank, seconds), ...]}, straggle [(segment seconds, fraction), ...]) for
    `world` processes; `tick` is called `ticks(sizes)` times as the measurement advances.

    Ctrl-C, or SIGINT/SIGTERM turned into `Stopped` by the caller, stops every worker it started.
    """
    sizes = SIZES if sizes is None else sizes
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    straggle = (STRAGGLE_SEGMENTS_S, STRAGGLE_SECONDS)
    workers = [context.Process(target=_worker, args=(rank, world, port, backend, sizes, results, straggle), daemon=True)
               for rank in range(world)]
    samples: dict[str, list[tuple[int, float]]] = {pattern: [] for pattern in PATTERNS}
    waits: list[tuple[float, float]] = []
    expected = len(PATTERNS) * len(sizes)
    received = 0
    last_news = time.monotonic()
    try:
        for worker in workers:
            worker.start()
        while True:
            try:
                message = results.get(timeout=0.5)
            except queue_module.Empty:
                failed = [(rank, w.exitcode) for rank, w in enumerate(workers) if w.exitcode not in (None, 0)]
                if failed:
                    rank, code = failed[0]
                    raise DitplanError(f"communication measurement on {world} processes failed: rank {rank} exited "
                                       f"with code {code} (is the {backend} backend usable here?).")
                if time.monotonic() - last_news > NO_PROGRESS_TIMEOUT_S:
                    raise DitplanError(f"communication measurement on {world} processes made no progress for "
                                       f"{NO_PROGRESS_TIMEOUT_S:.0f} s; stopped it.")
                continue
            last_news = time.monotonic()
            if message[0] == "done":
                break
            if message[0] == "tick":
                tick()
                continue
            if message[0] == "straggle":
                waits.append(message[1:])
                continue
            _, pattern, nbytes, seconds = message
            samples[pattern].append((nbytes, seconds))
            received += 1
        for worker in workers:
            worker.join(timeout=30)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
    if received != expected or len(waits) != len(straggle[0]):
        raise DitplanError(f"communication measurement on {world} processes returned {received} of {expected} samples "
                           f"and {len(waits)} of {len(straggle[0])} straggle figures.")
    return samples, waits
