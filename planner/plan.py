"""Plan files: the chosen configuration, its rank placement and its predicted figures (JSON).

The executor reads them (`executor.parallelize(pipe, plan="plan.json")`). The schema is versioned;
a file of another version, or with a missing or unknown key, is refused with the key named.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError

SCHEMA = "ditplan.plan/1"
_REQUIRED = ("schema", "model", "height", "width", "frames", "steps", "cluster", "gpus", "config", "placement")
_OPTIONAL = ("ranks", "predicted", "explanation", "nodes")


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

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a failed write leaves no half-written plan behind."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.to_dict(), handle, indent=2)
                handle.write("\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

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
        for key in ("height", "width", "frames", "steps", "gpus", *(("nodes",) if "nodes" in data else ())):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise DitplanError(f"{source}: {key}={data[key]!r} must be an integer >= 1.")
        config = ParallelConfig.parse(data["config"])
        placement = Placement.parse(config, data["placement"])
        if "ranks" in data and data["ranks"] != placement.table():
            raise DitplanError(f"{source}: 'ranks' does not match the placement {list(placement.order)}; the file was edited inconsistently.")
        return cls(
            model=str(data["model"]), height=data["height"], width=data["width"], frames=data["frames"],
            steps=data["steps"], cluster=str(data["cluster"]), gpus=data["gpus"], config=config,
            placement=placement, predicted=dict(data.get("predicted") or {}),
            explanation=list(data.get("explanation") or []), nodes=data.get("nodes"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise DitplanError(f"plan file {path}: cannot read it ({error.strerror}).") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DitplanError(f"plan file {path}: not valid JSON ({error.msg} at line {error.lineno}).") from None
        return cls.from_dict(data, source=f"plan file {path}")
