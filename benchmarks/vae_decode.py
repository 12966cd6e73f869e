"""Patch-parallel VAE decode on this machine: peak memory per rank (measured) beside the cost
model's prediction, wall time, and the largest difference from the one-process decode.

For each tiny family VAE (AutoencoderKL of tiny-pixart-alpha; CogVideoX's 3D VAE of
tiny-cogvideox-2b) and each rank count (1, 2, 4), the ranks (gloo, one CPU thread each) decode the
same seeded latent in row strips. Peak memory of a rank is its resident-set high-water mark during
the decode minus its resident set just before (the mark is reset first through
/proc/self/clear_refs), so the model and the interpreter do not count; the prediction is
`costmodel.pipeline_stages.decode_activations_gib` for the tiny model's profile.

    python benchmarks/vae_decode.py [--out benchmarks/results/vae-decode-DATE-cpu.txt]

Wall times on a shared machine are disturbed by other load; the memory figures are not.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model id -> (output height, width, frames)
CASES = {"tiny-pixart-alpha": (1024, 1024, 1), "tiny-cogvideox-2b": (512, 512, 9)}
RANKS = (1, 2, 4)
MIB = 2**20


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def worker(model_id: str, height: int, width: int, frames: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from costmodel.specs import load_model
    from executor.tiny import load_tiny_spec
    from executor.vae import DecodeGroup, strip_parallel

    import diffusers

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    recipe = load_tiny_spec(model_id)["build"]["components"]["vae"]
    torch.manual_seed(0)
    vae = getattr(diffusers, recipe["class"])(**recipe["config"]).eval()
    spec = load_model(model_id)
    latent_shape = [1, spec.vae_latent_channels, height // spec.vae_spatial_factor, width // spec.vae_spatial_factor]
    if frames > 1:
        latent_shape.insert(2, spec.latent_frames(frames))
    latent = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))
    group = DecodeGroup(list(range(world)), rank, dist.new_group(list(range(world)))) if world > 1 else None
    if world > 1:
        dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    with torch.no_grad():
        if group is None:
            image = vae.decode(latent, return_dict=False)[0]
        else:
            with strip_parallel(vae, group):
                image = vae.decode(latent, return_dict=False)[0]
    seconds = time.perf_counter() - started
    peak_mib = (_status_kib("VmHWM") - before) / 1024
    record = {"rank": rank, "peak_mib": peak_mib, "seconds": seconds}
    if rank == 0:
        torch.save(image, out.with_suffix(".pt"))
    out.with_name(f"{out.stem}-rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(model_id: str, ranks: int, folder: Path) -> dict:
    height, width, frames = CASES[model_id]
    out = folder / f"{model_id}-{ranks}"
    port = _free_port()
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", model_id, str(height), str(width), str(frames), str(out)], env=env))
    for process in processes:
        if process.wait(timeout=1200) != 0:
            raise SystemExit(f"{model_id} on {ranks} rank(s): a rank failed")
    records = [json.loads(out.with_name(f"{out.stem}-rank{r}.json").read_text()) for r in range(ranks)]
    return {"peak_mib": max(r["peak_mib"] for r in records), "seconds": max(r["seconds"] for r in records),
            "image": out.with_suffix(".pt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "H", "W", "FRAMES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_id, height, width, frames, out = args.worker
        worker(model_id, int(height), int(width), int(frames), Path(out))
        return
    import torch
    from tqdm import tqdm

    from costmodel.pipeline_stages import decode_activations_gib
    from costmodel.specs import load_model

    lines = ["model              size          ranks  peak MiB/rank measured  predicted  decode s  max diff (8-bit levels)"]
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(CASES) * len(RANKS), desc="vae decode") as bar:
        for model_id, (height, width, frames) in CASES.items():
            spec = load_model(model_id)
            reference = None
            for ranks in RANKS:
                result = run_case(model_id, ranks, Path(tmp))
                image = torch.load(result["image"])
                levels = lambda x: (x / 2 + 0.5).clamp(0, 1).mul(255).round()  # noqa: E731
                reference = image if reference is None else reference
                diff = float((levels(image) - levels(reference)).abs().max())
                predicted = decode_activations_gib(spec, height, width, frames, ranks) * 1024
                size = f"{width}x{height}" + (f"x{frames}" if frames > 1 else "")
                lines.append(f"{model_id:<18} {size:<13} {ranks:>5}  {result['peak_mib']:>22.1f}  {predicted:>9.1f}"
                             f"  {result['seconds']:>8.2f}  {diff:>23.0f}")
                bar.update()
    lines += ["", "measured: resident-set high-water mark during the decode above the resident set before it, largest rank;",
              "predicted: costmodel.pipeline_stages.decode_activations_gib, a model of GPU activations (no convolution",
              "workspace); decode s: slowest rank, on this machine's CPUs (gloo, one thread per rank)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
