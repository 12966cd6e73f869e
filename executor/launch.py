"""`python -m executor` / `ditplan run`: check the plan, then run the workers under torchrun.

Everything that can be refused is refused here, once, before any process starts (bad flags, a plan
whose GPU count is not --nproc, a plan the model's profile rules out, an output folder that holds
something else). The workers (executor.worker) check again against the loaded transformer, on
every rank, before any collective. One process runs in this process; more run under
torch.distributed.run (--standalone on one node; with --nnodes, torchrun's static rendezvous at
--rdzv-endpoint, so --node-rank fixes which global ranks live on which node), which stops every
rank as soon as one fails.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError

PROG = "ditplan run"
STANDALONE = ["--standalone", "--nnodes", "1"]  # torchrun's rendezvous for one node


def build_parser() -> argparse.ArgumentParser:
    from planner.commands.run import add_arguments

    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a plan for real: torchrun workers, PNG images and run.json in --out.")
    add_arguments(parser)
    return parser


def _model_spec(model: str):
    """The cost-model profile of `model` when it has one (ids and YAML paths), else None."""
    try:
        from costmodel.specs import load_model
    except ImportError:
        return None
    if Path(model).is_dir():
        return None
    try:
        return load_model(model)
    except DitplanError:
        return None


def resolve_plan(args: argparse.Namespace) -> tuple[ParallelConfig, Placement, str | None]:
    """The configuration and placement to run; for 'auto', the planner's best plan saved to a temp file."""
    from planner.plan import Plan

    if args.plan == "auto":
        try:
            import planner

            search = planner.search
        except (ImportError, AttributeError) as error:
            raise DitplanError(f"--plan auto needs the planner's search, which is not available ({error}).") from None
        if not args.cluster:
            raise DitplanError("--plan auto needs --cluster (an id from `ditplan clusters` or a YAML path) to plan for.")
        spec = _model_spec(args.model)
        if spec is None:
            raise DitplanError(f"--plan auto: {args.model!r} has no model profile to plan with; give a configuration instead.")
        sizes = {k: v for k, v in (("height", args.height), ("width", args.width), ("steps", args.steps)) if v}
        if args.frames:
            sizes["frames"] = args.frames
        # One replica per prompt at most: with fewer prompts than replicas some would idle, which the
        # planner's per-image latency would not see.
        prompts = len(args.prompt) if args.prompt else 1
        plan = search(spec.id if hasattr(spec, "id") else args.model, args.cluster, args.nproc, max_dp=prompts, **sizes).to_plan()
        handle, path = tempfile.mkstemp(prefix="ditplan-auto-", suffix=".json")
        os.close(handle)
        plan.save(path)
        return plan.config, plan.placement, path
    if args.plan.endswith(".json") or Path(args.plan).is_file():
        plan = Plan.load(args.plan)
        return plan.config, plan.placement, args.plan
    config = ParallelConfig.parse(args.plan)
    return config, Placement(config), None


def preflight(args: argparse.Namespace) -> tuple[ParallelConfig, Placement, str]:
    """Refuse what cannot run, before starting anything; returns what the workers get as --plan."""
    if args.nproc < 1:
        raise DitplanError(f"--nproc {args.nproc}: at least one process is needed.")
    check_nodes(args)
    for flag in ("height", "width", "frames", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DitplanError(f"--{flag} {value}: must be a positive integer.")
    config, placement, plan_path = resolve_plan(args)
    if config.world_size != args.nproc:
        raise DitplanError(
            f"plan {config} uses {config.world_size} GPUs but --nproc is {args.nproc}; "
            f"the product dp x cfg x ulysses x ring x pipefusion must equal the process count."
        )
    spec = _model_spec(args.model)
    if spec is not None:
        from costmodel.rules import check_config

        height = args.height or spec.default_height
        width = args.width or spec.default_width
        frames = args.frames or spec.default_frames
        steps = args.steps or spec.default_steps
        problems = check_config(config, spec, height, width, frames, steps, args.nproc)
        if problems:
            raise DitplanError(f"plan {config} cannot run {args.model} at {height}x{width}: " + "; ".join(problems) + ".")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "run.json").is_file())):
        raise DitplanError(f"--out {out}: it exists and is not an earlier run's folder (no run.json); choose an empty or new folder.")
    if plan_path is None:
        return config, placement, str(config)
    return config, placement, plan_path


def worker_argv(args: argparse.Namespace, plan: str) -> list[str]:
    """The workers' command line: the user's flags with --plan resolved.

    No --nproc: torchrun's parser would take it for an abbreviation of its own --nproc-per-node;
    the workers read the world size from torchrun's environment.
    """
    argv = ["--model", args.model, "--plan", plan, "--out", args.out, "--seed", str(args.seed)]
    if args.prompt:
        argv += ["--prompt", *args.prompt]
    for flag in ("negative_prompt", "height", "width", "frames", "steps", "guidance_scale", "cluster", "backend"):
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


def rendezvous_args(args: argparse.Namespace) -> list[str]:
    """torchrun's rendezvous flags: one node standalone; several by static rendezvous, where the node
    ranks order the global ranks (node I holds ranks I x nproc/nnodes onwards), as the plan's
    placement assumes."""
    if args.nnodes == 1:
        return list(STANDALONE)
    return ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank), "--rdzv-backend", "static",
            "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]


def launch(argv: list[str], nproc: int, rendezvous: list[str] | None = None) -> int:
    """Run `python -m executor.worker ARGV` on `nproc` local ranks under torch.distributed.run
    (`rendezvous`: torchrun's node flags, default one standalone node)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # The elastic agent's own reports (closing signals, "failed (exitcode ...)") repeat what the
    # failing rank already printed.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    torchrun_args = get_args_parser().parse_args(
        [*(rendezvous or STANDALONE), "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "--monitor-interval", "0.2", "-m", "executor.worker", *argv]
    )
    try:
        run(torchrun_args)
    except ChildFailedError as error:
        # The first rank to end decides: 2 is a refusal (printed by rank 0), anything else a failure
        # (printed by the failing rank); the others were stopped by the agent.
        _, first = error.get_first_failure()
        return 2 if first.exitcode == 2 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, _, plan = preflight(args)
    except DitplanError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.nproc == 1:
            from executor.worker import main as worker_main

            return worker_main(worker_argv(args, plan))
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return launch(worker_argv(args, plan), args.nproc // args.nnodes, rendezvous_args(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.plan == "auto":
            Path(plan).unlink(missing_ok=True)  # the searched plan's temporary file; run.json records the config
