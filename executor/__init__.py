"""ditplan's executor: runs a plan for real with torch.distributed on diffusers pipelines.

`executor.parallelize(pipe, plan=...)` binds a loaded pipeline to a plan inside a torchrun job;
`python -m executor` (and `ditplan run`) launches torchrun and writes images and run.json.
Heavy imports (torch, diffusers) happen on first use of these names, or at once when
DITPLAN_COMM_TRACE asks for the communication calls to be recorded (executor.comm_trace).
"""
from __future__ import annotations

import os

from costmodel.lazy import lazy_exports

if os.environ.get("DITPLAN_COMM_TRACE"):
    from executor.comm_trace import install_from_environment

    install_from_environment()

_EXPORTS = {
    "parallelize": "executor.parallel",
    "ParallelPipeline": "executor.parallel",
    "build_tiny_pipeline": "executor.tiny",
    "save_tiny_pipeline": "executor.tiny",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
