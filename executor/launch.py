"""`python -m executor` / `ditplan run`: check the plan, then run the workers under torchrun.

Everything that can be refused is refused here, once, before any process starts: bad flags, a
model id that names no pipeline, a model of a family the executor does not run, a plan whose GPU
count is not --nproc, a plan for another model, a flag that contradicts the plan file, a plan the
model's profile rules out, an output folder that holds something else or cannot be written. The
plan file is the contract: its model, sizes and steps are what runs. The workers (executor.worker)
check again against the loaded transformer, on every rank, before any collective. One process runs in this process; more run under
torch.distributed.run (--standalone on one node; with --nnodes, torchrun's static rendezvous at
--rdzv-endpoint, so --node-rank fixes which global ranks live on which node), which stops every
rank as soon as one fails.

SIGINT or SIGTERM to this process (or Ctrl-C to its process group) ends every worker: torchrun's
agent passes the signal on and kills a worker still alive after SHUTDOWN_TIMEOUT_S. The launcher
then prints one line and exits 128 + the signal number; --out is left as it was.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.files import check_output, check_output_folder
from costmodel.interrupts import STOP_SIGNALS, Stopped, stop_on_signals

PROG = "ditplan run"
SHUTDOWN_TIMEOUT_S = 3  # a worker that ignores the stop signal this long is killed


def build_parser() -> argparse.ArgumentParser:
    from planner.commands.run import add_arguments

    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a plan for real: torchrun workers, PNG images and run.json in --out.")
    add_arguments(parser)
    return parser


def model_profile(model: str) -> Any:
    """The cost-model profile of the pipeline `--model` names (tiny ids and YAML recipes), None for a
    pipeline folder or a Hugging Face id; refuses an id that names no pipeline, listing the tiny ones,
    and a model of a family the executor does not run."""
    from costmodel.specs import list_models, load_model

    if Path(model).is_dir():
        check_family(model, None)
        return None
    if model.endswith((".yaml", ".yml")):
        spec = load_model(model)
        check_family(model, spec)
        if "build" not in (yaml.safe_load(Path(model).read_text()) or {}):
            raise DitplanError(f"--model {model}: this YAML is a cost-model profile without a build: recipe, not a "
                               "pipeline to load; give the model's pipeline folder or Hugging Face id (owner/name), or "
                               "a tiny model's YAML.")
        return spec
    known = list_models()
    tiny = ", ".join(name for name in known if name.startswith("tiny-"))
    if model in known:
        spec = load_model(model)
        check_family(model, spec)  # no pipeline of it would run either
        if model.startswith("tiny-"):
            return spec
        raise DitplanError(f"--model {model}: this is a cost-model profile, not a pipeline to load; give its "
                           f"pipeline folder or Hugging Face id (owner/name), or a tiny model ({tiny}).")
    if model.startswith(("tiny-", "/", ".", "~")) or model.count("/") != 1:
        raise DitplanError(f"--model {model!r}: not a pipeline folder, a tiny model ({tiny}) or a Hugging Face "
                           "id (owner/name).")
    return None


def check_family(model: str, spec: Any) -> None:
    """Refuse a model of a family the executor does not run (its profile's family, or a pipeline
    folder's pipeline class), naming the family and the families it runs."""
    from executor.families import declaration, pipeline_declaration

    if spec is not None:
        declaration(spec.family, subject=f"--model {model}")
        return
    index = Path(model) / "model_index.json"
    if index.is_file():
        try:
            pipeline_class = json.loads(index.read_text()).get("_class_name", "")
        except (json.JSONDecodeError, AttributeError):
            raise DitplanError(f"--model {model}: {index} is not a diffusers pipeline index (JSON with _class_name).") from None
        pipeline_declaration(pipeline_class, subject=f"--model {model}")


def _follow_plan_file(args: argparse.Namespace, plan: Any) -> None:
    """The plan is the contract: its sizes and steps run. A flag may repeat them, never change them."""
    for key in ("height", "width", "frames", "steps"):
        given, planned = getattr(args, key), getattr(plan, key)
        if given is not None and given != planned:
            raise DitplanError(f"--{key} {given} contradicts the plan's {key} {planned}; drop the flag to run "
                               "the plan as made, or search a plan for the new size.")
        setattr(args, key, planned)


def _fill_model_defaults(args: argparse.Namespace, spec: Any) -> None:
    """Sizes not given are the model profile's defaults (so the workers and run.json agree with it)."""
    for key in ("height", "width", "frames", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(spec, f"default_{key}"))


def resolve_run_plan(args: argparse.Namespace) -> tuple[ParallelConfig, Placement, str | None]:
    """The configuration and placement to run, and the plan file the workers read (None: the
    configuration text is passed on); for 'auto', the searched plan saved to a temporary file."""
    from planner.plan import Plan, is_plan_file, resolve_plan

    plan_file = args.plan != "auto" and is_plan_file(args.plan)
    plan = Plan.load(args.plan) if plan_file else args.plan
    if plan_file and args.model is None:
        args.model = plan.model
    if args.model is None:
        raise DitplanError("--model is required unless --plan is a plan file (which names its model).")
    spec = model_profile(args.model)
    prompts = len(args.prompt) if args.prompt else 1
    if args.plan == "auto" and spec is None:
        raise DitplanError(f"--plan auto: {args.model!r} has no model profile to plan with; give a configuration instead.")
    resolved = resolve_plan(
        plan, model=None if spec is None else spec.id, cluster=args.cluster, gpus=args.nproc or 1,
        height=args.height, width=args.width, frames=args.frames, steps=args.steps,
        # One replica per prompt at most: with fewer prompts than replicas some would idle, which the
        # planner's per-image latency would not see.
        max_dp=prompts)
    if resolved.plan is not None:
        _follow_plan_file(args, resolved.plan)
    elif spec is not None:
        _fill_model_defaults(args, spec)
    if args.plan != "auto":
        return resolved.config, resolved.placement, args.plan if plan_file else None
    handle, path = tempfile.mkstemp(prefix="ditplan-auto-", suffix=".json")
    os.close(handle)
    resolved.plan.save(path)
    return resolved.config, resolved.placement, path


def preflight(args: argparse.Namespace) -> tuple[ParallelConfig, Placement, str]:
    """Refuse what cannot run, before starting anything; returns what the workers get as --plan."""
    from planner.commands.common import check_sizes

    if args.nproc is not None and args.nproc < 1:
        raise DitplanError(f"--nproc {args.nproc}: at least one process is needed.")
    check_sizes(height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "run.json").is_file())):
        raise DitplanError(f"--out {out}: it exists and is not an earlier run's folder (no run.json); choose an empty or new folder.")
    check_output_folder(out, "--out")
    config, placement, plan_path = resolve_run_plan(args)
    if args.nproc is None:
        args.nproc = config.world_size
    check_nodes(args)
    if config.world_size != args.nproc:
        raise DitplanError(
            f"plan {config} uses {config.world_size} GPUs but --nproc is {args.nproc}; "
            f"the product dp x cfg x ulysses x ring x pipefusion must equal the process count."
        )
    spec = model_profile(args.model)
    if spec is not None:
        from costmodel.rules import check_config

        problems = check_config(config, spec, args.height, args.width, args.frames, args.steps, args.nproc)
        if problems:
            raise DitplanError(f"plan {config} cannot run {args.model} at {args.width}x{args.height}: "
                               + "; ".join(problems) + ".")
    if args.trace:
        # The workers write it at the end; an unwritable path is refused now, not after the run.
        args.trace = str(check_output(args.trace, "--trace").resolve())
    from executor.device import check_visible_gpus

    check_visible_gpus(args.nproc // args.nnodes)
    return config, placement, plan_path or str(config)


def worker_argv(args: argparse.Namespace, plan: str) -> list[str]:
    """The workers' command line: the user's flags with --plan and the sizes resolved.

    No --nproc: torchrun's parser would take it for an abbreviation of its own --nproc-per-node;
    the workers read the world size from torchrun's environment.
    """
    argv = ["--model", args.model, "--plan", plan, "--out", args.out, "--seed", str(args.seed)]
    if args.prompt:
        argv += ["--prompt", *args.prompt]
    for flag in ("negative_prompt", "height", "width", "frames", "steps", "guidance_scale", "guidance_scale_2", "cluster", "backend"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if args.print_layout:
        argv.append("--print-layout")
    return argv


def check_nodes(args: argparse.Namespace) -> None:
    """Refuse multi-node settings that torchrun would reject late or that would mis-place ranks."""
    from planner.commands.run import check_nodes as check_node_flags

    check_node_flags(args.nnodes, args.node_rank, args.rdzv_endpoint)
    if args.nproc % args.nnodes:
        raise DitplanError(f"--nproc {args.nproc} over --nnodes {args.nnodes}: every node runs the same number of "
                           "processes, so --nproc must be a multiple of --nnodes.")


def torchrun_arguments(args: argparse.Namespace) -> list[str]:
    """torchrun's own flags (before `-m executor.worker`): --nproc / --nnodes local ranks per node; one
    node standalone, several by static rendezvous, where the node ranks order the global ranks (node I
    holds ranks I x nproc/nnodes onwards), as the plan's placement assumes."""
    if args.nnodes == 1:
        rendezvous = ["--standalone", "--nnodes", "1"]
    else:
        rendezvous = ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank), "--rdzv-backend", "static",
                      "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    return [*rendezvous, "--nproc-per-node", str(args.nproc // args.nnodes), "--max-restarts", "0",
            "--monitor-interval", "0.2", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]


