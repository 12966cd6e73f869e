"""`ditplan profile --nnodes`: the link between nodes becomes the network tier of a multi-node
profile, whose figures reproduce the measured fits under the cost model's own routing."""
from __future__ import annotations

import pytest

from costmodel import load_cluster
from costmodel.profiler.fit import LinearFit, fit_latency_and_bulk
from costmodel.profiler.profile_file import build_profile, network_link, write_atomically
from test_profiler import synthetic_profile

SIZES = [4096 * 4**e for e in range(8)]
P2P_BETWEEN = LinearFit(300e-6, 0.06, 0.0)
ALLTOALL_BETWEEN = LinearFit(300e-6, 0.11, 0.0)


def test_bulk_fit_keeps_the_bulk_rate_where_mid_sizes_ride_a_burst():
    # 60 MB/s in bulk; up to 256 KiB the token bucket's burst lets messages pass at 200 MB/s.
    seconds = [200e-6 + s / (200e6 if s <= 2**18 else 60e6) for s in SIZES]
    result = fit_latency_and_bulk(SIZES, seconds)
    assert result.bandwidth_gbs == pytest.approx(0.06, rel=0.02)
    assert result.seconds(SIZES[0]) == pytest.approx(seconds[0], rel=1e-6)  # the latency-bound end
    for size, time in zip(SIZES, seconds):
        if size >= 2**20:
            assert result.seconds(size) == pytest.approx(time, rel=0.02)


def two_node_profile(tmp_path, gpus_per_node=1):
    single = synthetic_profile()
    arguments = dict(profile_id="synthetic-2", machine=single["measured"]["machine"], memory_gb=8.0, l2_cache_mb=1.0,
                     host_op_us=5.0, gemm=single["measured"]["operations"]["gemm"]["points"],
                     attention={entry["head_dim"]: entry["points"] for entry in single["measured"]["operations"]["attention"]},
                     elementwise=single["measured"]["operations"]["elementwise"]["points"],
                     activation=single["measured"]["operations"]["activation"]["points"],
                     communication={(p, 2): [[s, 1e-4 + s / 2e9] for s in SIZES] for p in ("p2p", "all_to_all", "all_gather")},
                     fits={("p2p", 2): LinearFit(1e-4, 2.0, 0.0), ("all_to_all", 2): LinearFit(1e-4, 2.0, 0.0)},
                     backend="gloo")
    profile = build_profile(**arguments, nodes=2, network_fits={"p2p": P2P_BETWEEN, "all_to_all": ALLTOALL_BETWEEN},
                            gpus_per_node=gpus_per_node)
    return profile, write_atomically(tmp_path / "two-node.yaml", profile)


def test_two_node_profile_loads_with_the_link_as_network_tier(tmp_path):
    profile, path = two_node_profile(tmp_path)
    assert "communication" not in profile["measured"]  # rank-count tables would also price cross-node groups
    cluster = load_cluster(str(path))
    assert cluster.nodes == 2 and cluster.gpus_per_node == 1 and cluster.gpus == 2
    assert cluster.tier_between(0, 1) == "network"
    for nbytes in (2**20, 2**24):
        # The fits are reproduced by the cost model's routing (4 pcie hops + 2 network hops).
        p2p, tier = cluster.comm_time("p2p", ((0, 1),), nbytes)
        assert tier == "network" and p2p == pytest.approx(P2P_BETWEEN.seconds(nbytes), rel=0.01)
        alltoall, _ = cluster.comm_time("all_to_all", ((0, 1),), nbytes)
        assert alltoall == pytest.approx(nbytes / (ALLTOALL_BETWEEN.bandwidth_gbs * 1e9), rel=0.05)


def test_gpus_per_node_sets_the_node_shape(tmp_path):
    _, path = two_node_profile(tmp_path, gpus_per_node=2)
    cluster = load_cluster(str(path))
    assert cluster.gpus == 4 and cluster.tier_between(0, 1) == "pcie" and cluster.tier_between(1, 2) == "network"


def test_network_latency_is_what_the_route_leaves_after_the_pcie_hops():
    link = network_link({"p2p": LinearFit(500e-6, 0.1, 0.0)}, pcie_latency_us=50.0, backend="gloo")
    assert link["latency_us"] == pytest.approx((500 - 4 * 50) / 2)
    assert link["bandwidth_gbs"] == pytest.approx(0.1) and link["alltoall_efficiency"] == 1.0
