"""How much slower is a gloo collective that follows compute than one timed back to back?

`ditplan profile` times each collective on the CPU after a pass over `comm_bench.EVICT_BYTES` of
memory, as a run's collectives follow a block's compute. This measures why: two processes (one
thread each) time `all_to_all_single` at a few sizes, alternately warm (barrier, then the call) and
after the evicting pass (the pass, barrier, then the call), and print the median of each and their
ratio.

    .venv/bin/python benchmarks/cold_collectives.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (65536, 2**20, 4 * 2**20)
ROUNDS = 2  # warm and evicted alternate, twice, so a slow spell of the machine touches both


def _worker(rank: int, port: int, repeats: int, results) -> None:
    import torch
    import torch.distributed as dist

    from costmodel.profiler.comm_bench import EVICT_BYTES

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    scratch = torch.ones(EVICT_BYTES // 4)
    try:
        for nbytes in SIZES:
            send = torch.ones(nbytes // 4)
            receive = torch.empty_like(send)
            times: dict[str, list[float]] = {"warm": [], "evicted": []}
            for _ in range(ROUNDS):
                for mode in times:
                    for _ in range(repeats):
                        if mode == "evicted":
                            scratch.add_(1.0)
                        dist.barrier()
                        start = time.perf_counter()
                        dist.all_to_all_single(receive, send)
                        times[mode].append(time.perf_counter() - start)
            if rank == 0:
                results.put((nbytes, statistics.median(times["warm"]), statistics.median(times["evicted"])))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    from costmodel.profiler.comm_bench import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per size, mode and round (default 20)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: it must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, port, args.repeats, results), daemon=True) for rank in range(2)]
    try:
        for worker in workers:
            worker.start()
        rows = [results.get(timeout=300) for _ in SIZES]
    except queue.Empty:
        print("cold_collectives: the workers sent nothing for 5 minutes; stopped them", file=sys.stderr)
        return 1
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    print("all_to_all_single on 2 gloo processes, one thread each: the median of rank 0's timed calls")
    print(f"{'bytes per rank':>15}  {'warm ms':>8}  {'evicted ms':>10}  {'evicted / warm':>14}")
    for nbytes, warm, evicted in rows:
        print(f"{nbytes:>15}  {warm * 1e3:8.3f}  {evicted * 1e3:10.3f}  {evicted / warm:14.2f}")
    return 0 if all(worker.exitcode == 0 for worker in workers) else 1


if __name__ == "__main__":
    sys.exit(main())
