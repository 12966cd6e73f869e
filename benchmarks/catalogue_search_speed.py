"""How long `ditplan search` takes for each model of today's catalogue at its default size, on 8 GPUs of
h100-sxm-nvlink-8 and of l40-pcie-8 (target < 2 s each, the whole command as a user runs it).

Run: .venv/bin/python benchmarks/catalogue_search_speed.py [--models ID,ID...]
Prints, per (model, cluster), the command's wall time and CPU time (process start, imports and the
search), and its answer: the winner, or why nothing fits. CPU time is the figure to trust on a shared
machine: wall time grows with whatever else runs on the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "hunyuan-video", "qwen-image", "sana-1600m",
          "cogvideox1.5-5b", "consisid", "sd3.5-large")
CLUSTERS = ("h100-sxm-nvlink-8", "l40-pcie-8")
TARGET_S = 2.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model ids")
    args = parser.parse_args()
    for model in args.models.split(","):
        for cluster in CLUSTERS:
            command = [sys.executable, "-m", "planner", "search", "--model", model, "--cluster", cluster, "--gpus", "8",
                       "--format", "json", "--top", "1"]
            start, start_cpu = time.perf_counter(), _children_cpu()
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120)
            wall, cpu = time.perf_counter() - start, _children_cpu() - start_cpu
            if done.returncode == 0:
                best = json.loads(done.stdout)["plans"][0]
                answer = f"best {best['config']} {best['latency_s']:.2f} s"
            else:
                answer = "no plan: " + done.stderr.strip().splitlines()[-1][:160]
            print(f"{model:18s} {cluster:18s} {wall:6.2f} s wall {cpu:6.2f} s CPU "
                  f"({'met' if cpu < TARGET_S else 'MISSED'} < {TARGET_S:g} s on CPU)  {answer}", flush=True)


if __name__ == "__main__":
    main()
