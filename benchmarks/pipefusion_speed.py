"""PipeFusion speed and memory on this machine: 2 processes x 1 thread against 1 process x 1 thread.

Builds a heavier variant of the tiny PixArt-alpha pipeline (more and wider blocks, a larger image, so
the transformer's compute dominates), writes its model YAML (figures measured from the built
modules) so the cost model can predict it, and runs the denoising loop through
`executor.parallelize` as:

    serial                       one process, one thread
    pipefusion=2,patches=M       two processes (gloo), one thread each, for each M asked for

It prints, per configuration: seconds of the denoising loop (median of --repeats after one warm-up
call), speedup over serial, CPU seconds per rank (and the speedup they allow), and per rank the transformer parameters it keeps, its stale K/V buffer
bytes, the bytes it sent, and its peak resident memory; next to each, the cost model's prediction
(`costmodel.simulate` on --cluster with 2 GPUs: its params and kv_buffers parts, in the model's
fp32). Other load on the machine shows in these figures: run it on an otherwise idle machine.

    .venv/bin/python benchmarks/pipefusion_speed.py [--patches 2 4 8] [--steps 8] [--warmup 1] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE = "tiny-pixart-alpha"


def heavy_spec(layers: int, head_dim: int, size: int) -> dict:
    from executor.tiny import derive_spec

    return derive_spec(BASE, f"{BASE}-heavy", transformer={"num_layers": layers, "attention_head_dim": head_dim,
                                                                  "cross_attention_dim": 4 * head_dim},  # 4 heads
                       defaults={"default_height": size, "default_width": size})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from executor import parallelize
    from executor.device import peak_memory_bytes, reset_peak_memory
    from executor.pipefusion.partition import parameter_count
    from executor.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(heavy_spec(args["layers"], args["head_dim"], args["size"]), seed=0)
    plans = ["cfg=1"] if world == 1 else [f"pipefusion=2,patches={m},warmup={args['warmup']}" for m in args["patches"]]
    rows = []
    for plan in plans:
        parallel = parallelize(pipe, plan=plan, show_progress=False)
        rss_before = _rss_bytes()
        reset_peak_memory(parallel.device)
        times, cpu = [], []
        for _ in range(args["repeats"] + 1):  # the first call warms up (allocations, kernels)
            cpu_started = time.process_time()
            parallel(prompt="a lighthouse at dusk", num_inference_steps=args["steps"], seed=0, output_type="latent",
                     height=args["size"], width=args["size"])
            times.append(parallel.last_timings.loop_s)
            cpu.append(time.process_time() - cpu_started)
        stage = getattr(pipe.transformer, "_ditplan_pipefusion_stage", None)
        stats = stage[0].stats if stage else {}
        rows.append({
            "plan": plan, "rank": rank, "loop_s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu[1:]),
            "params": parameter_count(pipe.transformer), "kv_bytes": stats.get("kv_buffer_bytes", 0),
            "sent_bytes": stats.get("sent_bytes", 0), "units": stats.get("units"),
            "rss_before_gib": rss_before / 2**30, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            # On a GPU the allocator's peak is the memory figure (the host's RSS holds no activations there).
            "peak_gpu_gib": (peak_memory_bytes(parallel.device) or 0) / 2**30 if parallel.device.type == "cuda" else None,
        })
    Path(f"{out}.{world}.{rank}").write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictions(yaml_path: Path, cluster: str, patches: list[int], steps: int, warmup: int) -> dict[str, dict]:
    from costmodel import load_cluster, load_model, simulate

    model, machine = load_model(str(yaml_path)), load_cluster(cluster, gpus=2)
    out = {}
    for m in patches:
        plan = f"pipefusion=2,patches={m},warmup={warmup}"
        out[plan] = simulate(model, machine, plan, steps=steps).memory
    out["cfg=1"] = simulate(model, load_cluster(cluster, gpus=1), "cfg=1", steps=steps).memory
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8], help="patch counts M to time under pipefusion=2")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per call")
    parser.add_argument("--warmup", type=int, default=1, help="synchronous full-image steps before the patch pipeline (0: none)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per configuration (after one warm-up call)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks of the heavy variant")
    parser.add_argument("--head-dim", type=int, default=64, help="attention head dim of the heavy variant (heads stay the tiny model's)")
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--cluster", default="l40-pcie-8", help="cluster whose memory model the prediction uses")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    from executor.tiny import quiet_libraries, write_model_yaml

    quiet_libraries()
    settings = {"layers": args.layers, "head_dim": args.head_dim, "size": args.size, "steps": args.steps,
                "repeats": args.repeats, "patches": args.patches, "warmup": args.warmup}
    with tempfile.TemporaryDirectory() as folder:
        yaml_path = write_model_yaml(heavy_spec(args.layers, args.head_dim, args.size), Path(folder) / f"{BASE}-heavy.yaml")
        predicted = predictions(yaml_path, args.cluster, args.patches, args.steps, args.warmup)
        out = str(Path(folder) / "rows")
        started = time.perf_counter()
        for world in (1, 2):
            mp.spawn(worker, args=(world, _free_port(), settings, out), nprocs=world, join=True)
        rows = [r for world in (1, 2) for rank in range(world) for r in json.loads(Path(f"{out}.{world}.{rank}").read_text())]
    serial = next(r["loop_s"] for r in rows if r["plan"] == "cfg=1")
    serial_cpu = next(r["cpu_s"] for r in rows if r["plan"] == "cfg=1")
    busiest = {plan: max(r["cpu_s"] for r in rows if r["plan"] == plan) for plan in {r["plan"] for r in rows}}
    print(f"{BASE}-heavy: {args.layers} blocks, head_dim {args.head_dim}, {args.size}x{args.size} px, {args.steps} steps, CFG on, fp32, "
          f"1 thread per process (wall {time.perf_counter() - started:.0f} s)")
    print(f"{'plan':<32}{'rank':>5}{'loop s':>9}{'speedup':>9}{'cpu s':>8}{'cpu ×':>7}{'params M':>10}{'pred M':>8}{'KV MiB':>8}"
          f"{'pred MiB':>9}{'sent MiB':>9}{'RSS GiB':>9}{'GPU GiB':>9}")
    for r in rows:
        mem = predicted[r["plan"]]
        pred_params = mem["params_gib"] * 2**30 / 4 / 1e6  # the YAML's dtype_bytes is 4 (fp32)
        speedup = serial / r["loop_s"] if r["loop_s"] else float("nan")
        print(f"{r['plan']:<32}{r['rank']:>5}{r['loop_s']:>9.2f}{speedup:>9.2f}{r['cpu_s']:>8.2f}{serial_cpu / busiest[r['plan']]:>7.2f}"
              f"{r['params'] / 1e6:>10.2f}{pred_params:>8.2f}{r['kv_bytes'] / 2**20:>8.1f}{mem['kv_buffers_gib'] * 1024:>9.1f}"
              f"{r['sent_bytes'] / 2**20:>9.1f}{r['peak_rss_gib']:>9.2f}"
              f"{'-' if r['peak_gpu_gib'] is None else format(r['peak_gpu_gib'], '.2f'):>9}")
    print("speedup: serial loop seconds / this plan's (wall clock). cpu s: CPU seconds this process spent in the loop;\n"
          "cpu ×: serial CPU seconds / the busiest rank's, the speedup the split allows when every process has a core\n"
          "to itself (it ignores waiting, so it bounds the wall-clock speedup from above on a loaded machine).\n"
          "params M: transformer parameters kept on the rank (pred: the cost model's params part, max over stages);\n"
          "KV MiB: stale K/V buffers held (pred: kv_buffers part); RSS: peak resident memory of the whole process "
          "(text encoder, VAE, Python and torch included); GPU: the allocator's peak on a GPU (- on the CPU).")


if __name__ == "__main__":
    main()
