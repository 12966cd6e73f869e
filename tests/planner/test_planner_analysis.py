"""Comparisons across clusters and methods (planner.analysis)."""
from __future__ import annotations

import pytest

from costmodel.config import ParallelConfig, Placement
from planner.analysis import METHOD_MARKERS, best_by_method, compare_clusters, method_markers, method_of, plot_clusters
from planner.ranking import RankedPlan, SearchResult


@pytest.mark.parametrize("config, family", [
    ("cfg=1", "serial"),
    ("cfg=2", "CFG"),
    ("ulysses=8", "Ulysses"),
    ("ulysses=2,ring=2", "USP"),
    ("cfg=2,pipefusion=4", "CFG+PipeFusion"),
    ("cfg=2,ulysses=2,ring=2,pipefusion=2", "CFG+USP+PipeFusion"),
    ("pipefusion=1,patches=4", "PipeFusion"),
    ("ring=2,dp=2", "Ring+DP"),
])
def test_method_of_names_the_family(config: str, family: str) -> None:
    assert method_of(config) == family
    assert method_of(ParallelConfig.parse(config)) == family


def test_method_markers_are_distinct_and_keep_the_known_ones() -> None:
    families = ["serial", "Ulysses", "Ring+PipeFusion", "USP+PipeFusion", "PipeFusion", "Ring+PipeFusion"]
    markers = method_markers(families)
    assert list(markers) == ["serial", "Ulysses", "Ring+PipeFusion", "USP+PipeFusion", "PipeFusion"]
    assert len(set(markers.values())) == len(markers)
    assert markers["Ulysses"] == METHOD_MARKERS["Ulysses"] and markers["PipeFusion"] == METHOD_MARKERS["PipeFusion"]


def _plan(gpus: int, text: str, latency: float, scored_by: str = "simulator") -> RankedPlan:
    config = ParallelConfig.parse(text)
    return RankedPlan(gpus, config, Placement(config), latency, 10.0, {"compute_s": latency}, latency / 20, {},
                      scored_by)


def test_best_by_method_keeps_the_fastest_plan_per_family_and_flags_the_winner() -> None:
    plans = [_plan(4, "ulysses=4", 1.0), _plan(4, "ulysses=2,ring=2", 1.2), _plan(4, "pipefusion=4,warmup=0", 0.8),
             _plan(4, "pipefusion=4,warmup=1", 0.9), _plan(4, "ring=4", 0.5, scored_by="estimate"),
             _plan(2, "ring=2", 2.0)]
    plans.sort(key=RankedPlan.sort_key)
    result = SearchResult("pixart-alpha", 1024, 1024, 1, 20, "l40-pcie-8", None, [2, 4], plans, [], 4.0, True)
    frame = best_by_method(result)
    four = frame[frame["gpus"] == 4].set_index("method")
    assert sorted(four.index) == ["PipeFusion", "USP", "Ulysses"]  # the estimate-scored Ring plan does not count
    assert four.loc["PipeFusion", "latency_s"] == 0.8
    assert four["wins"].sum() == 1 and four.loc["PipeFusion", "wins"]
    assert four.loc["Ulysses", "speedup"] == pytest.approx(4.0)
    assert list(frame["gpus"]) == sorted(frame["gpus"])
    assert frame[frame["gpus"] == 2]["wins"].all()


def test_compare_clusters_gives_the_best_plan_per_count_of_each_cluster(tmp_path) -> None:
    table, searches = compare_clusters("pixart-alpha", {"l40-pcie-8": "1,2,4", "a100-sxm-nvlink-8": [1, 2]},
                                       height=1024, width=1024, steps=6)
    assert list(searches) == ["l40-pcie-8", "a100-sxm-nvlink-8"]
    assert list(zip(table["cluster"], table["gpus"])) == [
        ("l40-pcie-8", 1), ("l40-pcie-8", 2), ("l40-pcie-8", 4), ("a100-sxm-nvlink-8", 1), ("a100-sxm-nvlink-8", 2)]
    for (cluster, gpus), row in table.set_index(["cluster", "gpus"]).iterrows():
        best = searches[cluster].best_per_count[gpus]
        assert row["latency_s"] == best.latency_s
        assert row["method"] == method_of(best.config)
    assert (table.groupby("cluster")["chosen"].sum() == 1).all()

    figure = plot_clusters(table, title="pixart-alpha", path=str(tmp_path / "clusters.png"))
    assert len(figure.axes) == 2
    for axes in figure.axes:
        assert axes.get_title() and "(s)" in axes.get_ylabel() and axes.get_xlabel()
        assert axes.get_legend() is not None
    assert figure.axes[0].get_legend().get_title().get_text() == "cluster"
    assert (tmp_path / "clusters.png").stat().st_size > 10_000


def test_compare_clusters_with_one_gpu_list_for_every_cluster() -> None:
    table, _ = compare_clusters("pixart-alpha", ["l40-pcie-8", "a100-sxm-nvlink-8"], "1,2", height=1024, width=1024,
                                steps=6)
    assert sorted(table.groupby("cluster")["gpus"].apply(list).tolist()) == [[1, 2], [1, 2]]
