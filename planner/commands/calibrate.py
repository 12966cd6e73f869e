"""`ditplan calibrate`: fit a cluster's GPU and link constants to measured latencies and write a
cluster file every command takes; prints each fitted value with its uncertainty and the value it
replaced, every row's residual, and the leave-one-scenario-out error."""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from costmodel.errors import DitplanError
from planner.commands import common

HELP = "fit the cluster's physical constants to measured latencies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--measurements", nargs="+", required=True, metavar="FILE",
                        help="rows in the public.csv format (.csv) or run.json files of `ditplan run`")
    parser.add_argument("--cluster", help="cluster id or YAML path the measurements ran on (CSV rows of other "
                                          "clusters are left out)")
    parser.add_argument("--out", metavar="PATH", help="cluster YAML to write (hardware inline)")
    parser.add_argument("--builtin", action="store_true",
                        help="instead of --cluster/--out: update the built-in hardware and cluster profiles of every "
                             "cluster the rows name (how the shipped constants are made)")
    parser.add_argument("--no-cross-validate", action="store_true", help="skip the leave-one-scenario-out error")
    common.add_format_argument(parser)


def read_measurements(paths: list[str], cluster_id: str | None) -> list[dict[str, str]]:
    """Rows from CSV files and run.json files (the latter on `cluster_id`)."""
    from costmodel.validation import read_rows

    rows: list[dict[str, str]] = []
    for text in paths:
        path = Path(text)
        if path.suffix == ".json":
            rows.append(_run_json_row(path, cluster_id))
        else:
            rows += read_rows(path)
    return rows


def _run_json_row(path: Path, cluster_id: str | None) -> dict[str, str]:
    from costmodel.config import ParallelConfig

    if cluster_id is None:
        raise DitplanError(f"{path}: a run.json does not name its cluster; give --cluster.")
    try:
        record = json.loads(path.read_text())
    except OSError as error:
        raise DitplanError(f"{path}: cannot read it ({error.strerror}).") from None
    except json.JSONDecodeError as error:
        raise DitplanError(f"{path}: not JSON ({error.msg} at line {error.lineno}).") from None
    missing = [key for key in ("model", "config", "height", "width", "frames", "steps", "world_size", "latency")
               if key not in record]
    if missing or not isinstance(record.get("latency"), dict) or "loop_s" not in record["latency"]:
        raise DitplanError(f"{path}: not a run.json of `ditplan run` (missing {', '.join(missing) or 'latency.loop_s'}).")
    config = ParallelConfig.parse(str(record["config"]))
    return {
        "scenario": f"run/{record['model']}/{record['width']}x{record['height']}x{record['frames']}/{cluster_id}",
        "model": str(record["model"]), "height": str(record["height"]), "width": str(record["width"]),
        "frames": str(record["frames"]), "steps": str(record["steps"]), "cluster": cluster_id,
        "gpus": str(record["world_size"]), "cfg": str(config.cfg), "ulysses": str(config.ulysses),
        "ring": str(config.ring), "pipefusion": str(config.pipefusion), "patches": str(config.patches),
        "warmup": str(config.warmup), "dp": str(config.dp), "latency_s": str(record["latency"]["loop_s"]),
        "quality": "exact", "source": f"measured: {path.name}",
    }


