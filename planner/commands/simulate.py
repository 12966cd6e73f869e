"""`ditplan simulate`: predicted latency, memory and breakdown of one configuration (or of many rows
from a CSV with --batch), optionally with a Chrome-trace timeline of every rank."""
from __future__ import annotations

import argparse
import csv
import json
import sys

from costmodel.errors import DitplanError
from costmodel.files import check_output, read_csv, write_atomically
from costmodel.strict import require_finite
from planner.commands import common

BATCH_COLUMNS = ("model", "height", "width", "frames", "steps", "cluster", "gpus", "config")
BATCH_OUTPUT = ("latency_s", "memory_gib", "feasible", "reason")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser, required=False)
    common.add_cluster_arguments(parser, required=False)
    common.add_config_argument(parser, required=False)
    parser.add_argument("--trace", metavar="OUT.json", help="write a Chrome-trace/Perfetto timeline of every rank")
    parser.add_argument("--batch", metavar="ROWS.csv",
                        help="evaluate every row of a CSV (columns: " + ",".join(BATCH_COLUMNS) + ")")
    common.add_format_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.batch:
        given = [flag for flag in ("model", "height", "width", "frames", "steps", "cluster", "gpus", "nodes", "config",
                                   "placement", "trace") if getattr(args, flag) is not None]
        if given:
            raise DitplanError(f"--batch takes every setting from the CSV's columns; drop "
                               f"{', '.join('--' + flag for flag in given)}.")
        return _run_batch(args)
    missing = [flag for flag, value in (("--model", args.model), ("--cluster", args.cluster), ("--config", args.config))
               if not value]
    if missing:
        raise DitplanError(f"missing {', '.join(missing)}; `ditplan simulate` needs --model, --cluster and --config "
                           "(or --batch ROWS.csv).")
    from costmodel import simulate

    if args.trace:
        check_output(args.trace, "--trace")
    generation = common.generation_from_args(args)
    config = common.parse_config(args.config)
    cluster = common.cluster_for_config(args.cluster, config, args.gpus, args.nodes)
    placement = common.parse_placement(config, args.placement)
    result = simulate(generation.model, cluster, config, placement=placement, trace=bool(args.trace),
                      **generation.as_kwargs())
    figures = result.to_dict()
    require_finite(figures, "ditplan simulate")
    if args.trace:
        write_atomically(args.trace, json.dumps({"traceEvents": result.trace, "displayTimeUnit": "ms"},
                                                allow_nan=False), "--trace")
    if args.format == "json":
        common.print_json(figures)
    else:
        print(_table(result, cluster))
        if args.trace:
            print(f"trace: {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def _table(result, cluster) -> str:
    stages = result.stages
    lines = [
        f"model      {result.model}  {result.width}x{result.height}"
        + (f"x{result.frames} frames" if result.frames > 1 else "") + f", {result.steps} steps",
        f"cluster    {result.cluster}: {result.gpus} x {cluster.hardware.name} on {cluster.nodes} node(s)",
        f"config     {result.config}",
        f"placement  {','.join(result.placement)} (innermost first)",
        "",
        f"end to end {result.end_to_end_s:.3f} s  (text encoding {result.text_encode_s:.3f} s, denoising loop "
        f"{result.latency_s:.3f} s, VAE decode {result.vae_decode_s:.3f} s on {stages['vae']} GPU(s), transfers "
        f"{stages['latent_transfer_s'] + stages['image_gather_s']:.3f} s)",
        f"latency    {result.latency_s:.3f} s  (denoising loop; {result.per_step_s * 1e3:.1f} ms per step"
        + (" after warmup)" if "warmup_s" in result.breakdown else ")"),
        f"memory     {result.memory_gib:.1f} GiB per GPU of {result.memory_capacity_gib:.1f} GiB",
        f"feasible   {'yes' if result.feasible else 'no: ' + result.reason}",
        "",
    ]
    rows = [(key.removesuffix("_s"), value, common.percent(value / result.latency_s if result.latency_s else 0.0))
            for key, value in result.breakdown.items()]
    lines.append(common.format_table(rows, ("breakdown", "seconds", "% of latency"), align="lrr"))
    if result.comm_by_tier:
        lines.append("")
        tiers = [(tier, seconds) for tier, seconds in sorted(result.comm_by_tier.items(), key=lambda kv: -kv[1])]
        lines.append(common.format_table(tiers, ("exposed comm by tier", "seconds")))
    lines.append("")
    memory = [(key.removesuffix("_gib").replace("_", " "), value) for key, value in result.memory.items()]
    lines.append(common.format_table(memory, ("memory per GPU", "GiB")))
    return "\n".join(lines)


def _batch_row(row: dict[str, str], number: int) -> dict[str, object]:
    from costmodel import simulate

    out: dict[str, object] = dict(row)
    try:
        missing = [c for c in BATCH_COLUMNS if c not in ("height", "width", "frames", "steps", "gpus")
                   and not (row.get(c) or "").strip()]
        if missing:
            raise DitplanError(f"row {number}: empty {missing[0]!r}.")

        def optional_int(key: str) -> int | None:
            text = (row.get(key) or "").strip()
            if not text:
                return None
            try:
                return int(text)
            except ValueError:
                raise DitplanError(f"row {number}: {key}={text!r} is not an integer.") from None

        generation = common.resolve_generation(row["model"].strip(), optional_int("height"), optional_int("width"),
                                               optional_int("frames"), optional_int("steps"))
        config = common.parse_config(row["config"])
        cluster = common.cluster_for_config(row["cluster"].strip(), config, optional_int("gpus"), None)
        result = simulate(generation.model, cluster, config, **generation.as_kwargs())
        figures = {"latency_s": result.latency_s, "memory_gib": result.memory_gib}
        require_finite(figures, f"row {number}")
        out.update(figures, feasible=result.feasible, reason=result.reason)
    except DitplanError as error:
        out.update(latency_s=None, memory_gib=None, feasible=False, reason=str(error))
    return out


def _run_batch(args: argparse.Namespace) -> int:
    rows = read_csv(args.batch, "--batch", BATCH_COLUMNS)
    results = [_batch_row(row, number) for number, row in enumerate(rows, start=1)]
    if args.format == "json":
        common.print_json(results)
        return 0
    fields = list(rows[0]) if rows else list(BATCH_COLUMNS)
    writer = csv.DictWriter(sys.stdout, fieldnames=[*fields, *[c for c in BATCH_OUTPUT if c not in fields]],
                            lineterminator="\n")
    writer.writeheader()
    for row in results:
        writer.writerow({key: ("" if value is None else value) for key, value in row.items()})
    return 0
