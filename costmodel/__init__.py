"""ditplan's cost model: specs of models and clusters, compute/communication/memory models, simulator.

Imports neither torch nor diffusers, so the CLI answers at once.
"""
from costmodel.config import AXES, DEFAULT_PLACEMENT, ParallelConfig, Placement
from costmodel.errors import DitplanError

__all__ = ["AXES", "DEFAULT_PLACEMENT", "DitplanError", "ParallelConfig", "Placement"]
