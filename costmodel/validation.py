"""Predicted vs published (and measured) latencies: the table behind `ditplan validate`.

The public rows (profiles/validation/public.csv, a copy of ../shared/validation/public.csv) time the
denoising loop (PipeFusion paper: the transformer only) or the whole generation (xDiT's docs tables:
end to end); the prediction compared is the matching one: `latency_s`, or `end_to_end_s` (text
encoding, loop, VAE decode and the transfers between them). pandas is imported here only, lazily, so the CLI stays light.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from costmodel.config import ParallelConfig
from costmodel.errors import DitplanError
from profiles import PROFILES_DIR

PUBLIC_CSV = PROFILES_DIR / "validation" / "public.csv"
COLUMNS = ("scenario", "model", "height", "width", "frames", "steps", "cluster", "gpus", "cfg", "ulysses", "ring",
           "pipefusion", "patches", "warmup", "dp", "latency_s")
# Sources whose published figure covers the whole generation (text encoders + loop + VAE decode).
END_TO_END_SOURCES = ("xDiT docs",)


def _config(row: dict[str, str]) -> ParallelConfig:
    def degree(key: str, default: int | None) -> int | None:
        text = (row.get(key) or "").strip()
        return default if not text else int(text)

    return ParallelConfig(cfg=degree("cfg", 1), ulysses=degree("ulysses", 1), ring=degree("ring", 1),
                          pipefusion=degree("pipefusion", 1), dp=degree("dp", 1), patches=degree("patches", None),
                          warmup=degree("warmup", 1))


def read_rows(path: str | Path | None = None) -> list[dict[str, str]]:
    path = Path(path) if path is not None else PUBLIC_CSV
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DitplanError(f"{path}: missing column {missing[0]!r}; the columns are {', '.join(COLUMNS)}.")
            return list(reader)
    except OSError as error:
        raise DitplanError(f"{path}: cannot read the measurements ({error.strerror}).") from None


def predict_row(row: dict[str, str]) -> dict[str, Any]:
    """One measurement row -> the row plus `predicted_s` (and `error_pct`), or `reason` if it cannot be simulated."""
    from costmodel.simulate import simulate
    from costmodel.topology import load_cluster

    out: dict[str, Any] = dict(row)
    try:
        config = _config(row)
        cluster = load_cluster(row["cluster"], gpus=int(row["gpus"]))
        result = simulate(row["model"], cluster, config, height=int(row["height"]), width=int(row["width"]),
                          frames=int(row["frames"] or 1), steps=int(row["steps"]))
    except (DitplanError, ValueError) as error:
        out.update(config=None, predicted_s=math.nan, error_pct=math.nan, reason=str(error))
        return out
    end_to_end = any(source in row.get("source", "") for source in END_TO_END_SOURCES)
    predicted = result.end_to_end_s if end_to_end else result.latency_s
    published = float(row["latency_s"])
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
        notes.append(
            f"{row['scenario']} {row['config']}: published {row['latency_s']:g} s is faster than perfect scaling of "
            f"the scenario's one-GPU row ({serial:g} s / {row['gpus']} = {row['linear_bound_s']:.2f} s)."
        )
    return notes


def scenario_summary(table) -> "Any":
    """Per scenario: rows, Spearman rank correlation, published best, predicted best, whether they agree."""
    import pandas as pd
    from scipy.stats import spearmanr

    summaries = []
    for scenario, group in table.groupby("scenario", sort=False):
        group = group.dropna(subset=["predicted_s"])
        if group.empty:
            continue
        published_best = group.loc[group["latency_s"].idxmin()]
        predicted_best = group.loc[group["predicted_s"].idxmin()]
        rho = float(spearmanr(group["latency_s"], group["predicted_s"]).statistic) if len(group) > 2 else math.nan
        summaries.append({
            "scenario": scenario, "rows": len(group), "spearman": rho,
            "published_best": f"{published_best['config']} on {published_best['gpus']} GPU(s)",
            "predicted_best": f"{predicted_best['config']} on {predicted_best['gpus']} GPU(s)",
            "best_agrees": bool(published_best.name == predicted_best.name),
            "median_abs_error_pct": float(group["error_pct"].abs().median()),
        })
    return pd.DataFrame(summaries)
