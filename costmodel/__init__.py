"""ditplan's cost model: specs of models and clusters, compute/communication/memory models, simulator.

Imports neither torch nor diffusers, so the CLI answers at once.

    from costmodel import load_model, load_cluster, simulate, check_config
    model = load_model("flux-dev")
    cluster = load_cluster("h100-sxm-nvlink-8", gpus=4)
    result = simulate(model, cluster, "ulysses=4", height=1024, width=1024, steps=28)
"""
from costmodel.config import AXES, DEFAULT_PLACEMENT, ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.rules import check_config, ensure_valid_config
from costmodel.simulate import SimResult, estimate, simulate
from costmodel.specs import ModelSpec, list_models, load_model
from costmodel.topology import Cluster, HardwareSpec, list_clusters, list_hardware, load_cluster, load_hardware


def validation_table(path: str | None = None, measured: str | None = None):
    """Published (and optionally measured) latencies vs predictions, one row per measurement (pandas)."""
    from costmodel.validation import validation_table as build

    return build(path, measured)


__all__ = [
    "AXES", "DEFAULT_PLACEMENT", "Cluster", "DitplanError", "HardwareSpec", "ModelSpec", "ParallelConfig",
    "Placement", "SimResult", "check_config", "ensure_valid_config", "estimate", "list_clusters",
    "list_hardware", "list_models", "load_cluster", "load_hardware", "load_model", "simulate", "validation_table",
]
