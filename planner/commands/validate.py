"""`ditplan validate`: predicted vs published (and measured) latencies, row by row, then per scenario
the rank correlation and whether the predicted best configuration is the published best, then the
median absolute percentage error."""
from __future__ import annotations

import argparse

from planner.commands import common

HELP = "compare predictions with published (and measured) latencies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--published", metavar="CSV", help="published measurements (default: the shipped public.csv)")
    parser.add_argument("--measured", metavar="CSV", help="also compare this project's own runs (same columns)")
    common.add_format_argument(parser)


def run(args: argparse.Namespace) -> int:
    from costmodel.validation import scenario_summary, superlinear_notes, validation_table

    table = validation_table(args.published, args.measured)
    summary = scenario_summary(table)
    median = float(table["error_pct"].abs().median())
    whole = table[table["timed"] == "end to end"]["error_pct"].abs()
    median_end_to_end = float(whole.median()) if whole.notna().any() else None
    agree = int(summary["best_agrees"].sum()) if len(summary) else 0
    if args.format == "json":
        common.print_json({
            "rows": table.to_dict(orient="records"),
            "scenarios": summary.to_dict(orient="records"),
            "median_abs_error_pct": median,
            "median_abs_error_end_to_end_pct": median_end_to_end,
            "best_agrees": f"{agree}/{len(summary)}",
            "superlinear_notes": superlinear_notes(table),
        })
        return 0
    from costmodel import ParallelConfig
    from planner.space import short_config as short

    def short_config(text: str) -> str:
        return short(ParallelConfig.parse(text))

    rows = [(r["scenario"], r["gpus"], short_config(r["config"]) if r["config"] else "-", r["latency_s"],
             r["predicted_s"], r["error_pct"], r["timed"] if isinstance(r.get("timed"), str) else "-")
            for r in table.to_dict(orient="records")]
    print(common.format_table(rows, ("scenario", "GPUs", "config", "published s", "predicted s", "error %", "timed"),
                              align="lrlrrrl"))
    print()
    srows = [(s["scenario"], s["rows"], s["spearman"], s["published_best"].split(" on ")[0],
              s["predicted_best"].split(" on ")[0], s["best_agrees"]) for s in summary.to_dict(orient="records")]
    srows = [(a, b, c, short_config(d), short_config(e), f) for a, b, c, d, e, f in srows]
    print(common.format_table(srows, ("scenario", "rows", "spearman", "published best", "predicted best", "agree"),
                              align="lrrllr"))
    print()
    print(f"median absolute error: {median:.1f}% over {int(table['error_pct'].notna().sum())} rows; "
          f"predicted best = published best in {agree} of {len(summary)} scenarios")
    if median_end_to_end is not None:
        print(f"end-to-end rows (timed as the whole generation, compared with the predicted end to end): "
              f"median absolute error {median_end_to_end:.1f}% over {int(whole.notna().sum())} rows")
    for note in superlinear_notes(table):
        print(f"note: {note}")
    return 0
