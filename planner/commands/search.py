"""`ditplan search` (also `plan-search`): rank every valid configuration, explain the winner, write it as a plan."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from costmodel.config import DEFAULT_PLACEMENT
from planner.commands.common import add_format_argument, add_model_arguments, check_sizes, format_table, print_json
from planner.space import DEFAULT_MIN_WARMUP, nontrivial_axes, short_config

DEFAULT_TOP = 10
PLOT_FORMATS = (".png", ".pdf", ".svg")
FOOTNOTE = ("speedup: one GPU's latency for an image / this plan's.  eff.: one GPU's GPU-seconds per image / this plan's\n"
            "(= speedup / GPUs, times the images a data-parallel plan makes at once; above 100% where each GPU's\n"
            "share runs faster than its fraction of the one-GPU run)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    # --gpus takes a range here, so the shared add_cluster_arguments (an integer --gpus) does not fit.
    parser.add_argument("--cluster", required=True, help="cluster id (see `ditplan clusters`) or path to a cluster YAML")
    parser.add_argument("--gpus", required=True,
                        help="GPU count (8), range (1-16) or list (1,2,4,8); a range reports the best per count")
    parser.add_argument("--nodes", type=int, help="replicate a node-shaped cluster over this many nodes (default: the file's)")
    parser.add_argument("--top", type=int, default=None,
                        help=f"show the first K plans (table default {DEFAULT_TOP}; JSON default: all)")
    parser.add_argument("--out", metavar="PLAN.json", help="write the winner as a plan file for `ditplan run`")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot the Pareto fronts across GPU counts (matplotlib; .png, .pdf or .svg)")
    add_format_argument(parser)
    parser.add_argument("--show-pruned", action="store_true", help="table: list every pruned configuration")
    parser.add_argument("--rescore", type=int, default=None,
                        help="large spaces: how many of the closed-form estimate's best the simulator re-scores")
    parser.add_argument("--exhaustive", action="store_true", help="simulate every candidate however large the space")
    parser.add_argument("--min-warmup", type=int, default=DEFAULT_MIN_WARMUP, metavar="N",
                        help="fidelity floor: PipeFusion plans keep at least N synchronous warmup steps (default "
                             f"{DEFAULT_MIN_WARMUP}: stale K/V from step one costs quality; 0 ranks on latency alone)")
    parser.add_argument("--emit", choices=("xdit", "diffusers"),
                        help="also print the best plan as xDiT's launch flags or diffusers' parallel configuration")


def _placement_text(plan) -> str:
    if plan.placement.order == DEFAULT_PLACEMENT:
        return "default"
    return ">".join(axis for axis in plan.placement.order if axis in nontrivial_axes(plan.config))


def _plan_rows(result, plans, start: int = 1) -> list[list[str]]:
    rows = []
    for index, plan in enumerate(plans, start=start):
        rows.append([
            str(index), str(plan.gpus), f"{plan.ranked_s:.3f}", f"{plan.latency_s:.3f}", f"{result.speedup(plan):.2f}x",
            f"{100 * result.efficiency(plan):.0f}%", f"{plan.memory_gib:.1f}", short_config(plan.config),
            _placement_text(plan), plan.scored_by,
        ])
    return rows


def _plan_table(result, plans) -> str:
    """The plans as columns; the `scored` column only where some figure is the closed-form estimate's."""
    rows = _plan_rows(result, plans)
    if all(plan.scored_by == "simulator" for plan in plans):
        return format_table([row[:-1] for row in rows], HEADER[:-1], ALIGN[:-1])
    return format_table(rows, HEADER, ALIGN)


# Ranked by the end-to-end latency; "latency s" is the denoising loop (speedup and efficiency are the loop's).
HEADER = ["#", "GPUs", "end-to-end s", "latency s", "speedup", "eff.", "mem GiB/GPU", "config", "placement (inner>outer)",
          "scored"]
ALIGN = "rrrrrrrlll"


