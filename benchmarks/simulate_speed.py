"""Simulations per second of the cost model: 8 GPUs (one L40 node) and 1024 GPUs (128 nodes of
h100-sxm-nvlink-8), for the event simulator (`simulate`) and the closed form (`estimate`).

Each configuration is timed on a fresh cluster object (no communication cache carried over) and
again warm (as the planner sees it: one cluster, thousands of configurations). First, the wall time
of the issue's `ditplan simulate ... --format json` command in a fresh process (target: under 3 s).

    .venv/bin/python benchmarks/simulate_speed.py
"""
from __future__ import annotations

import subprocess
import sys
import time

from costmodel import ParallelConfig, estimate, load_cluster, simulate


def rate(function, model, cluster_id, gpus, nodes, configs, shape, fresh: bool, budget_s: float = 3.0) -> float:
    cluster = load_cluster(cluster_id, gpus=gpus, nodes=nodes)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        for config in configs:
            if fresh:
                cluster = load_cluster(cluster_id, gpus=gpus, nodes=nodes)
            function(model, cluster, config, **shape)
            done += 1
    return done / (time.perf_counter() - start)


FLUX_1024 = ["simulate", "--model", "flux-dev", "--height", "1024", "--width", "1024", "--steps", "28",
             "--cluster", "h100-sxm-nvlink-8", "--gpus", "4", "--config", "ulysses=4", "--format", "json"]


def fresh_process_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "planner", *FLUX_1024], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    print(f"`ditplan {' '.join(FLUX_1024)}` in a fresh process: {fresh_process_seconds():.2f} s wall")
    cases = [
        ("8 GPUs, pixart-alpha 1024px on l40-pcie-8", "pixart-alpha", "l40-pcie-8", 8, 1,
         ["cfg=2,pipefusion=4", "pipefusion=8", "ring=8", "ulysses=8", "cfg=2,ulysses=2,pipefusion=2,patches=4",
          "cfg=2,ring=2,pipefusion=2,warmup=0"],
         dict(height=1024, width=1024, frames=1, steps=20)),
        ("1024 GPUs, flux-dev 2048px on 128 x h100-sxm-nvlink-8", "flux-dev", "h100-sxm-nvlink-8", 1024, 128,
         ["ulysses=8,dp=128", "ulysses=4,ring=2,dp=128", "ulysses=8,pipefusion=2,dp=64",
          "ulysses=4,pipefusion=4,patches=8,dp=64", "ring=8,pipefusion=4,dp=32"],
         dict(height=2048, width=2048, frames=1, steps=28)),
    ]
    print(f"{'case':58s} {'function':9s} {'warm/s':>9s} {'cold/s':>9s}")
    for label, model, cluster, gpus, nodes, texts, shape in cases:
        configs = [ParallelConfig.parse(text) for text in texts]
        for function in (simulate, estimate):
            warm = rate(function, model, cluster, gpus, nodes, configs, shape, fresh=False)
            cold = rate(function, model, cluster, gpus, nodes, configs, shape, fresh=True, budget_s=2.0)
            print(f"{label:58s} {function.__name__:9s} {warm:9.1f} {cold:9.1f}")


if __name__ == "__main__":
    main()
