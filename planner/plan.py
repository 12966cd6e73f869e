"""Plan files: the chosen configuration, its rank placement and its predicted figures (JSON), and
`resolve_plan`, the one reading of a plan argument (a file, a configuration text or `auto`) that
the CLI, the workers and `executor.parallelize` share.

The schema is versioned; a file of another version, with a missing or unknown key, or with a field
of the wrong type is refused with the key named.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodel import files
from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.strict import require_finite

SCHEMA = "ditplan.plan/1"
_REQUIRED = ("schema", "model", "height", "width", "frames", "steps", "cluster", "gpus", "config", "placement")
_OPTIONAL = ("ranks", "predicted", "explanation", "nodes")
SIZE_KEYS = ("height", "width", "frames", "steps")


@dataclass(frozen=True)
class Plan:
    model: str
    height: int
    width: int
    frames: int
    steps: int
    cluster: str
    gpus: int
    config: ParallelConfig
    placement: Placement
    predicted: dict[str, Any] = field(default_factory=dict)
    explanation: list[str] = field(default_factory=list)
    nodes: int | None = None  # replicas of a node-shaped cluster (`--nodes`); None: the cluster file's own count

    def __post_init__(self) -> None:
        if self.config.world_size != self.gpus:
            raise DitplanError(
                f"plan: configuration {self.config} uses {self.config.world_size} GPUs but the plan is for gpus={self.gpus}."
            )
        if self.placement.config != self.config:
            raise DitplanError("plan: the placement was built for another configuration.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "height": self.height,
            "width": self.width,
            "frames": self.frames,
            "steps": self.steps,
            "cluster": self.cluster,
            "gpus": self.gpus,
            "config": str(self.config),
            "placement": list(self.placement.order),
            "ranks": self.placement.table(),
            "predicted": self.predicted,
            "explanation": self.explanation,
            **({} if self.nodes is None else {"nodes": self.nodes}),
        }

    def to_json(self) -> str:
        """The file's text; every predicted figure must be finite (JSON has no NaN)."""
        data = self.to_dict()
        require_finite(data, "plan")
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike, flag: str = "--out") -> Path:
        """Write atomically: a failed write leaves no half-written plan behind."""
        return files.write_atomically(path, self.to_json(), flag)

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise DitplanError(f"{source}: a plan must be a JSON object.")
        if data.get("schema") != SCHEMA:
            raise DitplanError(f"{source}: schema {data.get('schema')!r} is not supported; this ditplan reads {SCHEMA!r}.")
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise DitplanError(f"{source}: missing key(s) {', '.join(missing)}; a plan needs {', '.join(_REQUIRED)}.")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise DitplanError(f"{source}: unknown key(s) {', '.join(unknown)}.")
        for key in (*SIZE_KEYS, "gpus", *(("nodes",) if "nodes" in data else ())):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise DitplanError(f"{source}: {key}={data[key]!r} must be an integer >= 1.")
        for key in ("model", "cluster", "config"):
            if not isinstance(data[key], str) or not data[key].strip():
                raise DitplanError(f"{source}: {key}={data[key]!r} must be a non-empty text.")
        if not isinstance(data["placement"], (list, str)):
            raise DitplanError(f"{source}: placement={data['placement']!r} must be a list of axis names.")
        if not isinstance(data.get("predicted", {}), dict):
            raise DitplanError(f"{source}: predicted={data['predicted']!r} must be a mapping of figures.")
        explanation = data.get("explanation", [])
        if not isinstance(explanation, list) or not all(isinstance(line, str) for line in explanation):
            raise DitplanError(f"{source}: explanation must be a list of texts.")
        require_finite(data.get("predicted", {}), source)
        config = ParallelConfig.parse(data["config"])
        placement = Placement.parse(config, data["placement"])
        if "ranks" in data and data["ranks"] != placement.table():
            raise DitplanError(f"{source}: 'ranks' does not match the placement {list(placement.order)}; the file was edited inconsistently.")
        return cls(
            model=data["model"], height=data["height"], width=data["width"], frames=data["frames"],
            steps=data["steps"], cluster=data["cluster"], gpus=data["gpus"], config=config,
            placement=placement, predicted=dict(data.get("predicted", {})),
            explanation=list(explanation), nodes=data.get("nodes"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(files.read_json(path, "plan file"), source=f"plan file {path}")


@dataclass(frozen=True)
class ResolvedPlan:
    """What a plan argument names: the configuration and placement to run, and the plan behind them
    (a plan file's, or the search's for `auto`; None for a bare configuration text)."""

    config: ParallelConfig
    placement: Placement
    plan: Plan | None = None


def is_plan_file(text: str) -> bool:
    return text.endswith(".json") or Path(text).is_file()


def resolve_plan(plan: "str | os.PathLike | Plan | ParallelConfig", *, model: str | None = None,
                 cluster: str | None = None, gpus: int | None = None, height: int | None = None,
                 width: int | None = None, frames: int | None = None, steps: int | None = None,
                 max_dp: int | None = None) -> ResolvedPlan:
    """A plan argument -> what to run.

    plan: a Plan, a ParallelConfig, the path of a plan file, a configuration text ("cfg=2,ulysses=2")
        or "auto": the planner searches `cluster` for `gpus` GPUs of `model` at the given sizes (the
        model's defaults where None), with at most `max_dp` data-parallel replicas.
    model: the model id that will run; a plan made for another model is refused.
    """
    if isinstance(plan, Plan):
        resolved = ResolvedPlan(plan.config, plan.placement, plan)
    elif isinstance(plan, ParallelConfig):
        resolved = ResolvedPlan(plan, Placement(plan))
    elif not isinstance(plan, (str, os.PathLike)):
        raise DitplanError(f"plan {plan!r}: give a plan file path, a planner.plan.Plan, a configuration text or 'auto'.")
    elif os.fspath(plan) == "auto":
        resolved = _searched_plan(model, cluster, gpus, height, width, frames, steps, max_dp)
    elif is_plan_file(os.fspath(plan)):
        loaded = Plan.load(plan)
        resolved = ResolvedPlan(loaded.config, loaded.placement, loaded)
    else:
        config = ParallelConfig.parse(os.fspath(plan))
        resolved = ResolvedPlan(config, Placement(config))
    if resolved.plan is not None and model is not None and resolved.plan.model != model:
        raise DitplanError(f"the plan was made for model {resolved.plan.model!r}, not {model!r}; "
                           f"search a plan for {model} (ditplan search --model {model} ... --out plan.json).")
    return resolved


def _searched_plan(model: str | None, cluster: str | None, gpus: int | None, height: int | None,
                   width: int | None, frames: int | None, steps: int | None, max_dp: int | None) -> ResolvedPlan:
    from planner.ranking import search

    if model is None:
        raise DitplanError("plan 'auto' needs to know the model to plan for; give a model id with a profile "
                           "(see `ditplan models`) or a configuration instead of 'auto'.")
    if cluster is None:
        raise DitplanError("plan 'auto' needs a cluster to plan for: --cluster (or cluster= in parallelize), "
                           "an id from `ditplan clusters` or a YAML path.")
    if gpus is None:
        raise DitplanError("plan 'auto' needs the number of GPUs to plan for.")
    sizes = {key: value for key, value in zip(SIZE_KEYS, (height, width, frames, steps)) if value is not None}
    chosen = search(model, cluster, gpus, max_dp=max_dp, **sizes).to_plan()
    return ResolvedPlan(chosen.config, chosen.placement, chosen)
