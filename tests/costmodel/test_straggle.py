"""Waiting for the slowest rank (costmodel.straggle): priced from a profile's straggle table at each
exchange, by the length of the compute before it; nothing without a table."""
from __future__ import annotations

import math

import pytest
import yaml
from test_profiler import synthetic_profile, write_profile

from costmodel import estimate, load_cluster, simulate

MODEL = "tiny-pixart-alpha"
SIZE = {"height": 256, "width": 256, "steps": 4}
# Fraction of a segment waited, by segment seconds: more for short segments, as measured on CPUs.
TABLE = [[0.001, 0.3], [0.01, 0.2], [0.1, 0.05]]


def _clusters(tmp_path, table=TABLE):
    plain, jittery = synthetic_profile(), synthetic_profile()
    plain["measured"].pop("straggle")
    jittery["measured"]["straggle"] = [{"ranks": 2, "points": table}]
    return (load_cluster(str(write_profile(tmp_path, plain, "plain.yaml")), gpus=2),
            load_cluster(str(write_profile(tmp_path, jittery, "jittery.yaml")), gpus=2))


def _fraction(segment_s: float, table=TABLE) -> float:
    """The table read as the model must: log-log between points, its end values outside them."""
    xs = [x for x, _ in table]
    segment_s = min(max(segment_s, xs[0]), xs[-1])
    for (x0, y0), (x1, y1) in zip(table, table[1:]):
        if x0 <= segment_s <= x1:
            weight = math.log(segment_s / x0) / math.log(x1 / x0)
            return math.exp((1 - weight) * math.log(y0) + weight * math.log(y1))
    raise AssertionError("inside the table")


def test_cfg_waits_once_per_step_for_the_table_fraction_of_its_step(tmp_path):
    plain, jittery = _clusters(tmp_path)
    before = simulate(MODEL, plain, "cfg=2", **SIZE)
    after = simulate(MODEL, jittery, "cfg=2", **SIZE)
    step_compute = before.breakdown["compute_s"] / SIZE["steps"]
    expected = step_compute * _fraction(step_compute) * SIZE["steps"]
    assert after.breakdown["straggle_s"] == pytest.approx(expected, rel=1e-9)
    assert after.latency_s == pytest.approx(before.latency_s + expected, rel=1e-9)
    assert sum(after.breakdown.values()) == pytest.approx(after.latency_s, rel=1e-9)
    assert "straggle_s" not in before.breakdown


def test_more_exchanges_per_step_wait_a_larger_share_of_the_compute(tmp_path):
    _, jittery = _clusters(tmp_path)
    share = {}
    for config in ("cfg=2", "ulysses=2", "ring=2"):
        result = simulate(MODEL, jittery, config, **SIZE)
        share[config] = result.breakdown["straggle_s"] / result.breakdown["compute_s"]
    # Ulysses waits twice per block and ring once per block (plus the step's end): shorter segments.
    assert share["cfg=2"] < share["ring=2"] < share["ulysses=2"]


def test_one_process_and_data_parallel_replicas_wait_for_no_one(tmp_path):
    _, jittery = _clusters(tmp_path)
    one = load_cluster(jittery.path, gpus=1)
    assert simulate(MODEL, one, "cfg=1", **SIZE).breakdown["straggle_s"] == 0.0
    assert simulate(MODEL, jittery, "dp=2", **SIZE).breakdown["straggle_s"] == 0.0


def test_pipefusion_waits_at_each_hand_over_and_estimate_agrees(tmp_path):
    plain, jittery = _clusters(tmp_path)
    share = {}
    for patches in (2, 4):
        config = f"pipefusion=2,patches={patches},warmup=1"
        result = simulate(MODEL, jittery, config, **SIZE)
        quick = estimate(MODEL, jittery, config, **SIZE)
        assert quick.latency_s == pytest.approx(result.latency_s, rel=0.05)
        assert sum(result.breakdown.values()) == pytest.approx(result.latency_s, rel=1e-9)
        share[patches] = result.breakdown["straggle_s"] / result.breakdown["compute_s"]
        # The warmup step runs the stages in turn: no rank waits for another's concurrent compute.
        assert result.breakdown["warmup_s"] == pytest.approx(
            simulate(MODEL, plain, config, **SIZE).breakdown["warmup_s"], rel=1e-12)
    assert share[4] > share[2] > 0  # smaller patches, shorter segments


def test_segments_outside_the_table_take_its_end_values(tmp_path):
    table = [[1.0, 0.2], [2.0, 0.1]]  # every segment here is far shorter than a second
    plain, jittery = _clusters(tmp_path, table)
    before = simulate(MODEL, plain, "cfg=2", **SIZE)
    after = simulate(MODEL, jittery, "cfg=2", **SIZE)
    assert after.breakdown["straggle_s"] == pytest.approx(0.2 * before.breakdown["compute_s"], rel=1e-9)


def test_the_straggle_table_survives_a_round_trip_through_yaml(tmp_path):
    _, jittery = _clusters(tmp_path)
    data = yaml.safe_load(open(jittery.path))
    assert data["measured"]["straggle"][0]["points"] == TABLE
    assert jittery.measured.straggle_fraction(2, 0.01) == pytest.approx(0.2)
    assert jittery.measured.straggle_fraction(8, 0.01) == pytest.approx(0.2)  # the most processes measured up to 8
