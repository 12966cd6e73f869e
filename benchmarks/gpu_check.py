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
4. builds every real catalogue model's whole transformer at full size from its published config
   (benchmarks/published_transformers.py; random weights, bf16, nothing downloaded), times one
   denoising step (the whole batch, both CFG halves) and prints it beside the cost model's 1-GPU
   step, from the built-in profile and from the measured operator tables;
5. where two GPUs are visible, runs the executor on 2 ranks over NCCL (CFG, DP, Ulysses, Ring and
   PipeFusion on the tiny PixArt pipeline), compares each plan's final latents with the one-process
   loop, and replays the ranks' recorded calls under NCCL's rules (executor.nccl_rules). With one
   GPU it says so and skips this part.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check-<device>-<date>.txt]

Runs in a few minutes on an H100 (`--models` picks the transformers, `--kernels N` lists each one's
costliest kernels). `--vae` also times whole VAE decodes against the cost model's. `--reprice REPORT`
measures nothing: it predicts an earlier report's steps again with today's profiles. `--smoke` runs
the same code on the CPU at toy size (one small transformer at 256x256), and the 2-rank check on two
CPU processes over gloo (tests). `--ranks-only` runs only the 2-rank check.
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

sys.path.insert(0, str(ROOT / "benchmarks"))
from published_transformers import published_models  # noqa: E402

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


# ---------------------------------------------------------------- whole transformers

SMOKE_TRANSFORMER = ("pixart-alpha", 256, 256, 1)


def _size(height: int, width: int, frames: int) -> str:
    return f"{width}x{height}" + (f"x{frames}" if frames > 1 else "")


def time_transformer(model_id: str, batch: int, height: int, width: int, frames: int, device: str, dtype,
                     kernels: int = 0) -> tuple[float, list[str]]:
    """Wall time of one forward of the model's whole transformer (one denoising step, the whole
    batch), synchronised: the median of enough calls to fill about a second, after two warm-ups;
    and, with `kernels` > 0, that many report lines on the kernels that took the most device time
    in one more step (torch.profiler)."""
    import statistics
    import time

    import torch

    from published_transformers import build, inputs

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 from the start: Qwen-Image's 20 B fp32 weights would not fit
    try:
        with torch.device(device):
            module = build(model_id).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    arguments = inputs(model_id, batch, height, width, frames,
                       tensor=lambda *shape: torch.randn(*shape, device=device, dtype=dtype))

    def step() -> float:
        start = time.perf_counter()
        module(**arguments)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        step()
        once = step()
        times = [step() for _ in range(max(3, min(20, round(1.0 / once))))]
        return statistics.median(times), (_top_kernels(step, kernels, device) if kernels else [])


