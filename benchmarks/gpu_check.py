"""Real-size DiT blocks on one GPU, measured vs predicted by the built-in profile of that GPU.

For a machine with an NVIDIA H100 or H200 (not run in CI). It
1. profiles the GPU's operators as `ditplan profile` does (nn.Linear, SDPA per head dimension,
   elementwise passes, tanh-GELU; bf16, CUDA-synchronised wall time);
2. builds single diffusers blocks with random weights in bf16 from the figures of
   profiles/models/{pixart-alpha,flux-dev}.yaml (nothing is downloaded): PixArt-alpha's block at
   1024x1024 and 2048x2048 (CFG batch of 2), Flux's double (joint) and single blocks at 1024x1024;
3. times each block and prints measured vs predicted by the built-in hardware profile
   (h100-sxm-nvlink-8 / h200-sxm-nvlink-8, datasheet rooflines) and vs the GPU's own measured
   operator tables, and writes the report with the date and the device to --out;
4. where two GPUs are visible, runs the executor on 2 ranks over NCCL (CFG, DP, Ulysses, Ring and
   PipeFusion on the tiny PixArt pipeline), compares each plan's final latents with the one-process
   loop, and replays the ranks' recorded calls under NCCL's rules (executor.nccl_rules). With one
   GPU it says so and skips this part.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check-<device>-<date>.txt]

Runs in about a minute on an H100. `--smoke` runs the same code on the CPU at toy size, and the
2-rank check on two CPU processes over gloo (tests). `--ranks-only` runs only the 2-rank check.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from costmodel import compute, load_cluster, load_model  # noqa: E402
from costmodel.compute import BlockWork  # noqa: E402
from costmodel.errors import DitplanError  # noqa: E402

CLUSTER_FOR_GPU = {"H200": "h200-sxm-nvlink-8", "H100": "h100-sxm-nvlink-8"}  # matched in this order


@dataclass(frozen=True)
class BlockCase:
    """One block of a real model at one resolution: what the cost model and the timer both need."""

    name: str
    model: str  # model id (profiles/models)
    kind: str  # block kind: cross (PixArt), joint (Flux double), single (Flux single)
    height: int
    width: int
    batch: int  # 2 for a CFG model's guidance batch in one process

    def tokens(self) -> tuple[int, int]:
        """(image tokens, text tokens that join the attention)."""
        spec = load_model(self.model)
        text = spec.text_tokens if spec.text_joins_attention else 0
        return spec.image_tokens(self.height, self.width, 1), text


CASES = (
    BlockCase("PixArt-alpha block 1024x1024", "pixart-alpha", "cross", 1024, 1024, 2),
    BlockCase("PixArt-alpha block 2048x2048", "pixart-alpha", "cross", 2048, 2048, 2),
    BlockCase("Flux double block 1024x1024", "flux-dev", "joint", 1024, 1024, 1),
    BlockCase("Flux single block 1024x1024", "flux-dev", "single", 1024, 1024, 1),
)


def cluster_for_device(name: str) -> str:
    """The built-in cluster whose GPU this device is, from its CUDA name ('NVIDIA H100 80GB HBM3')."""
    for marker, cluster in CLUSTER_FOR_GPU.items():
        if marker in name.upper():
            return cluster
    raise DitplanError(f"GPU {name!r} has no built-in profile this check knows; it compares H100 and H200 "
                       f"({', '.join(CLUSTER_FOR_GPU.values())}).")


def predicted_seconds(case: BlockCase, cluster_id_or_path: str) -> float:
    """The cost model's time of one such block on one GPU of the cluster (no communication)."""
    cluster = load_cluster(cluster_id_or_path, gpus=1)
    model = load_model(case.model)
    image, text = case.tokens()
    work = BlockWork(case.kind, case.batch, image, text, image + text, image + text, 1.0)
    return compute.block_seconds(cluster, model, work)


# ---------------------------------------------------------------- the torch side

