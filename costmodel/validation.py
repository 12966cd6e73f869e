"""Predicted vs published (and measured) latencies: the table behind `ditplan validate`.

The public rows (profiles/validation/public.csv) time the
denoising loop (PipeFusion paper: the transformer only) or the whole generation (xDiT's docs tables:
end to end); the prediction compared is the matching one: `latency_s`, or `end_to_end_s` (text
encoding, loop, VAE decode and the transfers between them). pandas is imported here only, lazily, so the CLI stays light.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from costmodel import files, strict
from costmodel.config import ParallelConfig
from costmodel.errors import DitplanError
from profiles import PROFILES_DIR

PUBLIC_CSV = PROFILES_DIR / "validation" / "public.csv"
COLUMNS = ("scenario", "model", "height", "width", "frames", "steps", "cluster", "gpus", "cfg", "ulysses", "ring",
           "pipefusion", "patches", "warmup", "dp", "latency_s")
# Sources whose published figure covers the whole generation (text encoders + loop + VAE decode),
# unless the row carries PER_STEP_TAG: a chart of seconds per step times the steps, transformer only.
END_TO_END_SOURCES = ("xDiT docs",)
PER_STEP_TAG = "[per-step x50]"
# The `quality` of a published figure faster than its own settings allow (public.csv's README gives
# the rule): it counts in error figures, not in whether the predicted best is the published best.
INCONSISTENT = "inconsistent"


def is_end_to_end(row: dict[str, Any]) -> bool:
    source = str(row.get("source", ""))
    return any(s in source for s in END_TO_END_SOURCES) and PER_STEP_TAG not in source


def published_latency(row: dict[str, Any]) -> float:
    return float(row["latency_s"])


def row_config(row: dict[str, str]) -> ParallelConfig:
    def degree(key: str, default: int | None) -> int | None:
        text = (row.get(key) or "").strip()
        return default if not text else int(text)

    return ParallelConfig(cfg=degree("cfg", 1), ulysses=degree("ulysses", 1), ring=degree("ring", 1),
                          pipefusion=degree("pipefusion", 1), dp=degree("dp", 1), patches=degree("patches", None),
                          warmup=degree("warmup", 1))


def read_rows(path: str | Path | None = None) -> list[dict[str, str]]:
    """The measurement rows of a CSV; a header-only file or a bad latency or size is refused by row."""
    path = Path(path) if path is not None else PUBLIC_CSV
    rows = files.read_csv(path, "measurements", COLUMNS)
    if not rows:
        raise DitplanError(f"measurements {path}: no rows under the header; nothing to compare.")
    for number, row in enumerate(rows, start=1):
        where = f"measurements {path}: row {number}"
        strict.number({"latency_s": _parsed(row["latency_s"])}, "latency_s", where)
        for column in ("height", "width", "steps", "gpus", *(("frames",) if row["frames"].strip() else ())):
            strict.integer({column: _parsed(row[column])}, column, where)
    return rows


def _parsed(text: str) -> Any:
    """A CSV cell as the number it spells (int or float), else the text (which the strict check refuses)."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            continue
    return text.strip()


def prediction_parts(row: dict[str, Any], cluster: Any) -> tuple[float, Any]:
    """(the prediction to compare with the row's latency, the SimResult) on `cluster` (a Cluster)."""
    from costmodel.simulate import simulate

    result = simulate(row["model"], cluster, row_config(row), height=int(row["height"]), width=int(row["width"]),
                      frames=int(row["frames"] or 1), steps=int(row["steps"]))
    return (result.end_to_end_s if is_end_to_end(row) else result.latency_s), result


