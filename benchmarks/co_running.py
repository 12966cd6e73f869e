"""Does a process compute slower on this machine while another computes beside it?

`ditplan profile` times compute with one process alone, but a run of N processes keeps N cores busy
at once; where they share caches or memory bandwidth, each is slower than the profile says. This
times one loop of the fidelity benchmark's PixArt work (a 384-wide MLP over 2 x 1024 rows and
6-head attention over 1024 tokens, one thread) alone and as `--processes` copies at once, in
alternating rounds so a slow spell of the machine touches both, and prints each round's figures
and the ratio of the medians.

    .venv/bin/python benchmarks/co_running.py [--rounds 3] [--seconds 8] [--processes 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _loop(seconds: float) -> float:
    """Milliseconds per iteration of the work, over `seconds` after a short warm-up."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, width, heads, tokens, head_dim = 2048, 384, 6, 1024, 64
    x, up, down = torch.randn(rows, width), torch.randn(width, 4 * width), torch.randn(4 * width, width)
    q = torch.randn(2, heads, tokens, head_dim)

    def work() -> None:
        torch.nn.functional.gelu(x @ up, approximate="tanh") @ down
        torch.nn.functional.scaled_dot_product_attention(q, q, q)

    for _ in range(3):
        work()
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        work()
        count += 1
    return (time.perf_counter() - started) / count * 1e3


def _run(copies: int, seconds: float) -> list[float]:
    """Each copy's milliseconds per iteration, the copies started together."""
    command = [sys.executable, __file__, "--worker", str(seconds)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) for _ in range(copies)]
    outputs = [child.communicate(timeout=seconds * 10 + 60)[0] for child in children]
    if any(child.returncode for child in children):
        sys.exit("co_running: a worker failed")
    return [float(text.strip()) for text in outputs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating alone / together rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds each loop runs (default 8)")
    parser.add_argument("--processes", type=int, default=2, help="copies run together (default 2)")
    parser.add_argument("--worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(f"{_loop(args.worker):.3f}")
        return 0
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: it must be at least 1")
    if args.seconds <= 0:
        parser.error(f"--seconds {args.seconds}: it must be positive")
    if not 2 <= args.processes <= (os.cpu_count() or 1):
        parser.error(f"--processes {args.processes}: it must be from 2 to this machine's {os.cpu_count()} cores")
    alone, together = [], []
    for round_index in range(args.rounds):
        alone += _run(1, args.seconds)
        together += _run(args.processes, args.seconds)
        print(f"round {round_index + 1}: alone {alone[-1]:.1f} ms, {args.processes} at once "
              f"{', '.join(f'{ms:.1f}' for ms in together[-args.processes:])} ms per iteration", flush=True)
    ratio = statistics.median(together) / statistics.median(alone)
    print(f"median: alone {statistics.median(alone):.1f} ms, {args.processes} at once {statistics.median(together):.1f} ms "
          f"per iteration; ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
