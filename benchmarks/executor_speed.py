"""Executor speed on this machine: 2 processes x 1 thread against 1 process x 1 thread.

Models: tiny-pixart-alpha-heavy and tiny-flux-dev-heavy (profiles/models/: hidden 128, 4 blocks,
1024x1024, so 4096 image tokens and compute-bound attention). Measured: the denoising loop's time
per step, every step after the first of every round (rounds run one after the other): the fastest,
which other load on the machine inflates least, and the median, which one lucky step cannot move, for
  * PixArt: one process, CFG 2, Ulysses 2, Ring 2 (our executor);
  * Flux: one process, our Ulysses 2, and diffusers' own context parallelism
    (`ContextParallelConfig(ulysses_degree=2)`, which ships a plan for Flux) on the same input.
The final latents of every parallel run are compared with the one-process run (max abs diff).

    .venv/bin/python benchmarks/executor_speed.py [--steps 4] [--size 1024] [--rounds 2]

Speedups only mean something on an otherwise idle machine: the load average is printed first.

On CPU diffusers' context parallelism asks `torch.accelerator.device_count()`, which answers 0;
this script (only) makes it answer 1.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIXART, FLUX = "tiny-pixart-alpha-heavy", "tiny-flux-dev-heavy"
RUNS = [  # (label, model, mode, processes)
    ("pixart serial", PIXART, "cfg=1", 1),
    ("pixart cfg=2", PIXART, "cfg=2", 2),
    ("pixart ulysses=2", PIXART, "ulysses=2", 2),
    ("pixart ring=2", PIXART, "ring=2", 2),
    ("flux serial", FLUX, "cfg=1", 1),
    ("flux ulysses=2 (ours)", FLUX, "ulysses=2", 2),
    ("flux ulysses=2 (diffusers CP)", FLUX, "diffusers-cp", 2),
]


def worker(model: str, mode: str, steps: int, size: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from executor.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(model)  # before joining the group (see executor.tiny)
    rank = int(os.environ.get("RANK", "0"))
    call = {"prompt": "a photo of a cat", "height": size, "width": size, "num_inference_steps": steps, "output_type": "latent"}
    if mode == "diffusers-cp":
        import torch.distributed as dist
        from diffusers import ContextParallelConfig

        from executor.device import now
        from executor.groups import init_distributed

        init_distributed("gloo")
        torch.accelerator.device_count = lambda: 1  # CPU: diffusers divides the rank by the device count
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        marks: list[float] = []

        def on_step_end(pipeline, step, timestep, tensors):
            marks.append(now(pipe.device))  # once the device has done the step
            return tensors

        # The generator matches our executor's seeding: prompt 0 uses seed 0.
        started = now(pipe.device)
        with torch.no_grad():
            latents = pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end).images
        step_s = [b - a for a, b in zip([started] + marks[:-1], marks)]
        dist.barrier()
    else:
        from executor.parallel import parallelize

        parallel = parallelize(pipe, plan=mode, show_progress=False)
        output = parallel(**call, seed=0)
        step_s = parallel.last_timings.step_s
        latents = output.images if rank == 0 else None
    if rank == 0:
        torch.save(latents, out.with_suffix(".pt"))
        out.write_text(json.dumps({"step_s": step_s}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(model: str, mode: str, processes: int, steps: int, size: int, out: Path) -> None:
    port = free_port()
    children = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        if processes == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        children.append(subprocess.Popen([sys.executable, __file__, "--worker", model, mode, str(steps), str(size), str(out)],
                                         env=env, cwd=ROOT))
    for child in children:
        if child.wait(timeout=1800) != 0:
            raise SystemExit(f"{model} {mode}: a worker exited with {child.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run (the first is not timed)")
    parser.add_argument("--size", type=int, default=1024, help="image height and width (1024: 4096 tokens)")
    parser.add_argument("--rounds", type=int, default=2, help="times every run is repeated; the best is kept")
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "MODE", "STEPS", "SIZE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, mode, steps, size, out = args.worker
        worker(model, mode, int(steps), int(size), Path(out))
        return

    import torch

    tokens = (args.size // 16) ** 2
    load = os.getloadavg()[0]
    print(f"executor speed: {tokens} image tokens, {args.steps} steps, 1 thread per process, {args.rounds} "
          f"round(s); load average {load:.1f} on {os.cpu_count()} CPUs{' (busy: figures are inflated)' if load > 1.0 else ''}")
    print("seconds per step after the first (fastest; median), speedup over one process, max |latents - one process|")
    scratch = tempfile.TemporaryDirectory(prefix="ditplan-speed-")
    folder = Path(scratch.name)
    steps_s: dict[str, list[float]] = {}
    latents: dict[str, object] = {}
    for round_index in range(args.rounds):
        for label, model, mode, processes in RUNS:
            out = folder / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.json"
            launch(model, mode, processes, args.steps, args.size, out)
            step_s = json.loads(out.read_text())["step_s"]
            steps_s.setdefault(label, []).extend(step_s[1:] if len(step_s) > 1 else step_s)
            latents[label] = torch.load(out.with_suffix(".pt"))
    fastest = {label: min(times) for label, times in steps_s.items()}
    median = {label: statistics.median(times) for label, times in steps_s.items()}
    for label, model, mode, processes in RUNS:
        serial = f"{label.split()[0]} serial"
        diff = float((latents[label] - latents[serial]).abs().max())
        print(f"  {label:32s} {fastest[label]:8.3f} s/step   x{fastest[serial] / fastest[label]:5.2f}   "
              f"median {median[label]:6.3f} s/step   x{median[serial] / median[label]:5.2f}   max diff {diff:.2e}", flush=True)
    ours, theirs = "flux ulysses=2 (ours)", "flux ulysses=2 (diffusers CP)"
    print(f"our Ulysses 2 vs diffusers' context parallelism on Flux: {fastest[theirs] / fastest[ours]:.2f}x by the fastest step "
          f"({fastest[ours]:.3f} vs {fastest[theirs]:.3f} s/step), {median[theirs] / median[ours]:.2f}x by the median "
          f"({median[ours]:.3f} vs {median[theirs]:.3f} s/step; {len(steps_s[ours])} steps each)")
    scratch.cleanup()


if __name__ == "__main__":
    main()
