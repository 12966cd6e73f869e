"""One rank of `ditplan run` (started by executor.launch, under torchrun when there are several).

Loads the model (from a pipeline folder under PipeFusion: only this rank's stage of the
transformer), binds it to the plan, generates, and on rank 0 writes the PNGs and run.json into a
temporary folder that replaces --out only once everything is written. A user mistake (DitplanError)
is printed by rank 0 only, which exits 2: every rank refuses alike, and the others leave quietly with
0, so torchrun waits for rank 0's report and the job ends with its status. Any other error is
printed by the rank that raised it, which exits 1, and torchrun then stops the other ranks. A rank that only lost its
peers says so in one line instead of repeating an error that is not its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from costmodel.errors import DitplanError

PROG = "ditplan run"


def _is_peer_loss(error: BaseException) -> bool:
    """True for errors raised here only because another rank died: its connections closed under a
    gloo collective. An NCCL error or a collective timeout is this rank's own news and is reported
    as it is (a timeout names the collective that hung)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistNetworkError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and "nccl" not in text and any(
        marker in text for marker in ("connection closed", "connection reset", "broken pipe"))


def _model_index(folder: Path) -> dict[str, Any]:
    """A pipeline folder's model_index.json (empty where there is none)."""
    path = folder / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _stage_transformer(folder: Path, plan: str, dtype: Any) -> dict[str, Any]:
    """from_pretrained overrides for a pipeline folder under PipeFusion: this rank's stage of the
    transformer (of each expert), read alone from the checkpoint, so other stages' blocks never exist here."""
    if plan == "auto":
        return {}
    from planner.plan import resolve_plan

    resolved = resolve_plan(plan)
    config, placement = resolved.config, resolved.placement
    if config.pipefusion == 1:
        return {}
    from executor.families import family_of_pipeline_class
    from executor.pipefusion import load_stage_experts

    family = family_of_pipeline_class(_model_index(folder).get("_class_name", ""))
    if family is None:
        return {}  # not a family the executor runs: parallelize refuses it by name after loading
    rank = int(os.environ.get("RANK", "0"))
    if rank >= config.world_size:
        return {}  # parallelize refuses the GPU-count mismatch, on every rank alike
    stage = placement.coordinates(rank)["pipefusion"]
    experts = load_stage_experts(folder, family, stage, config.pipefusion)
    return {name: transformer.to(dtype) for name, transformer in experts.items()}


def load_pipeline(model: str, plan: str = "cfg=1") -> Any:
    from executor.tiny import build_tiny_pipeline, is_tiny_model, quiet_libraries

    if is_tiny_model(model):
        return build_tiny_pipeline(model, seed=0)
    import diffusers

    from executor.device import compute_dtype, local_device

    quiet_libraries()
    dtype = compute_dtype(local_device())
    overrides = _stage_transformer(Path(model), plan, dtype) if Path(model).is_dir() else {}
    # The folder's own pipeline class: DiffusionPipeline's from_pretrained would load an optional
    # component from the folder in place of the stage passed for it (WanPipeline's transformers).
    index = _model_index(Path(model))
    loader = getattr(diffusers, str(index.get("_class_name")), None) if overrides else None
    pipe = (loader or diffusers.DiffusionPipeline).from_pretrained(model, dtype=dtype, **overrides)
    _ensure_dtype(pipe, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ensure_dtype(pipe: Any, dtype: Any) -> None:
    """Every module of `pipe` in `dtype`: diffusers releases the project allows (before 0.36) ignore
    from_pretrained's `dtype` and load fp32, which would mix with a stage loaded in `dtype`."""
    import torch

    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module) and any(p.is_floating_point() and p.dtype != dtype for p in part.parameters()):
            part.to(dtype=dtype)