def run(args: argparse.Namespace) -> int:
    from costmodel.calibrated_profiles import write_builtin, write_cluster_file
    from costmodel.calibration import BUILTIN_HELD_OUT_MODELS, calibrate, leave_one_scenario_out
    from costmodel.topology import load_cluster

    if args.builtin == bool(args.cluster or args.out):
        raise DitplanError("give either --cluster C --out PATH (a cluster file of your own) or --builtin "
                           "(update the shipped profiles), not both and not neither.")
    cluster = load_cluster(args.cluster) if args.cluster else None
    rows = read_measurements(args.measurements, cluster.id if cluster else None)
    bases = {cluster.id: cluster} if cluster else {}
    names = [cluster.id] if cluster else None
    if cluster:
        rows = [row for row in rows if row["cluster"] == cluster.id]
    calibration = calibrate(rows, names, bases, BUILTIN_HELD_OUT_MODELS if args.builtin else ())
    command = "ditplan calibrate " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("calibrate") + 1:]) \
        if "calibrate" in sys.argv else "ditplan calibrate"
    source = f"{command} ({datetime.date.today().isoformat()}) over {len(calibration.rows)} rows"
    loso = [] if args.no_cross_validate else leave_one_scenario_out(rows, names, bases)
    if args.builtin:
        written = write_builtin(calibration, source)
    else:
        write_cluster_file(calibration, cluster, Path(args.out), source)
        written = [Path(args.out)]
    _report(calibration, loso, written, args.format)
    return 0


def _report(calibration: Any, loso: list[dict[str, Any]], written: list[Path], fmt: str) -> None:
    parameters = [{"parameter": p.label, "value": p.value, "sigma": p.sigma if p.fitted else None, "replaced": p.replaced, "prior": p.prior,
                   "low": p.low, "high": p.high, "unit": p.unit, "at_bound": p.fitted and p.at_bound,
                   "fitted": p.fitted} for p in calibration.parameters]
    residuals = [{"scenario": r["scenario"], "gpus": int(r["gpus"]), "config": _config_text(r),
                  "measured_s": float(r["latency_s"]), "predicted_s": r["predicted_s"], "error_pct": r["error_pct"]}
                 for r in calibration.rows]
    in_sample = statistics.median(abs(r["error_pct"]) for r in residuals) if residuals else float("nan")
    by_scenario: dict[str, list[float]] = {}
    for row in loso:
        by_scenario.setdefault(row["scenario"], []).append(abs(row["error_pct"]))
    loso_median = statistics.median(abs(r["error_pct"]) for r in loso) if loso else float("nan")
    if fmt == "json":
        common.print_json({
            "parameters": parameters, "residuals": residuals, "median_abs_error_pct": in_sample,
            "leave_one_scenario_out": {"median_abs_error_pct": loso_median,
                                       "scenarios": {s: statistics.median(e) for s, e in by_scenario.items()}},
            "left_out": [{"scenario": row["scenario"], "gpus": row["gpus"], "reason": reason}
                         for row, reason in calibration.left_out],
            "written": [str(p) for p in written],
        })
        return
    print(common.format_table(
        [(p["parameter"], f"{p['value']:.3g}", f"± {p['sigma']:.2g}" if p["fitted"] else "-", f"{p['replaced']:.3g}",
          f"[{p['low']:g}, {p['high']:g}] {p['unit']}",
          "at bound" if p["at_bound"] else ("" if p["fitted"] else "prior: the rows do not constrain it"))
         for p in parameters],
        ("parameter", "fitted", "uncertainty", "replaced", "bound", ""), align="lrrrll"))
    print()
    print(common.format_table(
        [(r["scenario"], r["gpus"], r["config"], r["measured_s"], r["predicted_s"], r["error_pct"]) for r in residuals],
        ("scenario", "GPUs", "config", "measured s", "predicted s", "residual %"), align="lrlrrr"))
    print()
    print(f"in-sample median absolute error: {in_sample:.1f}% over {len(residuals)} rows")
    for row, reason in calibration.left_out:
        print(f"left out {row['scenario']} on {row['gpus']} GPU(s): {reason}")
    if loso:
        for scenario, errors in by_scenario.items():
            print(f"  left out {scenario}: median {statistics.median(errors):.1f}% over {len(errors)} rows")
        print(f"leave-one-scenario-out median absolute error: {loso_median:.1f}% over {len(loso)} rows")
    print("wrote " + ", ".join(str(p) for p in written))


def _config_text(row: dict[str, Any]) -> str:
    from costmodel.validation import row_config
    from planner.space import short_config

    return short_config(row_config(row))
