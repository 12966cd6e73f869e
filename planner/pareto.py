"""Pareto fronts across GPU counts: latency against GPUs, and against GPU-seconds per image.

More GPUs buy latency at the price of GPU time; a count is on the front when no other count is at
least as good on both axes and better on one. pandas and matplotlib are imported inside the
functions, so importing the planner stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.space import short_config

if TYPE_CHECKING:
    from planner.ranking import SearchResult


def _front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point dominates (both coordinates to be minimised)."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and oy <= y) and (ox < x or oy < y)
            for j, (ox, oy) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def pareto_front(result: "SearchResult"):
    """The best plan of every GPU count as a DataFrame, with the two Pareto fronts flagged.

    Columns: gpus, config, short_config, placement, latency_s, gpu_seconds_per_image, memory_gib, speedup,
    efficiency, front_latency_vs_gpus, front_latency_vs_gpu_seconds (booleans), chosen (the search's
    winner). One row per GPU count that has a plan, in increasing GPU count.
    """
    import pandas as pd

    best = result.best_per_count
    winner = result.best if result.plans else None
    rows: list[dict[str, Any]] = []
    for count, plan in best.items():
        rows.append({
            "gpus": count, "config": str(plan.config), "short_config": short_config(plan.config),
            "placement": ",".join(plan.placement.order),
            "latency_s": plan.latency_s, "gpu_seconds_per_image": plan.gpu_seconds_per_image,
            "memory_gib": plan.memory_gib, "speedup": result.speedup(plan), "efficiency": result.efficiency(plan),
            "chosen": plan is winner,
        })
    frame = pd.DataFrame(rows, columns=[
        "gpus", "config", "short_config", "placement", "latency_s", "gpu_seconds_per_image", "memory_gib", "speedup",
        "efficiency", "chosen"])
    frame["front_latency_vs_gpus"] = _front(list(zip(frame["gpus"].astype(float), frame["latency_s"])))
    frame["front_latency_vs_gpu_seconds"] = _front(list(zip(frame["gpu_seconds_per_image"], frame["latency_s"])))
    return frame


def plot_pareto(result: "SearchResult", path: str | None = None):
    """Two panels (latency vs GPUs, latency vs GPU-seconds per image) with the fronts and the winner annotated.

    Returns the matplotlib Figure; with `path` it is also saved there (PNG by extension). The figure
    is built without pyplot (rendered by Agg when saved), so it works without a display and leaves
    a notebook's backend alone.
    """
    from matplotlib.figure import Figure

    frame = pareto_front(result)
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    by_gpus, by_cost = figure.subplots(1, 2)
    panels = (
        (by_gpus, "gpus", "front_latency_vs_gpus", "GPUs", "latency vs GPUs"),
        (by_cost, "gpu_seconds_per_image", "front_latency_vs_gpu_seconds", "GPU-seconds per image (s)",
         "latency vs GPU time"),
    )
    for axes, column, front_column, xlabel, title in panels:
        axes.scatter(frame[column], frame["latency_s"], color="0.6", label="best per GPU count", zorder=2)
        front = frame[frame[front_column]].sort_values(column)
        axes.plot(front[column], front["latency_s"], "o-", color="tab:blue", label="Pareto front", zorder=3)
        for _, row in frame.iterrows():
            axes.annotate(f"{int(row['gpus'])}", (row[column], row["latency_s"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=7, color="0.3")
        chosen = frame[frame["chosen"]]
        if not chosen.empty:
            row = chosen.iloc[0]
            axes.scatter([row[column]], [row["latency_s"]], s=140, facecolors="none", edgecolors="tab:red",
                         linewidths=2, label="chosen", zorder=4)
            # Text to the left of the point: the winner is usually the fastest, at the right end.
            axes.annotate(f"{row['short_config']}\n{row['latency_s']:.2f} s", (row[column], row["latency_s"]),
                          textcoords="offset points", xytext=(-15, 55), ha="right", fontsize=7, color="tab:red",
                          bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "tab:red", "alpha": 0.9},
                          arrowprops={"arrowstyle": "->", "color": "tab:red"})
        if len(frame) > 1 and frame[column].max() / max(frame[column].min(), 1e-12) >= 8:
            axes.set_xscale("log", base=2)
            if column == "gpus":
                axes.set_xticks(list(frame["gpus"]), [str(n) for n in frame["gpus"]])
        axes.set_xlabel(xlabel)
        axes.set_ylabel("predicted latency (s)")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"{result.model} {result.width}x{result.height}, {result.steps} steps on {result.cluster}")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
