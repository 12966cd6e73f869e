"""Comparisons across clusters and methods, for notebooks and scripts.

`planner.search` ranks the configurations of one cluster; `planner.pareto_front` and
`planner.plot_pareto` show one search. The question an engineer asks next is comparative — which
method wins on which cluster, and at what GPU count — so this module gathers several searches:

- `method_of(config)`: the family name of a configuration (`Ulysses`, `CFG+PipeFusion`, `USP`, ...).
- `best_by_method(result)`: the fastest plan of every method family at every GPU count of a search.
- `compare_clusters(model, clusters, ...)`: the best plan per GPU count on each cluster (Pareto flags).
- `plot_clusters(frame)`: latency against GPUs and against GPU-seconds per image, one line per cluster,
  each point marked with the method that wins there.
- `short_config` (from planner.space): the compact configuration text the tables and plots use.

pandas and matplotlib are imported inside the functions; figures are built without pyplot, so they
work headless and display in Jupyter (`display(figure)` or as a cell's last expression).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from costmodel.config import ParallelConfig
from planner.space import short_config  # re-exported: compact configuration text for tables and plots

if TYPE_CHECKING:
    from planner.ranking import SearchResult

# Family names, in the order they are written when a configuration combines several methods.
METHOD_NAMES = (("cfg", "CFG"), ("ulysses", "Ulysses"), ("ring", "Ring"), ("pipefusion", "PipeFusion"), ("dp", "DP"))
# One marker per method family in the plots (matplotlib marker codes); `method_markers` gives other
# combinations the spare markers, so no two families in one figure share a marker.
METHOD_MARKERS = {"serial": "s", "CFG": "D", "Ulysses": "^", "Ring": "v", "USP": "P", "PipeFusion": "o",
                  "CFG+PipeFusion": "*", "CFG+Ulysses": ">", "CFG+Ring": "<", "CFG+USP": "X"}
SPARE_MARKERS = ("h", "p", "d", "H", "8", "1", "2", "3", "4", "+", "x")


def method_of(config: ParallelConfig | str) -> str:
    """The method family of a configuration: the methods with a degree above 1, joined with `+`.

    Ulysses and Ring together are written `USP` (their hybrid); one GPU is `serial`; PipeFusion with
    patches on one GPU (a serial run of the patch schedule) is `PipeFusion`.
    """
    parsed = config if isinstance(config, ParallelConfig) else ParallelConfig.parse(str(config))
    names = [name for axis, name in METHOD_NAMES if parsed.degree(axis) > 1]
    if parsed.pipefusion == 1 and parsed.uses_patches:
        names.append("PipeFusion")
    if "Ulysses" in names and "Ring" in names:
        names[names.index("Ulysses")] = "USP"
        names.remove("Ring")
    return "+".join(names) or "serial"


def method_markers(methods: Sequence[str]) -> dict[str, str]:
    """A distinct matplotlib marker for each family: METHOD_MARKERS' where it has one, else a spare."""
    spare = iter(marker for marker in SPARE_MARKERS if marker not in METHOD_MARKERS.values())
    return {method: METHOD_MARKERS.get(method) or next(spare, "o") for method in dict.fromkeys(methods)}


def best_by_method(result: "SearchResult"):
    """The fastest plan of every method family at every GPU count of a search, as a DataFrame.

    Columns: gpus, method, config, short_config, latency_s, gpu_seconds_per_image, memory_gib,
    speedup (over one GPU), wins (the fastest family at that GPU count). Sorted by gpus, then latency.
    Only simulator-scored plans count (in very large spaces the rest are closed-form estimates).
    """
    import pandas as pd

    best: dict[tuple[int, str], Any] = {}
    for plan in result.plans:  # best first, so the first plan of a (count, family) is its best
        if plan.scored_by != "simulator":
            continue
        best.setdefault((plan.gpus, method_of(plan.config)), plan)
    rows = [{
        "gpus": gpus, "method": method, "config": str(plan.config), "short_config": short_config(plan.config),
        "latency_s": plan.latency_s, "gpu_seconds_per_image": plan.gpu_seconds_per_image,
        "memory_gib": plan.memory_gib, "speedup": result.speedup(plan),
    } for (gpus, method), plan in best.items()]
    frame = pd.DataFrame(rows, columns=["gpus", "method", "config", "short_config", "latency_s",
                                        "gpu_seconds_per_image", "memory_gib", "speedup"])
    frame = frame.sort_values(["gpus", "latency_s"], kind="stable").reset_index(drop=True)
    frame["wins"] = frame.groupby("gpus")["latency_s"].transform("min") == frame["latency_s"]
    return frame


