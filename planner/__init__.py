"""ditplan's planner: enumerate, prune, rank and explain hybrid configurations; the CLI.

Python faces for notebooks (imported on first use, so `import planner` stays cheap):
- `planner.search(model, cluster, gpus, height=..., width=..., steps=...)` -> `SearchResult`
  (`.plans` best first, `.pruned` with reasons, `.best`, `.explanation()`, `.to_frame()`, `.to_plan()`).
- `planner.pareto_front(result)` -> pandas DataFrame of the best plan per GPU count, fronts flagged.
- `planner.plot_pareto(result, path=None)` -> matplotlib Figure (latency vs GPUs and vs GPU-seconds).
- `planner.Plan`: plan files (`Plan.load(path)`, `plan.save(path)`).
"""
from __future__ import annotations

from costmodel.lazy import lazy_exports

_EXPORTS = {
    "search": "planner.ranking",
    "SearchResult": "planner.ranking",
    "RankedPlan": "planner.ranking",
    "PrunedConfig": "planner.ranking",
    "pareto_front": "planner.pareto",
    "plot_pareto": "planner.pareto",
    "Plan": "planner.plan",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
