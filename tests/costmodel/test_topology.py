"""Communication on the topology: tiers, shared links, and measured tables taking precedence."""
from __future__ import annotations

import pytest
import yaml

from costmodel import load_cluster, load_model, simulate
from costmodel.topology import CLUSTERS_DIR


def test_l40_tiers_follow_switches_and_sockets():
    cluster = load_cluster("l40-pcie-8")
    assert cluster.tier_between(0, 1) == "pcie"  # same PCIe switch
    assert [link.tier for _, link in cluster.route(0, 2)] == ["pcie", "bridge", "bridge", "pcie"]  # via the root complex
    assert "socket" in {link.tier for _, link in cluster.route(0, 4)}  # across the inter-socket link
    fast = cluster.with_link_scaled("pcie", 4.0).with_link_scaled("bridge", 4.0)
    assert fast.tier_between(0, 4) == "socket"  # which bounds it behind fast PCIe
    two = load_cluster("l40-pcie-8x2-eth")
    assert two.tier_between(0, 8) == "network"


def test_without_peer_to_peer_traffic_goes_through_the_cpu():
    staged = load_cluster("rtx4090-pcie-8")
    assert any(edge[2].startswith("cpu") for edge, _ in staged.route(0, 1))
    direct = load_cluster("l40-pcie-8")
    assert not any(edge[2].startswith("cpu") for edge, _ in direct.route(0, 1))


def test_groups_crossing_one_link_share_it():
    # With fast PCIe the socket link is the bottleneck.
    cluster = load_cluster("l40-pcie-8").with_link_scaled("pcie", 4.0).with_link_scaled("bridge", 4.0)
    nbytes = 64e6
    one_pair, tier = cluster.comm_time("p2p", ((0, 4),), nbytes)
    four_pairs, _ = cluster.comm_time("p2p", ((0, 4), (1, 5), (2, 6), (3, 7)), nbytes)
    assert tier == "socket"
    fixed = cluster.pattern_cost("p2p", ((0, 4),))[1]
    assert four_pairs - fixed == pytest.approx(4 * (one_pair - fixed))


def test_slowest_tier_bounds_a_collective():
    cluster = load_cluster("l40-pcie-8")
    inside, tier_inside = cluster.comm_time("all_to_all", ((0, 1, 2, 3),), 32e6)
    across, tier_across = cluster.comm_time("all_to_all", ((0, 1, 4, 5),), 32e6)
    assert (tier_inside, tier_across) == ("bridge", "socket")  # across the switches, then the sockets
    assert across > 3 * inside
    nvlink, tier = load_cluster("h100-sxm-nvlink-8").comm_time("all_to_all", ((0, 1, 4, 5),), 32e6)
    assert tier == "nvlink" and nvlink < inside / 5


def _profiled(tmp_path, measured: dict):
    data = yaml.safe_load((CLUSTERS_DIR / "l40-pcie-8.yaml").read_text())
    data["id"] = "this-machine"
    data["measured"] = measured
    path = tmp_path / "this-machine.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_measured_tables_take_precedence_and_interpolate(tmp_path):
    path = _profiled(tmp_path, {
        "source": "hand-written test table",
        "communication": [{"pattern": "all_to_all", "ranks": 2, "points": [[1e6, 0.001], [1e8, 0.1]]}],
        "compute": [{"kind": "cross", "hidden_size": 1152, "points": [[1024, 0.002], [16384, 0.032]]}],
    })
    cluster = load_cluster(path, gpus=2)
    seconds, tier = cluster.comm_time("all_to_all", ((0, 1),), 1e7)
    assert tier == "measured" and seconds == pytest.approx(0.01)  # log-log between the two points
    modelled, _ = load_cluster("l40-pcie-8", gpus=2).comm_time("all_to_all", ((0, 1),), 1e7)
    assert modelled != pytest.approx(0.01)
    # Compute: PixArt's 28 cross blocks at 2 x 4096 rows take 28 x 0.016 s per step from the table.
    serial = simulate("pixart-alpha", load_cluster(path, gpus=1), "cfg=1", height=1024, width=1024, steps=10)
    host = serial.breakdown["compute_s"] / 10 - 28 * 0.016
    assert 0 <= host < 0.002


def test_measured_table_schema_is_strict(tmp_path):
    from costmodel import DitplanError

    path = _profiled(tmp_path, {"source": "x", "communication": [{"pattern": "broadcast", "ranks": 2, "points": [[1, 1]]}]})
    with pytest.raises(DitplanError, match="'broadcast'"):
        load_cluster(path)
    path = _profiled(tmp_path, {"source": "x", "compute": [{"kind": "cross", "hidden_size": 64, "points": [[1, -1]]}]})
    with pytest.raises(DitplanError, match="positive numbers"):
        load_cluster(path)


def test_models_compute_heavier_blocks_slower():
    cluster = load_cluster("h100-sxm-nvlink-8", gpus=1)
    flux = simulate(load_model("flux-dev"), cluster, "cfg=1", height=1024, width=1024, steps=1).latency_s
    pixart = simulate(load_model("pixart-alpha"), cluster, "cfg=1", height=1024, width=1024, steps=1).latency_s
    assert flux > 3 * pixart