def compare_clusters(model: Any, clusters: Sequence[str] | Mapping[str, Any], gpus: Any = "1,2,4,8", *,
                     height: int | None = None, width: int | None = None, frames: int | None = None,
                     steps: int | None = None) -> tuple[Any, dict[str, "SearchResult"]]:
    """Search `model` on each cluster and return the best plan per GPU count of all of them.

    `clusters` is a list of cluster ids/paths searched over `gpus` (a count, a range text such as
    `1-16` or a list), or a mapping cluster -> its own GPU counts (a two-node cluster can go to 16).
    Returns `(table, searches)`: the `planner.pareto_front` of each search stacked, with `cluster`
    and `method` columns in front, and the searches themselves (cluster -> SearchResult) for
    drill-down (`.to_frame()`, `best_by_method`, `.explanation()`).
    """
    import pandas as pd

    from planner.pareto import pareto_front
    from planner.ranking import search

    counts = dict(clusters) if isinstance(clusters, Mapping) else {cluster: gpus for cluster in clusters}
    fronts, searches = [], {}
    for cluster, cluster_gpus in counts.items():
        result = search(model, cluster, cluster_gpus, height=height, width=width, frames=frames, steps=steps)
        searches[cluster] = result
        front = pareto_front(result)
        front.insert(0, "method", [method_of(text) for text in front["config"]])
        front.insert(0, "cluster", cluster)
        fronts.append(front)
    return pd.concat(fronts, ignore_index=True), searches


def plot_clusters(frame: Any, *, title: str | None = None, path: str | None = None):
    """Two panels from `compare_clusters`' table: latency vs GPUs and latency vs GPU-seconds per image.

    One line per cluster through its best plan at each GPU count; the marker says which method wins
    at that point, hollow where another GPU count of the same cluster dominates it on that panel's
    two axes (off the Pareto front). Returns the matplotlib Figure (saved to `path` if given).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    figure = Figure(figsize=(12, 5), layout="constrained")
    by_gpus, by_cost = figure.subplots(1, 2)
    colours = {cluster: f"C{index}" for index, cluster in enumerate(dict.fromkeys(frame["cluster"]))}
    markers = method_markers(frame.sort_values("gpus")["method"])
    panels = ((by_gpus, "gpus", "front_latency_vs_gpus", "GPUs", "latency vs GPUs"),
              (by_cost, "gpu_seconds_per_image", "front_latency_vs_gpu_seconds",
               "GPU-seconds per image (GPUs x latency / images, s)", "latency vs GPU time spent per image"))
    # Clusters often share points (a two-node cluster equals its one-node version up to 8 GPUs):
    # earlier clusters are drawn wider and larger underneath, so every line stays visible.
    styles = ("-", "--", ":", "-.")
    for axes, column, front, xlabel, panel_title in panels:
        for index, (cluster, group) in enumerate(frame.groupby("cluster", sort=False)):
            group = group.sort_values("gpus")
            axes.plot(group[column], group["latency_s"], styles[index % len(styles)], color=colours[cluster],
                      linewidth=max(1.2, 3.2 - 0.9 * index), alpha=0.8, zorder=2 + index)
            for _, row in group.iterrows():  # hollow: another GPU count of this cluster dominates the point
                axes.plot(row[column], row["latency_s"], markers[row["method"]],
                          color=colours[cluster], markersize=max(5.0, 13.0 - 3.0 * index), markeredgecolor="black",
                          markerfacecolor=colours[cluster] if row[front] else "white", zorder=10 + index)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        axes.set_xlabel(xlabel)
        axes.set_ylabel("predicted latency of the denoising loop (s)")
        axes.set_title(panel_title)
        axes.grid(True, which="both", alpha=0.3)
    counts = sorted(frame["gpus"].unique())
    by_gpus.set_xticks(counts, [str(int(c)) for c in counts])
    cluster_handles = [Line2D([], [], color=colour, linestyle=styles[index % len(styles)], label=cluster)
                       for index, (cluster, colour) in enumerate(colours.items())]
    method_handles = [Line2D([], [], linestyle="", marker=marker, color="0.5", markeredgecolor="black",
                             markersize=9, label=method) for method, marker in markers.items()]
    method_handles.append(Line2D([], [], linestyle="", marker="o", color="white", markeredgecolor="black",
                                 markersize=9, label="hollow: off the Pareto front"))
    by_gpus.legend(handles=cluster_handles, title="cluster", fontsize=8, loc="upper right")
    by_cost.legend(handles=method_handles, title="winning method", fontsize=8, loc="upper right")
    figure.suptitle(title or "Best plan per GPU count on each cluster")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
