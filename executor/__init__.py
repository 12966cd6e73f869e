"""ditplan's executor: runs a plan for real with torch.distributed on diffusers pipelines.

`executor.parallelize(pipe, plan=...)` binds a loaded pipeline to a plan inside a torchrun job;
`python -m executor` (and `ditplan run`) launches torchrun and writes images and run.json.
Heavy imports (torch, diffusers) happen on first use of these names.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "parallelize": "executor.parallel",
    "ParallelPipeline": "executor.parallel",
    "build_tiny_pipeline": "executor.tiny",
    "save_tiny_pipeline": "executor.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