def predict_row(row: dict[str, str], cluster_for: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """One measurement row -> the row plus `predicted_s` (and `error_pct`), or `reason` if it cannot be simulated.

    `cluster_for(cluster id, gpus)` gives the cluster to predict on (default: the built-in one).
    """
    from costmodel.topology import load_cluster

    out: dict[str, Any] = dict(row)
    try:
        config = row_config(row)
        cluster = (cluster_for or (lambda name, gpus: load_cluster(name, gpus=gpus)))(row["cluster"], int(row["gpus"]))
        predicted, result = prediction_parts(row, cluster)
    except (DitplanError, ValueError) as error:
        out.update(config=None, predicted_s=math.nan, error_pct=math.nan, reason=str(error))
        return out
    end_to_end = is_end_to_end(row)
    published = published_latency(row)
    out.update(config=str(config), predicted_s=predicted, timed="end to end" if end_to_end else "denoising loop",
               error_pct=100.0 * (predicted - published) / published, feasible=result.feasible, reason=result.reason)
    return out


def validation_table(path: str | Path | None = None, measured: str | Path | None = None):
    """A pandas DataFrame, one row per measurement: published vs predicted latency and the error (%).

    `measured` adds rows from a CSV of this project's own runs (same columns, `source` = measured).
    Scenario-level figures (rank correlation, whether the predicted best is the published best) are in
    `scenario_summary(table)`.
    """
    import pandas as pd

    rows = [predict_row(row) for row in read_rows(path)]
    if measured is not None:
        rows += [predict_row(row) for row in read_rows(measured)]
    table = pd.DataFrame(rows)
    for column in ("latency_s", "height", "width", "frames", "steps", "gpus"):
        table[column] = pd.to_numeric(table[column])
    table["linear_bound_s"] = _linear_bounds(table)
    table["beats_linear"] = table["latency_s"] < table["linear_bound_s"]
    return table


def _linear_bounds(table) -> list[float]:
    """Per row, the scenario's one-GPU latency divided by the row's GPU count (NaN without a one-GPU row).

    Splitting one generation over N GPUs at best divides the per-GPU work by N, so a published figure
    below this bound is faster than perfect scaling: worth flagging, since no model of per-GPU work and
    communication can reach it.
    """
    serial = table[table["gpus"] == 1].groupby("scenario")["latency_s"].min()
    return [float(serial[s]) / g if s in serial.index else math.nan for s, g in zip(table["scenario"], table["gpus"])]


def superlinear_notes(table) -> list[str]:
    """One sentence per published row that beats perfect scaling of its scenario's one-GPU row."""
    notes = []
    for row in table[table["beats_linear"]].to_dict(orient="records"):
        serial = row["linear_bound_s"] * row["gpus"]
        config = row["config"] if isinstance(row["config"], str) else f"on {row['gpus']} GPUs"  # unpriced rows
        notes.append(
            f"{row['scenario']} {config}: published {row['latency_s']:g} s is faster than perfect scaling of "
            f"the scenario's one-GPU row ({serial:g} s / {row['gpus']} = {row['linear_bound_s']:.2f} s)."
        )
    return notes


def cross_validated_table(path: str | Path | None = None):
    """Like `validation_table`, but each scenario predicted by constants calibrated without it
    (every other public scenario), starting from the datasheet-based priors."""
    import pandas as pd

    from costmodel.calibration import leave_one_scenario_out

    rows = read_rows(path)
    predicted = {(r["scenario"], r["gpus"], str(row_config(r)), r["latency_s"]): r for r in leave_one_scenario_out(rows)}
    out = []
    for row in rows:
        hit = predicted.get((row["scenario"], row["gpus"], str(row_config(row)), row["latency_s"]))
        out.append({**row, "config": str(row_config(row)), "predicted_s": hit["predicted_s"] if hit else math.nan,
                    "error_pct": hit["error_pct"] if hit else math.nan})
    table = pd.DataFrame(out)
    for column in ("latency_s", "height", "width", "frames", "steps", "gpus"):
        table[column] = pd.to_numeric(table[column])
    return table


def _best_candidates(group):
    """The rows that compete for "best": measured ones, without figures flagged inconsistent."""
    group = group.dropna(subset=["predicted_s"])
    if "quality" in group:
        group = group[group["quality"] != INCONSISTENT]
    return group


def group_summary(table) -> "Any":
    """Per (scenario, GPU count) with two or more comparable rows: published best, predicted best, agreement."""
    import pandas as pd

    summaries = []
    for (scenario, gpus), group in table.groupby(["scenario", "gpus"], sort=False):
        group = _best_candidates(group)
        if len(group) < 2:
            continue
        published_best = group.loc[group["latency_s"].idxmin()]
        predicted_best = group.loc[group["predicted_s"].idxmin()]
        summaries.append({"scenario": scenario, "gpus": int(gpus), "rows": len(group),
                          "published_best": published_best["config"], "predicted_best": predicted_best["config"],
                          "best_agrees": bool(published_best.name == predicted_best.name)})
    return pd.DataFrame(summaries, columns=["scenario", "gpus", "rows", "published_best", "predicted_best", "best_agrees"])


def scenario_summary(table) -> "Any":
    """Per scenario: rows, Spearman rank correlation, published best, predicted best, whether they agree
    (the best among rows not flagged inconsistent)."""
    import pandas as pd
    from scipy.stats import spearmanr

    summaries = []
    for scenario, group in table.groupby("scenario", sort=False):
        group = group.dropna(subset=["predicted_s"])
        if group.empty:
            continue
        candidates = _best_candidates(group)
        published_best = candidates.loc[candidates["latency_s"].idxmin()]
        predicted_best = candidates.loc[candidates["predicted_s"].idxmin()]
        rho = float(spearmanr(group["latency_s"], group["predicted_s"]).statistic) if len(group) > 2 else math.nan
        summaries.append({
            "scenario": scenario, "rows": len(group), "spearman": rho,
            "published_best": f"{published_best['config']} on {published_best['gpus']} GPU(s)",
            "predicted_best": f"{predicted_best['config']} on {predicted_best['gpus']} GPU(s)",
            "best_agrees": bool(published_best.name == predicted_best.name),
            "median_abs_error_pct": float(group["error_pct"].abs().median()),
        })
    return pd.DataFrame(summaries)