def build_block(case: BlockCase, device: str, dtype, scale: float = 1.0):
    """(block, call) for the case: a diffusers block with random weights and random inputs.

    `scale` < 1 shrinks hidden size and tokens (the --smoke run on CPU)."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock, FluxTransformerBlock

    spec = load_model(case.model)
    heads = max(2, int(spec.num_heads * scale))
    head_dim = spec.head_dim if scale == 1.0 else 16
    dim = heads * head_dim
    image, text = case.tokens()
    image, text = max(16, int(image * scale * scale)), max(4, int(text * scale))
    side = int(image**0.5)
    image = side * side
    torch.manual_seed(0)
    options = {"device": device, "dtype": dtype}
    if case.kind == "cross":
        block = BasicTransformerBlock(dim, heads, head_dim, cross_attention_dim=dim, activation_fn="gelu-approximate",
                                      num_embeds_ada_norm=1000, attention_bias=True, norm_type="ada_norm_single",
                                      norm_elementwise_affine=False, norm_eps=1e-6)
        block = block.to(**options).eval()
        hidden = torch.randn(case.batch, image, dim, **options)
        caption = torch.randn(case.batch, spec.text_tokens if scale == 1.0 else 8, dim, **options)
        timestep = torch.randn(case.batch, 6 * dim, **options)
        return block, lambda: block(hidden, encoder_hidden_states=caption, timestep=timestep)
    axes = [16, 56, 56] if scale == 1.0 else [4, 6, 6]
    rope = FluxPosEmbed(theta=10000, axes_dim=axes)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    ids = torch.cat([torch.zeros(text, 3), torch.stack([torch.zeros(image), rows, cols], dim=1)]).to(device)
    rotary = tuple(t.to(device) for t in rope(ids))
    hidden = torch.randn(case.batch, image, dim, **options)
    context = torch.randn(case.batch, text, dim, **options)
    temb = torch.randn(case.batch, dim, **options)
    block_cls = FluxTransformerBlock if case.kind == "joint" else FluxSingleTransformerBlock
    block = block_cls(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim).to(**options).eval()
    return block, lambda: block(hidden, context, temb, image_rotary_emb=rotary)


def time_block(case: BlockCase, device: str, dtype, scale: float = 1.0, repeats: int = 10) -> float:
    import torch

    from costmodel.profiler.compute_bench import median_seconds

    block, call = build_block(case, device, dtype, scale)
    with torch.no_grad():
        call()  # warm-up: kernel selection, allocator growth
        seconds = median_seconds(call, repeats=repeats, device=device)
    del block
    return seconds


def write_operation_profile(path: Path, cluster_id: str) -> Path:
    """The built-in cluster with its hardware replaced by this GPU's measured operator tables."""
    import yaml

    from costmodel.profiler import compute_bench, fit
    from costmodel.topology import CLUSTERS_DIR, HARDWARE_DIR

    gemm = compute_bench.gemm_samples(device="cuda", dtype="bfloat16")
    attention = compute_bench.attention_samples(device="cuda", dtype="bfloat16")
    elementwise = compute_bench.elementwise_samples(device="cuda", dtype="bfloat16")
    activation = compute_bench.activation_samples(device="cuda", dtype="bfloat16")
    data = yaml.safe_load((CLUSTERS_DIR / f"{cluster_id}.yaml").read_text())
    data["hardware"] = yaml.safe_load((HARDWARE_DIR / f"{data['hardware']}.yaml").read_text())
    data["id"] = f"{cluster_id}-measured-ops"
    data["measured"] = {
        "source": "benchmarks/gpu_check.py operator tables",
        "operations": {
            "serial_host": False,
            "gemm": {"points": fit.binned_table((s.size, s.seconds) for s in gemm)},
            "attention": [{"head_dim": d, "points": fit.binned_table((s.size, s.seconds) for s in attention if s.shape[-1] == d)}
                          for d in sorted({s.shape[-1] for s in attention})],
            "elementwise": {"points": fit.monotone_points((s.size, s.seconds) for s in elementwise)},
            "activation": {"points": fit.monotone_points((s.size, s.seconds) for s in activation)},
        },
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return path


# ---------------------------------------------------------------- the 2-rank check

TWO_RANK_PLANS = ("cfg=2", "dp=2", "ulysses=2", "ring=2", "pipefusion=2,patches=2,warmup=1")
TWO_RANK_MODEL = "tiny-pixart-alpha"
TWO_RANK_PROMPTS = ["a photo of a cat", "a red car at night"]
TWO_RANK_STEPS = 3
# fp32 tiny model: kernels and reduction orders differ between one and two GPUs by rounding only.
TWO_RANK_TOLERANCE = 1e-3


def _reference_latents(plan: str, device: str):
    """Final latents of the one-process loop for `plan`'s algorithm (patch-sequential for PipeFusion)."""
    import torch

    from costmodel.config import ParallelConfig
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise
    from executor.tiny import build_tiny_pipeline

    config = ParallelConfig.parse(plan)
    adapter = adapter_for(build_tiny_pipeline(TWO_RANK_MODEL, seed=0).to(device))
    request = GenerationRequest(prompts=TWO_RANK_PROMPTS, num_inference_steps=TWO_RANK_STEPS,
                                generators=[torch.Generator().manual_seed(i) for i in range(len(TWO_RANK_PROMPTS))])
    job = adapter.prepare(request)
    with torch.no_grad():
        return denoise(job, adapter, ParallelConfig(patches=config.patches, warmup=config.warmup))


def _two_rank_worker(rank: int, port: int, backend: str, folder: str, results: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DITPLAN_COLLECTIVE_TIMEOUT_S="120")
    import torch

    from executor.comm_trace import install

    install(folder)
    from executor import parallelize
    from executor.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    rows = []
    for plan in TWO_RANK_PLANS:
        parallel = parallelize(build_tiny_pipeline(TWO_RANK_MODEL, seed=0), plan=plan, backend=backend, show_progress=False)
        output = parallel(prompt=TWO_RANK_PROMPTS, num_inference_steps=TWO_RANK_STEPS, seed=0, output_type="latent")
        parallel.close()
        if rank == 0:
            reference = _reference_latents(plan, str(parallel.device))
            rows.append({"plan": plan, "max_abs": (output.images.to(reference.device) - reference).abs().max().item(),
                         "loop_s": parallel.last_timings.loop_s})
    if rank == 0:
        Path(results).write_text(json.dumps(rows))


def two_rank_check(backend: str) -> list[str]:
    """Report lines of the 2-rank check over `backend` (see the module docstring, step 4)."""
    import torch.multiprocessing as mp

    from executor.nccl_rules import check

    with tempfile.TemporaryDirectory() as work:
        folder, results = Path(work) / "communication", Path(work) / "results.json"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_two_rank_worker, args=(port, backend, str(folder), str(results)), nprocs=2, join=True)
        rows = json.loads(results.read_text())
        findings = check(folder)
    lines = [f"2-rank check over {backend}: {TWO_RANK_MODEL}, {TWO_RANK_STEPS} steps, {len(TWO_RANK_PROMPTS)} prompts",
             f"{'plan':36s} {'max |latents - one process|':>28s} {'loop s':>8s}  result"]
    for row in rows:
        verdict = "ok" if row["max_abs"] <= TWO_RANK_TOLERANCE else f"DIFFERS (> {TWO_RANK_TOLERANCE})"
        lines.append(f"{row['plan']:36s} {row['max_abs']:28.2e} {row['loop_s']:8.3f}  {verdict}")
    lines.append("NCCL rules on the recorded calls: " + ("no finding" if not findings else f"{len(findings)} finding(s)"))
    lines += [f"  {finding}" for finding in findings[:5]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="report file (default: benchmarks/results/gpu_check-<device>-<date>.txt)")
    parser.add_argument("--smoke", action="store_true", help="run the blocks at toy size on the CPU (checks the code only)")
    parser.add_argument("--ranks-only", action="store_true", help="run only the 2-rank check (NCCL on 2 GPUs; gloo with --smoke)")
    args = parser.parse_args(argv)

    import torch

    gpus = 0 if args.smoke else torch.cuda.device_count()
    if args.smoke or gpus >= 2:
        rank_lines = two_rank_check("gloo" if args.smoke else "nccl")
    else:
        rank_lines = [f"2-rank NCCL check: not run; this machine has {gpus} visible GPU(s) and the check needs two."]
    if args.ranks_only:
        print("\n".join(rank_lines))
        return 0 if not any("DIFFERS" in line or "finding(s)" in line for line in rank_lines) else 1

    if args.smoke:
        device, dtype, scale, device_name, cluster_id = "cpu", torch.float32, 0.125, "CPU (smoke run)", "h100-sxm-nvlink-8"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run it on a machine with an H100 or H200 (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, scale = "cuda", torch.bfloat16, 1.0
        device_name = torch.cuda.get_device_name(0)
        try:
            cluster_id = cluster_for_device(device_name)
        except DitplanError as error:
            print(f"gpu_check: {error}", file=sys.stderr)
            return 2
    today = datetime.datetime.now(datetime.timezone.utc)
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check-{slug}-{today:%Y%m%d}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    measured_ops = None if args.smoke else write_operation_profile(out.with_suffix(".profile.yaml"), cluster_id)

    lines = [f"gpu_check {today:%Y-%m-%d %H:%M} UTC on {device_name}; torch {torch.__version__}; "
             f"built-in profile {cluster_id}", ""]
    header = f"{'block':32s} {'tokens':>12s} {'measured':>10s} {'built-in':>10s} {'error':>8s} {'op tables':>10s} {'error':>8s}"
    lines += [header, "-" * len(header)]
    records = []
    for case in CASES:
        image, text = case.tokens()
        measured = time_block(case, device, dtype, scale)
        builtin = predicted_seconds(case, cluster_id)
        from_ops = predicted_seconds(case, str(measured_ops)) if measured_ops else float("nan")
        records.append({"block": case.name, "image_tokens": image, "text_tokens": text, "batch": case.batch,
                        "measured_s": measured, "builtin_s": builtin, "op_tables_s": from_ops})
        lines.append(f"{case.name:32s} {f'{case.batch}x{image}+{text}':>12s} {measured * 1e3:8.2f}ms {builtin * 1e3:8.2f}ms "
                     f"{(builtin / measured - 1) * 100:+7.1f}% {from_ops * 1e3:8.2f}ms {(from_ops / measured - 1) * 100:+7.1f}%")
    if args.smoke:
        lines.append("(smoke run: toy-size blocks on the CPU; the predictions are for the real sizes on an H100)")
    lines += ["", *rank_lines]
    report = "\n".join(lines)
    print(report)
    if not args.smoke:
        out.write_text(report + "\n\n" + json.dumps(records, indent=2) + "\n")
        print(f"\nreport written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
