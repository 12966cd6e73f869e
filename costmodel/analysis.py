"""Tables and figures over simulator results, for notebooks and scripts.

The simulator answers one configuration at a time (`simulate` -> `SimResult`); these helpers turn
many answers into pandas DataFrames and matplotlib figures:

- `sweep(model, cluster, configs, ...)`: one row per configuration (latency, memory, breakdown).
- `timeline_frame(result)`: the per-rank events of a `simulate(..., trace=True)` result, in seconds.
- `breakdown_frame(results)`: each result's latency split into compute, warmup, bubbles and exposed
  communication per link tier; the terms add up to the latency.
- `scaled_config(config, gpus)`: the same method mix on fewer GPUs (for scaling curves).
- `plot_timeline(...)` / `plot_breakdown(...)`: a Gantt chart of the ranks and stacked breakdown bars.

pandas and matplotlib are imported inside the functions, so `import costmodel` stays light; torch
is never imported. Figures are built without pyplot, so they work headless and show in Jupyter
(`display(figure)` or as a cell's last expression).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from costmodel.config import ParallelConfig
from costmodel.errors import DitplanError
from costmodel.simulate import SimResult, simulate

# Colours of the timeline's event categories (the trace's `cat`); warmup compute is told apart from
# pipelined compute by its name, since both are `compute` in the Chrome trace.
CATEGORY_COLOURS = {
    "compute": "tab:blue",
    "warmup": "tab:purple",
    "communication": "tab:orange",
    "waiting": "0.85",
}
STEP_SHADES = {"compute": "#7fb2e0", "warmup": "#c5a3dc"}
# Stacked breakdown segments in drawing order, with their colours; link tiers follow, one colour each.
TERM_COLOURS = {"compute_s": "tab:blue", "warmup_s": "tab:purple", "bubble_s": "0.7", "straggle_s": "0.5"}
TIER_NAMES = {"nvlink": "NVLink", "pcie": "PCIe (within a CPU socket)", "socket": "across CPU sockets",
              "network": "between nodes (network)", "measured": "measured tables", "unattributed": "tier not known"}
TIER_COLOURS = {"nvlink": "tab:green", "pcie": "tab:orange", "socket": "tab:red", "network": "tab:brown",
                "measured": "tab:pink", "local": "tab:olive"}


def sweep(model: Any, cluster: Any, configs: Iterable[Any], *, height: int | None = None, width: int | None = None,
          frames: int | None = None, steps: int | None = None):
    """Simulate each configuration on `cluster` and return one DataFrame row per configuration.

    `cluster` is an id or YAML path (each configuration gets as many of its GPUs as it needs) or a
    loaded `Cluster` (used as is). A configuration that breaks a rule is kept with its reason and NaN
    figures, so a sweep over a grid never stops halfway. Columns: config, gpus, latency_s (the denoising
    loop), per_step_s, memory_gib, feasible, reason, text_encode_s, vae_decode_s, then every breakdown term as `breakdown.<term>` (0 where a simulated
    configuration lacks the term, e.g. bubbles without PipeFusion).
    """
    import pandas as pd

    from costmodel.topology import Cluster, load_cluster

    rows: list[dict[str, Any]] = []
    for config in configs:
        parsed = config if isinstance(config, ParallelConfig) else ParallelConfig.parse(str(config))
        row: dict[str, Any] = {"config": str(parsed), "gpus": parsed.world_size}
        try:
            target = cluster if isinstance(cluster, Cluster) else load_cluster(str(cluster), gpus=parsed.world_size)
            result = simulate(model, target, parsed, height=height, width=width, frames=frames, steps=steps)
        except DitplanError as error:
            row.update(latency_s=math.nan, per_step_s=math.nan, memory_gib=math.nan, feasible=False, reason=str(error),
                       text_encode_s=math.nan, vae_decode_s=math.nan)
            rows.append(row)
            continue
        row.update(latency_s=result.latency_s, per_step_s=result.per_step_s, memory_gib=result.memory_gib,
                   feasible=result.feasible, reason=result.reason, text_encode_s=result.text_encode_s,
                   vae_decode_s=result.vae_decode_s,
                   **{f"breakdown.{key}": value for key, value in result.breakdown.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    simulated = frame["latency_s"].notna()
    for column in [c for c in frame.columns if c.startswith("breakdown.")]:
        frame.loc[simulated, column] = frame.loc[simulated, column].fillna(0.0)  # a term a method lacks is 0 s
    return frame


def scaled_config(config: ParallelConfig | str, gpus: int) -> ParallelConfig:
    """The same method mix on fewer GPUs: halve the largest degree until the product is `gpus`.

    Ties go to the axis applied last in xDiT's placement (dp, then pipefusion, ring, ulysses, cfg), so
    `ulysses=2,ring=2` on 2 GPUs is `ulysses=2` and `cfg=2,pipefusion=4` on 4 is `cfg=2,pipefusion=2`.
    PipeFusion's patch count follows the degree where it was the default (patches = pipefusion) and is
    kept otherwise; warmup is kept. Used to draw the scaling curve a published configuration belongs to.
    """
    parsed = config if isinstance(config, ParallelConfig) else ParallelConfig.parse(str(config))
    if gpus < 1 or parsed.world_size % gpus or (parsed.world_size // gpus) & (parsed.world_size // gpus - 1):
        raise DitplanError(f"scaled_config: {gpus} GPUs is not {parsed.world_size} divided by a power of two.")
    degrees = {axis: parsed.degree(axis) for axis in ("cfg", "ulysses", "ring", "pipefusion", "dp")}
    while math.prod(degrees.values()) > gpus:
        largest = max(degrees.values())
        axis = [a for a, d in degrees.items() if d == largest][-1]
        degrees[axis] //= 2
    patches = degrees["pipefusion"] if parsed.patches == parsed.pipefusion else parsed.patches
    return ParallelConfig(**degrees, patches=patches, warmup=parsed.warmup)


def timeline_frame(result: SimResult):
    """The events of a traced simulation as a DataFrame, one row per event, times in seconds.

    Columns: rank, track (`compute` or `communication`), name, category (`compute`, `warmup`,
    `communication`, `waiting`), start_s, end_s, duration_s, step, patch, stage (NaN where the event
    has none). Rows are sorted by rank, then start. Needs `simulate(..., trace=True)`.
    """
    import pandas as pd

    if result.trace is None:
        raise DitplanError(f"{result.config}: this result has no timeline; simulate it with trace=True.")
    tracks = {0: "compute", 1: "communication"}
    rows = []
    for event in result.trace:
        if event.get("ph") != "X":  # metadata events name the tracks; they carry no time
            continue
        category = event["cat"]
        if category == "compute" and event["name"].startswith("warmup"):
            category = "warmup"
        start = event["ts"] * 1e-6
        duration = event["dur"] * 1e-6
        args = event.get("args", {})
        rows.append({
            "rank": int(event["pid"]), "track": tracks.get(event["tid"], str(event["tid"])), "name": event["name"],
            "category": category, "start_s": start, "end_s": start + duration, "duration_s": duration,
            "step": args.get("step"), "patch": args.get("patch"), "stage": args.get("stage"),
        })
    frame = pd.DataFrame(rows, columns=["rank", "track", "name", "category", "start_s", "end_s", "duration_s",
                                        "step", "patch", "stage"])
    for column in ("step", "patch", "stage"):
        frame[column] = pd.to_numeric(frame[column])
    return frame.sort_values(["rank", "start_s"], kind="stable").reset_index(drop=True)


def breakdown_frame(results: Mapping[str, SimResult] | Iterable[SimResult]):
    """Each result's latency split into terms that add up to it, one row per result.

    `results` maps a label to a result (or is a sequence; the label is then the configuration).
    Columns: label, config, gpus, latency_s, compute_s, warmup_s, bubble_s, straggle_s, then `comm.<tier>_s` for
    every link tier any result's exposed communication crosses, then `comm.unattributed_s` where a
    result's exposed communication exceeds its per-tier split (0 otherwise). Absent terms are 0.
    """
    import pandas as pd

    items = list(results.items()) if isinstance(results, Mapping) else [(r.config, r) for r in results]
    tiers = sorted({tier for _, result in items for tier in result.comm_by_tier})
    rows = []
    for label, result in items:
        communication = result.breakdown.get("communication_s", 0.0)
        attributed = sum(result.comm_by_tier.values())
        row: dict[str, Any] = {
            "label": label, "config": result.config, "gpus": result.gpus, "latency_s": result.latency_s,
            "compute_s": result.breakdown.get("compute_s", 0.0), "warmup_s": result.breakdown.get("warmup_s", 0.0),
            "bubble_s": result.breakdown.get("bubble_s", 0.0), "straggle_s": result.breakdown.get("straggle_s", 0.0),
        }
        for tier in tiers:
            row[f"comm.{tier}_s"] = result.comm_by_tier.get(tier, 0.0)
        # Tiers cover all exposed communication up to float rounding; a real remainder is kept, not dropped.
        remainder = communication - attributed
        row["comm.unattributed_s"] = remainder if remainder > 1e-9 * max(1.0, result.latency_s) else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def plot_timeline(timelines: Mapping[str, Any], *, title: str = "Simulated per-rank timeline", path: str | None = None):
    """A Gantt chart per labelled timeline (`timeline_frame` output), stacked with a shared time axis.

    Each rank gets two rows: its compute (warmup and pipelined) and, beneath it, its communication
    track; grey marks a rank waiting for its input; odd steps are drawn lighter. Returns the matplotlib Figure (saved to `path`
    if given).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels = list(timelines)
    if not labels:
        raise DitplanError("plot_timeline: no timelines to draw.")
    heights = [max(2, 2 * (int(timelines[label]["rank"].max()) + 1)) for label in labels]
    figure = Figure(figsize=(12, 0.22 * sum(heights) + 1.2 * len(labels)), layout="constrained")
    axes_list = figure.subplots(len(labels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    for axes, label in zip(axes_list[:, 0], labels):
        frame = timelines[label]
        ranks = int(frame["rank"].max()) + 1
        # Odd steps in a lighter shade, so step (and patch-train) boundaries stay visible in long bars.
        shade = frame["step"].fillna(0).astype(int) % 2
        for (rank, track, category, odd), events in frame.groupby(["rank", "track", "category", shade]):
            row = 2 * rank + (1 if track == "communication" else 0)
            colour = (STEP_SHADES if odd else CATEGORY_COLOURS).get(category, CATEGORY_COLOURS.get(category, "tab:gray"))
            # Sends last well under a millisecond; an edge of the same colour keeps them visible as hairlines.
            axes.broken_barh(list(zip(events["start_s"], events["duration_s"])), (row - 0.4, 0.8),
                             facecolors=colour, edgecolors=colour, linewidth=0.4)
        ticks = [row for r in range(ranks) for row in (2 * r, 2 * r + 1)]
        names = [name for r in range(ranks) for name in (f"rank {r} compute", "communication")]
        axes.set_yticks(ticks, names, fontsize=7)
        axes.set_ylim(2 * ranks - 0.5, -0.5)
        end = frame.loc[frame["track"] == "compute", "end_s"].max()  # the loop's end; a last send may trail it
        axes.set_title(f"{label}: {end:.3f} s", fontsize=9, loc="left")
        axes.grid(True, axis="x", alpha=0.3)
    axes_list[-1, 0].set_xlabel("time since the denoising loop started (s)")
    present = [c for c in CATEGORY_COLOURS if any((timelines[l]["category"] == c).any() for l in labels)]
    names = {"compute": "compute (odd steps lighter)", "warmup": "synchronous warmup step (full image)",
             "communication": "communication", "waiting": "waiting for input"}
    figure.legend(handles=[Patch(color=CATEGORY_COLOURS[c], label=names[c]) for c in present],
                  loc="outside lower center", ncols=len(present), fontsize=8)
    figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_breakdown(frame: Any, *, title: str = "Where the time goes", path: str | None = None):
    """Horizontal stacked bars of a `breakdown_frame`: compute, warmup, bubbles, waiting for the slowest
    rank (profiled clusters), communication per tier.

    Returns the matplotlib Figure (saved to `path` if given).
    """
    from matplotlib.figure import Figure

    segments = [(column, column[:-2].replace("_", " "), colour) for column, colour in TERM_COLOURS.items()]
    for column in frame.columns:
        if column.startswith("comm.") and frame[column].sum() > 0:
            tier = column[len("comm."):-2]
            segments.append((column, f"exposed communication: {TIER_NAMES.get(tier, tier)}",
                             TIER_COLOURS.get(tier, "tab:gray")))
    figure = Figure(figsize=(10, 0.5 * len(frame) + 2.2), layout="constrained")
    axes = figure.subplots()
    left = [0.0] * len(frame)
    positions = list(range(len(frame)))
    for column, name, colour in segments:
        values = frame[column].tolist()
        if not any(values):
            continue
        axes.barh(positions, values, left=left, color=colour, label=name, height=0.7)
        left = [a + b for a, b in zip(left, values)]
    for position, total in zip(positions, frame["latency_s"]):
        axes.annotate(f"{total:.2f} s", (total, position), textcoords="offset points", xytext=(4, -3), fontsize=8)
    axes.set_yticks(positions, frame["label"].tolist(), fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("predicted latency of the denoising loop (s)")
    axes.set_ylabel("configuration")
    axes.set_xlim(0, max(left) * 1.15 if left else 1)
    axes.set_title(title)
    axes.grid(True, axis="x", alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize=8)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