def _save_outputs(output: Any, is_video: bool, folder: Path) -> list[str]:
    names: list[str] = []
    if is_video:
        for index, frames in enumerate(output.frames):
            for frame_index, frame in enumerate(frames):
                name = f"video-{index:03d}-frame-{frame_index:03d}.png"
                frame.save(folder / name)
                names.append(name)
    else:
        for index, image in enumerate(output.images):
            name = f"image-{index:03d}.png"
            image.save(folder / name)
            names.append(name)
    return names


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder into place (replacing an earlier run's folder)."""
    if out.exists():
        retired = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def _write_trace(path: Path, timeline: Any, rank: int, world_size: int) -> None:
    """Every rank's measured events, gathered on rank 0 and written there as one Chrome trace."""
    import torch.distributed as dist

    from executor.timeline import RankTimeline, track_names

    every_rank = [timeline]
    if world_size > 1:
        every_rank = [None] * world_size if rank == 0 else None
        dist.gather_object(timeline.events, every_rank, dst=0)
        if rank != 0:
            return
        every_rank = [RankTimeline(timeline.device, events) for events in every_rank]
    origin = min((start for t in every_rank for _, _, _, start, _ in t.events), default=0.0)
    events = [event for r, t in enumerate(every_rank) for event in t.chrome_events(r, origin)] + track_names(world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def run_worker(args: Any) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from executor.parallel import parallelize
    from executor.timeline import RUN_TRACE_ENV, recording

    started = time.perf_counter()
    pipe = load_pipeline(args.model, args.plan)
    load_s = time.perf_counter() - started
    prompts = args.prompt or ["a photo of a cat"]
    parallel = parallelize(pipe, plan=args.plan, cluster=args.cluster, backend=args.backend, prompts=len(prompts))
    rank = parallel.rank
    if args.print_layout and rank == 0:
        print(parallel.layout(), flush=True)
    trace_path = os.environ.get(RUN_TRACE_ENV)
    with recording(parallel.device) if trace_path else contextlib.nullcontext() as timeline:
        output = parallel(
            prompt=prompts, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
            num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
            output_type="pil", guidance_scale_2=args.guidance_scale_2,
        )
    timings = parallel.last_timings.to_dict()
    if timeline is not None:
        timings["timeline"] = timeline.totals()
    every_rank = [timings]
    if parallel.groups.world_size > 1:
        every_rank = [None] * parallel.groups.world_size if rank == 0 else None
        dist.gather_object(timings, every_rank, dst=0)
    if timeline is not None:
        _write_trace(Path(trace_path), timeline, rank, parallel.groups.world_size)
    if rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            files = _save_outputs(output, parallel.adapter.is_video, staging)
            loop_s = max(t["loop_s"] for t in every_rank)
            end_to_end_s = max(t["end_to_end_s"] for t in every_rank)
            sizes = parallel.last_sizes
            record = {
                "model": args.model,
                "family": parallel.adapter.family,
                "config": str(parallel.config),
                "placement": list(parallel.placement.order),
                "ranks": parallel.placement.table(),
                # The plan itself (a file's content: `auto` plans live in a temporary file), or the configuration.
                "plan": parallel.plan.to_dict() if parallel.plan is not None else args.plan,
                "world_size": parallel.groups.world_size,
                "backend": dist.get_backend() if dist.is_initialized() else "none",
                "prompts": prompts,
                "negative_prompt": args.negative_prompt,
                "seed": args.seed,
                **sizes,
                "latency": {
                    "loop_s": loop_s, "end_to_end_s": end_to_end_s, "load_s": load_s,
                    "prepare_s": timings["prepare_s"], "decode_s": timings["decode_s"], "gather_s": timings["gather_s"],
                    "step_s": timings["step_s"],
                },
                "per_rank": every_rank,
                "files": files,
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "diffusers": __import__("diffusers").__version__},
            }
            (staging / "run.json").write_text(json.dumps(record, indent=2) + "\n")
            _publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        steps = max(int(parallel.last_sizes["steps"]), 1)
        print(f"{PROG}: {parallel.config} on {parallel.groups.world_size} process(es): denoising loop {loop_s:.3f} s "
              f"({loop_s / steps:.3f} s/step), end to end {end_to_end_s:.3f} s; {len(files)} PNG(s) and run.json in {out}",
              flush=True)
    parallel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from executor.launch import build_parser

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        return run_worker(args)
    except DitplanError as error:
        if rank != 0:
            return 0  # rank 0 refuses alike and reports it; a failing exit here could end the job first
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - the process boundary: report once, exit non-zero
        if _is_peer_loss(error):
            print(f"{PROG}: rank {rank} stopped: another rank failed", file=sys.stderr, flush=True)
        else:
            print(f"{PROG}: rank {rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from costmodel.interrupts import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            code = main()
    except Stopped as stop:
        code = 128 + stop.signum  # the launcher, which sent or also got the signal, reports it
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a process group whose peers died can block in its destructor.
    os._exit(code)
