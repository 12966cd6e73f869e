"""Tables and figures over simulator results (costmodel.analysis)."""
from __future__ import annotations

import math

import pytest

from costmodel import DitplanError, ParallelConfig, simulate
from costmodel.analysis import (
    breakdown_frame,
    plot_breakdown,
    plot_timeline,
    scaled_config,
    sweep,
    timeline_frame,
)

CASE = dict(height=1024, width=1024, steps=6)


def test_sweep_keeps_input_order_and_a_broken_configuration_with_its_reason() -> None:
    frame = sweep("pixart-alpha", "l40-pcie-8", ["ulysses=2", "ulysses=3", "pipefusion=2,warmup=0"], **CASE)
    assert list(frame["gpus"]) == [2, 3, 2]
    broken = frame.iloc[1]
    assert math.isnan(broken["latency_s"]) and not broken["feasible"]
    assert "ulysses=3" in broken["reason"] and "heads" in broken["reason"]
    for _, row in frame.drop(index=1).iterrows():
        terms = sum(row[c] for c in frame.columns if c.startswith("breakdown."))
        assert terms == pytest.approx(row["latency_s"], rel=1e-9)
        assert row["text_encode_s"] > 0 and row["vae_decode_s"] > 0


def test_timeline_needs_a_traced_result() -> None:
    with pytest.raises(DitplanError, match="trace=True"):
        timeline_frame(simulate("pixart-alpha", "l40-pcie-8", "ulysses=2", **CASE))


def test_timeline_of_a_pipeline_covers_every_rank_and_ends_at_the_latency() -> None:
    result = simulate("pixart-alpha", "l40-pcie-8", "pipefusion=4,patches=4,warmup=2", trace=True, **CASE)
    frame = timeline_frame(result)
    assert sorted(frame["rank"].unique()) == [0, 1, 2, 3]
    assert set(frame["track"]) <= {"compute", "communication"}
    # The loop ends with the last patch's compute; only the last stage's send back of it may trail.
    assert frame[frame["track"] == "compute"]["end_s"].max() == pytest.approx(result.latency_s, rel=1e-9)
    assert (frame["duration_s"] >= 0).all()
    warmup = frame[frame["category"] == "warmup"]
    assert sorted(warmup["step"].unique()) == [0, 1]  # the two synchronous steps, every stage
    patches = frame[(frame["category"] == "compute") & (frame["rank"] == 0)]
    assert len(patches) == 4 * (CASE["steps"] - 2)  # every patch of every pipelined step on stage 0
    assert frame.groupby("rank")["start_s"].apply(lambda s: s.is_monotonic_increasing).all()


def test_timeline_of_sequence_parallelism_has_one_compute_event_per_step_and_rank() -> None:
    frame = timeline_frame(simulate("pixart-alpha", "l40-pcie-8", "ulysses=2", trace=True, **CASE))
    compute = frame[frame["category"] == "compute"]
    assert len(compute) == 2 * CASE["steps"]
    assert (frame["category"] == "communication").any()


@pytest.mark.parametrize("config", ["ulysses=8", "ring=4,cfg=2", "pipefusion=8,warmup=1", "cfg=2,pipefusion=2,ulysses=2"])
def test_breakdown_terms_add_up_to_the_latency(config: str) -> None:
    result = simulate("pixart-alpha", "l40-pcie-8", config, **CASE)
    row = breakdown_frame([result]).iloc[0]
    terms = ["compute_s", "warmup_s", "bubble_s"] + [c for c in row.index if c.startswith("comm.")]
    assert sum(row[t] for t in terms) == pytest.approx(result.latency_s, rel=1e-9)
    assert row["label"] == result.config


def test_breakdown_splits_communication_by_tier_with_labels() -> None:
    results = {"u8": simulate("pixart-alpha", "l40-pcie-8", "ulysses=8", **CASE),
               "serial": simulate("pixart-alpha", "l40-pcie-8", "cfg=1", **CASE)}
    frame = breakdown_frame(results).set_index("label")
    assert frame.loc["u8", "comm.socket_s"] > 0  # Ulysses over 8 L40s crosses the CPU sockets
    tier_columns = [c for c in frame.columns if c.startswith("comm.")]
    assert all(frame.loc["serial", c] == 0 for c in tier_columns)


def test_scaled_config_halves_the_largest_degree_last_axis_first() -> None:
    assert scaled_config("ulysses=2,ring=2", 2) == ParallelConfig(ulysses=2)
    assert scaled_config("cfg=2,pipefusion=4,warmup=0", 4) == ParallelConfig(cfg=2, pipefusion=2, warmup=0)
    assert scaled_config("cfg=2,pipefusion=4", 2) == ParallelConfig(cfg=2)
    assert scaled_config("ring=8", 8) == ParallelConfig(ring=8)
    assert scaled_config("pipefusion=2,patches=8", 1) == ParallelConfig(patches=8)  # explicit patches are kept
    with pytest.raises(DitplanError, match="power of two"):
        scaled_config("ring=8", 3)


def test_plots_have_titles_labelled_axes_and_legends(tmp_path) -> None:
    results = {label: simulate("pixart-alpha", "l40-pcie-8", config, trace=True, **CASE)
               for label, config in (("Ring 2", "ring=2"), ("PipeFusion 2", "pipefusion=2,patches=4,warmup=1"))}
    timeline = plot_timeline({label: timeline_frame(r) for label, r in results.items()}, title="timelines",
                             path=str(tmp_path / "timeline.png"))
    breakdown = plot_breakdown(breakdown_frame(results), title="breakdown", path=str(tmp_path / "breakdown.png"))
    for figure in (timeline, breakdown):
        assert figure.legends, "a figure legend names the colours"
        for axes in figure.axes:
            assert axes.get_title() or axes.get_title(loc="left")
            assert axes.get_ylabel() or axes.get_yticklabels()
        assert "(s)" in figure.axes[-1].get_xlabel()
    assert len(timeline.axes) == 2
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    assert (tmp_path / "breakdown.png").stat().st_size > 10_000