def _top_kernels(step, count: int, device: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step()
    if device.startswith("cuda"):  # the kernels themselves, not the aten calls that launched them
        events = ([e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
                  or [e for e in prof.key_averages() if e.self_device_time_total > 0])
        key = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = list(prof.key_averages())
        key = lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(key(e) for e in events) or 1.0
    lines = []
    for event in sorted(events, key=key, reverse=True)[:count]:
        lines.append(f"    {key(event) / 1e3:9.2f}ms {100 * key(event) / total:5.1f}% {event.count:6d} calls  {event.key[:90]}")
    return lines


def predicted_step_seconds(model_id: str, height: int, width: int, frames: int, cluster_id_or_path: str) -> float:
    """The cost model's denoising step of the model on one GPU of the cluster."""
    from costmodel import ParallelConfig, simulate

    result = simulate(load_model(model_id), load_cluster(cluster_id_or_path, gpus=1), ParallelConfig(),
                      height=height, width=width, frames=frames, steps=20)
    return result.per_step_s


def transformer_lines(models: list[str], device: str, dtype, cluster_id: str, measured_ops: Path | None,
                      emit, size_index: int = 0, kernels: int = 0) -> list[dict]:
    """Time each model's step, `emit` its report line as it comes, and return the records."""
    from published_transformers import two_sizes

    emit(f"{'transformer step':18s} {'size':>14s} {'batch':>5s} {'measured':>10s} {'built-in':>10s} {'error':>8s} "
         f"{'op tables':>10s} {'error':>8s}")
    records = []
    for model_id in models:
        height, width, frames = (SMOKE_TRANSFORMER[1:] if device == "cpu" else two_sizes(model_id)[size_index])
        size = _size(height, width, frames)
        batch = 2 if load_model(model_id).uses_cfg else 1
        try:
            measured, kernel_lines = time_transformer(model_id, batch, height, width, frames, device, dtype, kernels)
        except Exception as error:  # one model failing (memory, a diffusers change) must not lose the rest
            emit(f"{model_id:18s} {size:>14s} {batch:5d}  failed: {type(error).__name__}: {str(error)[:160]}")
            continue
        finally:
            if device.startswith("cuda"):  # the module is gone with time_transformer's frame
                import torch

                torch.cuda.empty_cache()
        builtin = predicted_step_seconds(model_id, height, width, frames, cluster_id)
        from_ops = predicted_step_seconds(model_id, height, width, frames, str(measured_ops)) if measured_ops else float("nan")
        records.append({"model": model_id, "height": height, "width": width, "frames": frames, "batch": batch,
                        "measured_s": measured, "builtin_s": builtin, "op_tables_s": from_ops})
        emit(f"{model_id:18s} {size:>14s} {batch:5d} {measured * 1e3:8.1f}ms {builtin * 1e3:8.1f}ms "
             f"{(builtin / measured - 1) * 100:+7.1f}% {from_ops * 1e3:8.1f}ms {(from_ops / measured - 1) * 100:+7.1f}%")
        for line in kernel_lines:
            emit(line)
    return records


def reprice(report: Path, cluster_id: str, measured_ops: Path | None) -> list[str]:
    """The transformer steps an earlier report measured, predicted again by today's profiles."""
    import statistics

    text = report.read_text()
    records = [r for r in json.loads(text[text.index("\n[") + 1:]) if "model" in r]
    lines = [f"{'transformer step':18s} {'size':>14s} {'measured':>10s} {'built-in':>10s} {'error':>8s} "
             f"{'then':>8s} {'op tables':>10s} {'error':>8s} {'then':>8s}"]
    errors: dict[str, list[float]] = {"builtin": [], "builtin_then": [], "ops": [], "ops_then": []}
    for r in records:
        sizes = r["height"], r["width"], r["frames"]
        measured = r["measured_s"]
        builtin = predicted_step_seconds(r["model"], *sizes, cluster_id)
        ops = predicted_step_seconds(r["model"], *sizes, str(measured_ops)) if measured_ops else float("nan")
        error = {key: seconds / measured - 1 for key, seconds in (
            ("builtin", builtin), ("builtin_then", r["builtin_s"]), ("ops", ops), ("ops_then", r["op_tables_s"]))}
        for key, value in error.items():
            errors[key].append(abs(value))
        lines.append(f"{r['model']:18s} {_size(*sizes):>14s} {measured * 1e3:8.1f}ms {builtin * 1e3:8.1f}ms "
                     f"{error['builtin'] * 100:+7.1f}% {error['builtin_then'] * 100:+7.1f}% {ops * 1e3:8.1f}ms "
                     f"{error['ops'] * 100:+7.1f}% {error['ops_then'] * 100:+7.1f}%")
    lines.append("median |error|: " + ", ".join(f"{key} {statistics.median(values) * 100:.1f}%" for key, values in errors.items()))
    return lines


# ---------------------------------------------------------------- VAE decodes

# (model id, diffusers class, constructor keywords, height, width, frames): the decoders whose
# published configs are the class defaults (SD-family AutoencoderKL as PixArt ships it; HunyuanVideo's
# causal 3-D VAE, decoded with its tiling on, as its pipelines do at 720p).
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "layers_per_block": 2,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
VAE_CASES = (("pixart-alpha", "AutoencoderKL", SD_VAE, 1024, 1024, 1),
             ("pixart-alpha", "AutoencoderKL", SD_VAE, 2048, 2048, 1),
             ("hunyuan-video", "AutoencoderKLHunyuanVideo", {}, 720, 1280, 129))
SMOKE_VAE_SIZES = {1: (128, 128, 1), 129: (64, 64, 9)}


def vae_lines(device: str, dtype, cluster_id: str, emit) -> list[dict]:
    """Time one VAE decode of each VAE_CASES entry beside the cost model's one-GPU decode."""
    import statistics
    import time

    import diffusers
    import torch

    from costmodel import ParallelConfig
    from costmodel.config import Placement
    from costmodel.pipeline_stages import price_stages

    emit(f"{'VAE decode':18s} {'size':>14s} {'measured':>10s} {'built-in':>10s} {'error':>8s}")
    records = []
    for model_id, class_name, config, height, width, frames in VAE_CASES:
        if device == "cpu":
            height, width, frames = SMOKE_VAE_SIZES[frames]
        spec = load_model(model_id)
        size = _size(height, width, frames)
        rows, cols = height // spec.vae_spatial_factor, width // spec.vae_spatial_factor
        try:
            with torch.device(device):
                vae = getattr(diffusers, class_name)(**config).to(dtype).eval()
            if frames > 1:
                vae.enable_tiling()
                latent = torch.randn(1, spec.vae_latent_channels, spec.latent_frames(frames), rows, cols,
                                     device=device, dtype=dtype)
            else:
                latent = torch.randn(1, spec.vae_latent_channels, rows, cols, device=device, dtype=dtype)

            def decode(latent) -> float:
                start = time.perf_counter()
                vae.decode(latent)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return time.perf_counter() - start

            with torch.no_grad():  # a video warms up on its first two latent frames, then decodes once
                decode(latent[:, :, :2] if frames > 1 else latent)
                measured = statistics.median([decode(latent) for _ in range(1 if frames > 1 else 5)])
        except Exception as error:  # an out-of-memory or a diffusers change must not lose the rest
            emit(f"{model_id:18s} {size:>14s}  failed: {type(error).__name__}: {str(error)[:160]}")
            continue
        finally:
            vae = latent = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        cluster = load_cluster(cluster_id, gpus=1)
        predicted = price_stages(spec, cluster, ParallelConfig(), Placement(ParallelConfig()), height, width, frames).vae_compute_s
        records.append({"vae": model_id, "height": height, "width": width, "frames": frames,
                        "measured_s": measured, "builtin_s": predicted})
        emit(f"{model_id:18s} {size:>14s} {measured * 1e3:8.1f}ms {predicted * 1e3:8.1f}ms {(predicted / measured - 1) * 100:+7.1f}%")
    return records


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
    parser.add_argument("--models", type=lambda text: [m for m in text.split(",") if m], default=None,
                        help="comma-separated catalogue ids of the whole transformers to time (default: every real one; '' for none)")
    parser.add_argument("--size", type=int, choices=(1, 2), default=1,
                        help="which of each model's two sizes (benchmarks/published_transformers.py) to time")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="after timing each transformer, list the N kernels that took the most time in one step")
    parser.add_argument("--op-tables", type=Path, metavar="PATH",
                        help="the measured-operator cluster file of an earlier run on this GPU, instead of measuring again")
    parser.add_argument("--vae", action="store_true",
                        help="also time whole VAE decodes (SD-family at 1024 and 2048 px, HunyuanVideo 720p x 129 frames)")
    parser.add_argument("--reprice", type=Path, metavar="REPORT",
                        help="measure nothing: predict an earlier report's transformer steps again with today's profiles")
    parser.add_argument("--ranks-only", action="store_true", help="run only the 2-rank check (NCCL on 2 GPUs; gloo with --smoke)")
    args = parser.parse_args(argv)
    if args.reprice:
        cluster_id = cluster_for_device(args.reprice.read_text().split(" on ", 1)[1].split(";")[0])
        print(f"{args.reprice.name}: its measured steps against today's {cluster_id} profile "
              f"('then': the prediction the report recorded)")
        print("\n".join(reprice(args.reprice, cluster_id, args.op_tables)))
        return 0

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
    report = None
    if not args.smoke:  # written line by line: a run cut short keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        report = out.open("w")

    def emit(line: str = "") -> None:
        print(line, flush=True)
        if report:
            report.write(line + "\n")
            report.flush()

    emit(f"gpu_check {today:%Y-%m-%d %H:%M} UTC on {device_name}; torch {torch.__version__}; built-in profile {cluster_id}")
    if args.smoke:
        measured_ops = None
    elif args.op_tables:
        measured_ops = args.op_tables
        emit(f"operator tables from {args.op_tables.name} (an earlier run), not measured again")
    else:
        measured_ops = write_operation_profile(out.with_suffix(".profile.yaml"), cluster_id)
    emit()
    header = f"{'block':32s} {'tokens':>12s} {'measured':>10s} {'built-in':>10s} {'error':>8s} {'op tables':>10s} {'error':>8s}"
    emit(header)
    emit("-" * len(header))
    records = []
    for case in CASES:
        image, text = case.tokens()
        measured = time_block(case, device, dtype, scale)
        builtin = predicted_seconds(case, cluster_id)
        from_ops = predicted_seconds(case, str(measured_ops)) if measured_ops else float("nan")
        records.append({"block": case.name, "image_tokens": image, "text_tokens": text, "batch": case.batch,
                        "measured_s": measured, "builtin_s": builtin, "op_tables_s": from_ops})
        emit(f"{case.name:32s} {f'{case.batch}x{image}+{text}':>12s} {measured * 1e3:8.2f}ms {builtin * 1e3:8.2f}ms "
             f"{(builtin / measured - 1) * 100:+7.1f}% {from_ops * 1e3:8.2f}ms {(from_ops / measured - 1) * 100:+7.1f}%")
    if args.smoke:
        emit("(smoke run: toy-size blocks on the CPU; the predictions are for the real sizes on an H100)")
    emit()
    if args.vae:
        records += vae_lines(device, dtype, cluster_id, emit)
        emit()
    by_size = sorted(published_models(), key=lambda m: load_model(m).params)
    models = [SMOKE_TRANSFORMER[0]] if args.smoke else (by_size if args.models is None else args.models)
    records += transformer_lines(models, device, dtype, cluster_id, measured_ops, emit,
                                 args.size - 1, args.kernels)
    if args.smoke:
        emit(f"(smoke run: {SMOKE_TRANSFORMER[0]} at 256x256 in fp32 on the CPU against the H100's prediction)")
    emit()
    for line in rank_lines:
        emit(line)
    if report:
        report.write("\n" + json.dumps(records, indent=2) + "\n")
        report.close()
        print(f"\nreport written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
