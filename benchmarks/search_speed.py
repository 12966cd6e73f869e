"""How long a full plan search takes: 8 GPUs (target < 1 s) and 1024 GPUs (target < 10 s).

Run: .venv/bin/python benchmarks/search_speed.py [--repeat N]
Prints, per scenario, the wall and CPU time of `planner.search` (the first run, cold caches, and
the best of N), how many candidates were ranked and pruned, and the winner. CPU time is the figure
to trust on a shared machine: wall time grows with whatever else runs on the cores.
"""
from __future__ import annotations

import argparse
import time

import planner

SCENARIOS = (
    # (label, target seconds, search arguments)
    ("8 GPUs: pixart-alpha 2048x2048, 20 steps, l40-pcie-8", 1.0,
     dict(model="pixart-alpha", cluster="l40-pcie-8", gpus=8, height=2048, width=2048, steps=20)),
    ("1024 GPUs: flux-dev 4096x4096, 28 steps, 128 nodes of h100-sxm-nvlink-8", 10.0,
     dict(model="flux-dev", cluster="h100-sxm-nvlink-8", gpus=1024, nodes=128, height=4096, width=4096, steps=28)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; the best and the first are shown")
    args = parser.parse_args()
    for label, target, kwargs in SCENARIOS:
        times, cpu = [], []
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = planner.search(progress=False, **kwargs)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        best = result.best
        simulated = sum(p.scored_by == "simulator" for p in result.plans)
        print(f"{label}\n  first run {times[0]:.3f} s wall ({cpu[0]:.3f} s CPU), best of {args.repeat} "
              f"{min(times):.3f} s wall ({min(cpu):.3f} s CPU) (target < {target:g} s: "
              f"{'met' if cpu[0] < target else 'MISSED'} on CPU time)\n"
              f"  {len(result.plans)} plans ({simulated} by the simulator), {len(result.pruned)} pruned; "
              f"winner {best.config} placement {','.join(best.placement.order)} {best.latency_s:.3f} s")


if __name__ == "__main__":
    main()