def _failure_line(failures: dict[int, Any]) -> tuple[str | None, int]:
    """The launcher's line for a failed job (None where the failing rank printed its own), and the
    exit status. When one rank ends, the agent stops the others with SIGTERM, so their failures are
    collateral; a rank ended by another signal (the out-of-memory killer's SIGKILL) could not say
    so itself and is named here."""
    codes = {rank: failure.exitcode for rank, failure in sorted(failures.items())}
    if 2 in codes.values():
        return None, 2  # a refusal, printed by rank 0
    collateral = {-int(signum) for signum in STOP_SIGNALS} | {128 + int(signum) for signum in STOP_SIGNALS}
    for rank, code in codes.items():
        if code < 0 and code not in collateral:
            return f"{PROG}: rank {rank} was killed by {signal.Signals(-code).name}; the other ranks were stopped", 1
    if any(code not in collateral for code in codes.values()):
        return None, 1  # the failing rank printed its error
    rank, code = next(iter(codes.items()))
    name = signal.Signals(-code if code < 0 else code - 128).name
    return f"{PROG}: rank {rank} was stopped by {name}; the other ranks were stopped", 1


def launch(argv: list[str], torchrun_argv: list[str]) -> int:
    """Run `python -m executor.worker ARGV` under torch.distributed.run with TORCHRUN_ARGV."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # The elastic agent's own reports (closing signals, "failed (exitcode ...)") repeat what the
    # failing rank already printed, or what this launcher prints. Each module's logger has its own
    # level, so the parent's would not do.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    torchrun_args = get_args_parser().parse_args([*torchrun_argv, "-m", "executor.worker", *argv])
    try:
        run(torchrun_args)
    except SignalException as stop:
        raise Stopped(int(stop.sigval)) from None  # the agent has ended every worker
    except ChildFailedError as error:
        line, status = _failure_line(error.failures)
        if line:
            print(line, file=sys.stderr, flush=True)
        return status
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    plan = None
    try:
        with stop_on_signals():
            try:
                _, _, plan = preflight(args)
                if args.trace:
                    from executor.timeline import RUN_TRACE_ENV

                    os.environ[RUN_TRACE_ENV] = args.trace
                if args.nproc == 1 and args.nnodes == 1:
                    from executor.worker import main as worker_main

                    return worker_main(worker_argv(args, plan))
                os.environ.setdefault("OMP_NUM_THREADS", "1")
                return launch(worker_argv(args, plan), torchrun_arguments(args))
            finally:
                if args.plan == "auto" and plan is not None:
                    Path(plan).unlink(missing_ok=True)  # the searched plan's temporary file; run.json records it
    except DitplanError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"{PROG}: stopped by {stop.name}; every worker has ended and {args.out} was not written", file=sys.stderr)
        return 128 + stop.signum
