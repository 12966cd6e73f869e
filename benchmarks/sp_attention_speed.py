"""Transformer-level speed of sequence parallelism on this machine: 2 processes x 1 thread vs 1 x 1.

For each family asked for (default: PixArt and Flux), builds a small random transformer (4 blocks,
hidden 128 = 4 heads x 32) and times one forward over about 4096 image tokens (latent 128 x 128,
patch 2; Flux: 4096 packed tokens), batch 1, fp32 on CPU (gloo):

    serial       one process, one thread
    ulysses=2    two processes, one thread each, Ulysses all-to-all
    ring=2       two processes, one thread each, ring attention with K/V passed around
    diffusers-ulysses=2   (Flux only) diffusers' own context parallelism,
                 `enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`, same model and input

and prints seconds per forward (best of --repeats after one warm-up call: the least disturbed by
other load), the speedup over serial, rank 0's CPU seconds for that forward (all its threads; on a
busy machine this shows the work each rank does where wall time cannot) and the max abs difference
of the SP output from the serial one. Other load shows up directly in the wall times: run it on an
otherwise idle machine.

    .venv/bin/python benchmarks/sp_attention_speed.py [--families pixart flux] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

LAYOUTS = {"serial": (1, 1), "ulysses=2": (2, 1), "ring=2": (1, 2), "diffusers-ulysses=2": (2, 1)}
# diffusers' own context parallelism ships a plan for Flux only among the families here.
DIFFUSERS_CP_FAMILIES = ("flux",)
HEADS, HEAD_DIM, TEXT_TOKENS, TEXT_DIM = 4, 32, 64, 64


def build(family: str):
    import torch
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(0)
    if family == "pixart":
        model = PixArtTransformer2DModel(
            num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=4,
            cross_attention_dim=HEADS * HEAD_DIM, sample_size=128, caption_channels=TEXT_DIM, use_additional_conditions=False,
        )
    elif family == "flux":
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=(8, 12, 12),
        )
    else:
        raise SystemExit(f"unknown family {family!r}; this benchmark knows pixart and flux")
    return model.eval()


def inputs(family: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)
    if family == "pixart":
        return dict(hidden_states=torch.randn(1, 4, 128, 128, generator=generator), encoder_hidden_states=text,
                    timestep=torch.tensor([500.0]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    image_ids = torch.zeros(64 * 64, 3)
    image_ids[:, 1] = torch.arange(64).repeat_interleave(64)
    image_ids[:, 2] = torch.arange(64).repeat(64)
    return dict(hidden_states=torch.randn(1, 64 * 64, 16, generator=generator), encoder_hidden_states=text,
                pooled_projections=torch.randn(1, TEXT_DIM, generator=generator), timestep=torch.tensor([0.5]),
                img_ids=image_ids, txt_ids=torch.zeros(TEXT_TOKENS, 3), return_dict=False)


def worker(args: argparse.Namespace) -> None:
    """One process of one measurement; rank 0 writes {seconds, max_diff} to --result."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ulysses, ring = LAYOUTS[args.layout]
    world = ulysses * ring
    model, kwargs = build(args.family), inputs(args.family)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=world,
                                timeout=timedelta(seconds=300))
    if args.layout.startswith("diffusers-"):
        from diffusers import ContextParallelConfig

        # diffusers places rank r on accelerator r % device_count; on a CPU-only machine that count is 0.
        torch.accelerator.device_count = lambda: 1
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses))
    elif world > 1:
        from costmodel.config import ParallelConfig, Placement
        from executor.sp import enable_sequence_parallel

        placement = Placement(ParallelConfig(ulysses=ulysses, ring=ring))
        groups = {axis: (dist.new_group(placement.groups(axis)[0]) if placement.config.degree(axis) > 1 else None)
                  for axis in ("ulysses", "ring")}
        enable_sequence_parallel(model, args.family, groups["ulysses"], groups["ring"])
    from executor.device import now, seconds_since

    output_device = next(model.parameters()).device
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            if world > 1:
                dist.barrier()
            started, cpu_started = now(output_device), time.process_time()
            output = model(**kwargs)[0]
            times.append((seconds_since(started, output_device), time.process_time() - cpu_started))
    if args.rank == 0:
        reference = Path(args.result).with_name(f"{args.family}-serial.pt")
        if world == 1:
            torch.save(output, reference)
            max_diff = 0.0
        else:
            max_diff = float((output - torch.load(reference)).abs().max())
        wall, cpu = min(times[1:])
        Path(args.result).write_text(json.dumps({"seconds": wall, "cpu_seconds": cpu, "max_diff": max_diff}))
    if world > 1:
        dist.destroy_process_group()


def measure(family: str, layout: str, repeats: int, folder: Path) -> dict:
    ulysses, ring = LAYOUTS[layout]
    result = folder / f"{family}-{layout}.json"
    init = folder / f"{family}-{layout}.init"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--worker", "--family", family, "--layout", layout, "--repeats", str(repeats),
               "--init", str(init), "--result", str(result)]
    processes = [subprocess.Popen([*command, "--rank", str(rank)], env=env) for rank in range(ulysses * ring)]
    codes = [p.wait(timeout=1800) for p in processes]
    if any(codes) and not result.exists():
        return None
    if any(codes):
        # Seen with diffusers' context parallelism: an abort at process exit, after the figures were written.
        print(f"  ({family} {layout}: workers exited {codes} after writing their figures)", file=sys.stderr)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["pixart", "flux"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{'family':<8} {'layout':<20} {'s/forward':>10} {'speedup':>8} {'cpu s/rank':>10} {'max|diff|':>10}")
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            serial = None
            for layout in LAYOUTS:
                if layout.startswith("diffusers-") and family not in DIFFUSERS_CP_FAMILIES:
                    continue
                figures = measure(family, layout, args.repeats, Path(folder))
                if figures is None and layout == "serial":
                    raise SystemExit(f"{family}: the serial run failed; nothing to compare against")
                if figures is None:
                    print(f"{family:<8} {layout:<20} failed (see the workers' output above)", flush=True)
                    continue
                serial = serial or figures["seconds"]
                print(f"{family:<8} {layout:<20} {figures['seconds']:>10.3f} {serial / figures['seconds']:>7.2f}x "
                      f"{figures['cpu_seconds']:>10.3f} {figures['max_diff']:>10.2e}", flush=True)


if __name__ == "__main__":
    main()
