"""`ditplan validate`: predicted vs published (and measured) latencies, row by row, then per scenario
the rank correlation and per (scenario, GPU count) whether the predicted best configuration is the
published best, then the median absolute percentage error. `--cross-validate` adds the same figures
for predictions made by constants calibrated without each scenario in turn."""
from __future__ import annotations

import argparse
from typing import Any

from planner.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", nargs="?", metavar="CSV", help="published measurements (default: the shipped public.csv)")
    parser.add_argument("--published", metavar="CSV", help="same as the CSV argument")
    parser.add_argument("--measured", metavar="CSV", help="also compare this project's own runs (same columns)")
    parser.add_argument("--cross-validate", action="store_true",
                        help="also predict each scenario with constants calibrated on all the others (slow: one "
                             "calibration per scenario)")
    common.add_format_argument(parser)


def _figures(table: Any) -> dict[str, Any]:
    from costmodel.validation import group_summary

    groups = group_summary(table)
    errors = table["error_pct"].abs()
    per_scenario = table.groupby("scenario", sort=False)["error_pct"].apply(lambda e: float(e.abs().median()))
    return {
        "median_abs_error_pct": float(errors.median()),
        "rows": int(errors.notna().sum()),
        "scenario_median_abs_error_pct": {k: v for k, v in per_scenario.items() if v == v},
        "groups": groups,
        "best_agrees": f"{int(groups['best_agrees'].sum())}/{len(groups)}",
    }


def run(args: argparse.Namespace) -> int:
    from costmodel.errors import DitplanError
    from costmodel.validation import cross_validated_table, scenario_summary, superlinear_notes, validation_table

    published = args.csv or args.published
    table = validation_table(published, args.measured)
    failed = table[table["predicted_s"].isna()]
    if len(failed):
        first = failed.iloc[0]
        raise DitplanError(f"{len(failed)} row(s) cannot be predicted; the first, scenario {first['scenario']!r} "
                           f"({first['model']} on {first['cluster']}): {first['reason']}")
    summary = scenario_summary(table)
    in_sample = _figures(table)
    cross = _figures(cross_validated_table(published)) if args.cross_validate else None
    whole = table[table["timed"] == "end to end"]["error_pct"].abs()
    median_end_to_end = float(whole.median()) if whole.notna().any() else None
    if args.format == "json":
        out = {
            "rows": table.to_dict(orient="records"),
            "scenarios": summary.to_dict(orient="records"),
            "groups": in_sample["groups"].to_dict(orient="records"),
            "median_abs_error_pct": in_sample["median_abs_error_pct"],
            "best_agrees": in_sample["best_agrees"],
            "median_abs_error_end_to_end_pct": median_end_to_end,
            "superlinear_notes": superlinear_notes(table),
        }
        if cross is not None:
            out["cross_validation"] = {
                "median_abs_error_pct": cross["median_abs_error_pct"], "rows": cross["rows"],
                "scenario_median_abs_error_pct": cross["scenario_median_abs_error_pct"],
                "groups": cross["groups"].to_dict(orient="records"), "best_agrees": cross["best_agrees"],
            }
        common.print_json(out)
        return 0
    rows = [(r["scenario"], r["gpus"], _short(r["config"]), r["latency_s"], r["predicted_s"], f"{r['error_pct']:.1f}",
             r["timed"] if isinstance(r.get("timed"), str) else "-", r.get("quality", ""))
            for r in table.to_dict(orient="records")]
    print(common.format_table(rows, ("scenario", "GPUs", "config", "published s", "predicted s", "error %", "timed",
                                     "quality"), align="lrlrrrll"))
    print()
    groups = in_sample["groups"]
    grows = [(g["scenario"], g["gpus"], g["rows"], _short(g["published_best"]), _short(g["predicted_best"]), g["best_agrees"])
             for g in groups.to_dict(orient="records")]
    print(common.format_table(grows, ("scenario", "GPUs", "rows", "published best", "predicted best", "agree"),
                              align="lrrllr"))
    print()
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    srows = [(s["scenario"], s["rows"], s["spearman"], percent(in_sample["scenario_median_abs_error_pct"].get(s["scenario"])),
              percent(cross["scenario_median_abs_error_pct"].get(s["scenario"]) if cross else None))
             for s in summary.to_dict(orient="records")]
    headers = ("scenario", "rows", "spearman", "median error %") + (("left out: median error %",) if cross else ())
    print(common.format_table([r if cross else r[:-1] for r in srows], headers, align="lrrrr"[:len(headers)]))
    print()
    print(f"in-sample: median absolute error {in_sample['median_abs_error_pct']:.1f}% over {in_sample['rows']} rows; "
          f"predicted best = published best in {in_sample['best_agrees']} (scenario, GPU count) groups of two or more "
          "rows, rows flagged inconsistent left out of the best")
    if cross is not None:
        print(f"leave-one-scenario-out: median absolute error {cross['median_abs_error_pct']:.1f}% over {cross['rows']} "
              f"rows; predicted best = published best in {cross['best_agrees']} groups")
    if median_end_to_end is not None:
        print(f"end-to-end rows (timed as the whole generation, compared with the predicted end to end): "
              f"median absolute error {median_end_to_end:.1f}% over {int(whole.notna().sum())} rows")
    for note in superlinear_notes(table):
        print(f"note: {note}")
    return 0


def _short(text: Any) -> str:
    from costmodel import ParallelConfig
    from planner.space import short_config

    return short_config(ParallelConfig.parse(text)) if isinstance(text, str) and text else "-"
