"""Orders the planner treats as one placement really cost the same in the cost model.

For several clusters and hybrid configurations, every one of the 120 axis orders is simulated;
orders that share a signature (same groups, or same shape on the cluster's hierarchy) must give
identical figures, and the placements the search keeps must cover every distinct figure.
"""
from __future__ import annotations

import itertools

import pytest

import costmodel
from costmodel.config import AXES, ParallelConfig, Placement
from planner.ranking import cluster_hierarchy
from planner.space import distinct_placements, full_order, nontrivial_axes

CASES = [
    # (model, cluster, nodes, gpus, height, config)
    ("pixart-alpha", "l40-pcie-8", None, 8, 1024, "cfg=2,ring=2,pipefusion=2"),
    ("pixart-alpha", "l40-pcie-8", None, 8, 1024, "cfg=2,ulysses=2,ring=2"),
    ("sd3-medium", "l40-pcie-8", None, 4, 1024, "ulysses=2,pipefusion=2,patches=4,warmup=0"),
    ("flux-dev", "h100-sxm-nvlink-8", 2, 16, 1024, "ulysses=2,ring=2,pipefusion=2,dp=2"),
    ("flux-dev", "h100-sxm-nvlink-8", 4, 32, 2048, "ulysses=4,ring=2,pipefusion=4"),
    ("pixart-alpha", "l40-pcie-8x2-eth", None, 16, 2048, "cfg=2,ring=2,pipefusion=4"),
    ("hunyuan-dit", "v100-nvlink-8", None, 8, 1024, "cfg=2,ulysses=2,pipefusion=2"),
    ("cogvideox-2b", "a100-pcie-4", None, 4, 480, "cfg=2,ulysses=2"),
]


@pytest.mark.parametrize("model, cluster_id, nodes, gpus, height, text", CASES)
def test_orders_with_one_signature_cost_the_same(model, cluster_id, nodes, gpus, height, text):
    spec = costmodel.load_model(model)
    cluster = costmodel.load_cluster(cluster_id, gpus=gpus, nodes=nodes)
    config = ParallelConfig.parse(text)
    width = height if spec.default_width == spec.default_height else spec.default_width * height // spec.default_height
    frames = spec.default_frames
    assert costmodel.check_config(config, spec, height, width, frames, 8, gpus) == []
    hierarchy = cluster_hierarchy(cluster)
    axes = nontrivial_axes(config)
    by_signature: dict[tuple, set[tuple[float, float]]] = {}
    figures_seen: set[tuple[float, float]] = set()
    for order in itertools.permutations(AXES):
        inner = tuple(axis for axis in order if axis in axes)
        signature = hierarchy.signature(config, inner) if hierarchy is not None else None
        if signature is None:
            strides = Placement(config, full_order(config, inner)).strides
            signature = tuple((axis, strides[axis]) for axis in axes)
        result = costmodel.simulate(spec, cluster, config, height=height, width=width, frames=frames, steps=8,
                                    placement=Placement(config, order))
        figures = (round(result.latency_s, 12), round(result.memory_gib, 12))
        by_signature.setdefault(signature, set()).add(figures)
        figures_seen.add(figures)
    for signature, figures in by_signature.items():
        assert len(figures) == 1, f"orders with signature {signature} differ: {sorted(figures)}"
    kept = set()
    for placement in distinct_placements(config, hierarchy):
        result = costmodel.simulate(spec, cluster, config, height=height, width=width, frames=frames, steps=8,
                                    placement=placement)
        kept.add((round(result.latency_s, 12), round(result.memory_gib, 12)))
    assert kept == figures_seen