def render_table(result, top: int, show_pruned: bool) -> str:
    counts = ",".join(str(n) for n in result.gpu_counts)
    lines = [
        f"{result.model} {result.width}x{result.height}"
        + (f"x{result.frames} frames" if result.frames > 1 else "")
        + f", {result.steps} steps on {result.cluster}, GPUs {counts}",
        f"one GPU: {result.baseline_latency_s:.3f} s predicted"
        + ("" if result.baseline_feasible else " (would not fit in one GPU's memory; speedups are against this figure)"),
        "",
    ]
    shown = result.plans[:top]
    lines.append(_plan_table(result, shown))
    hidden = len(result.plans) - len(shown)
    if hidden > 0:
        lines.append(f"... {hidden} more feasible plan(s) (--top N or --format json shows them)")
    lines.append(FOOTNOTE)
    if len(result.gpu_counts) > 1:
        lines += ["", "best per GPU count:"]
        per_count = list(result.best_per_count.values())
        lines.append(_plan_table(result, per_count))
        missing = [n for n in result.gpu_counts if n not in result.best_per_count]
        if missing:
            lines.append(f"no configuration fits {', '.join(map(str, missing))} GPU(s)")
    lines += ["", "why the winner:"]
    lines.extend(f"  {line}" for line in result.explanation())
    lines.append("")
    lines.append(f"pruned: {len(result.pruned)} configuration(s)")
    if show_pruned:
        lines.extend(f"  {entry.gpus} GPU(s) {entry.config}: {entry.reason}" for entry in result.pruned)
    else:
        reasons = Counter(reason for entry in result.pruned for reason in entry.reasons)
        lines.extend(f"  {count} x {reason}" for reason, count in reasons.most_common(6))
        if len(reasons) > 6:
            lines.append(f"  ... {len(reasons) - 6} other reason(s) (--show-pruned lists every one)")
    return "\n".join(lines)


def _check_destinations(args: argparse.Namespace) -> None:
    """--out and --plot are checked before the search, so a bad path costs nothing."""
    from costmodel.errors import DitplanError
    from costmodel.files import check_output

    if args.out:
        check_output(args.out, "--out")
    if args.plot:
        check_output(args.plot, "--plot")
        if Path(args.plot).suffix.lower() not in PLOT_FORMATS:
            raise DitplanError(f"--plot {args.plot}: the file name must end in {', '.join(PLOT_FORMATS)}.")


def _check_gpu_counts(args: argparse.Namespace) -> None:
    """Every count of --gpus fits the cluster, named as given (not as the first count that does not fit)."""
    from costmodel.errors import DitplanError
    from costmodel.topology import load_cluster
    from planner.space import parse_gpu_counts

    counts = parse_gpu_counts(args.gpus)
    total = load_cluster(args.cluster, nodes=args.nodes).gpus
    if counts[-1] > total:
        fitting = [n for n in counts if n <= total]
        hint = f"--gpus {fitting[0]}-{total}" if len(fitting) > 1 and fitting == list(range(fitting[0], total + 1)) \
            else f"counts up to {total}"
        raise DitplanError(f"--gpus {args.gpus}: cluster {args.cluster} has {total} GPUs, so {counts[-1]} do not fit; "
                           f"use {hint}, or more --nodes where the cluster has a network.")


def run(args: argparse.Namespace) -> int:
    from costmodel.errors import DitplanError
    from costmodel.strict import require_finite
    from planner.ranking import DEFAULT_RESCORE, search

    if args.top is not None and args.top < 1:
        raise DitplanError(f"--top {args.top}: show at least one plan (K >= 1).")
    check_sizes(height=args.height, width=args.width, frames=args.frames, steps=args.steps)
    _check_destinations(args)
    _check_gpu_counts(args)
    result = search(
        args.model, args.cluster, args.gpus, height=args.height, width=args.width, frames=args.frames,
        steps=args.steps, nodes=args.nodes, rescore=DEFAULT_RESCORE if args.rescore is None else args.rescore, exhaustive=args.exhaustive,
        min_warmup=args.min_warmup,
    )
    best = result.best  # raises the no-plan explanation as a DitplanError
    summary = result.to_dict(top=args.top)
    require_finite(summary, "ditplan search")
    if args.out:
        result.to_plan(best).save(args.out, "--out")
    if args.plot:
        from planner.pareto import plot_pareto

        plot_pareto(result, args.plot)
    emitted = None
    if args.emit:
        from planner.emit import emit

        emitted = emit(result.to_plan(best), args.emit)
    if args.format == "json":
        print_json({**summary, **({"emit": emitted.to_dict()} if emitted else {})})
    else:
        print(render_table(result, args.top or DEFAULT_TOP, args.show_pruned))
        if emitted:
            print("\n" + emitted.render())
        if args.out:
            print(f"\nplan written to {args.out}")
        if args.plot:
            print(f"Pareto plot written to {args.plot}")
            if len(result.gpu_counts) == 1:
                print(f"note: one GPU count ({result.gpu_counts[0]}), so the plot shows one point per panel; "
                      "give a range such as --gpus 1-8 to compare counts")
    return 0
