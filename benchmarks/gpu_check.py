"""Real-size DiT blocks on one GPU, measured vs predicted by the built-in profile of that GPU.

For a machine with an NVIDIA H100 or H200 (not run in CI). It
1. profiles the GPU's operators as `ditplan profile` does (nn.Linear, SDPA per head dimension,
   elementwise passes, tanh-GELU; bf16, CUDA-synchronised wall time);
2. builds single diffusers blocks with random weights in bf16 from the figures of
   profiles/models/{pixart-alpha,flux-dev}.yaml (nothing is downloaded): PixArt-alpha's block at
   1024x1024 and 2048x2048 (CFG batch of 2), Flux's double (joint) and single blocks at 1024x1024;
3. times each block and prints measured vs predicted by the built-in hardware profile
   (h100-sxm-nvlink-8 / h200-sxm-nvlink-8, datasheet rooflines) and vs the GPU's own measured
   operator tables, and writes the report with the date and the device to --out.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check-<device>-<date>.txt]

Runs in about a minute on an H100. `--smoke` runs the same code on the CPU at toy size (tests).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="report file (default: benchmarks/results/gpu_check-<device>-<date>.txt)")
    parser.add_argument("--smoke", action="store_true", help="run the blocks at toy size on the CPU (checks the code only)")
    args = parser.parse_args(argv)

    import torch

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
    report = "\n".join(lines)
    print(report)
    if not args.smoke:
        out.write_text(report + "\n\n" + json.dumps(records, indent=2) + "\n")
        print(f"\nreport written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
