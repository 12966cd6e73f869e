"""Explanations and Pareto fronts on hand-made results (no cost model involved)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest

from costmodel.config import ParallelConfig, Placement
from planner.explain import compare, plan_terms
from planner.pareto import pareto_front, plot_pareto
from planner.ranking import RankedPlan, SearchResult


def _plan(gpus, text, latency, memory=10.0, breakdown=None, tiers=None, order=None):
    config = ParallelConfig.parse(text)
    placement = Placement(config) if order is None else Placement(config, order)
    return RankedPlan(gpus, config, placement, latency, memory, breakdown or {"compute_s": latency},
                      latency / 20, tiers or {})


def _result(plans, baseline=8.0):
    plans = sorted(plans, key=RankedPlan.sort_key)
    return SearchResult("pixart-alpha", 1024, 1024, 1, 20, "l40-pcie-8", None,
                        sorted({p.gpus for p in plans}), plans, [], baseline, True)


def test_plan_terms_split_communication_by_tier_and_still_add_up():
    plan = _plan(8, "pipefusion=8", 1.0, breakdown={"compute_s": 0.7, "communication_s": 0.2, "bubble_s": 0.1},
                 tiers={"pcie-switch": 0.05, "socket": 0.1})
    terms = plan_terms(plan)
    assert terms["exposed communication on socket"] == pytest.approx(0.1)
    assert terms["other communication"] == pytest.approx(0.05)
    assert "communication" not in terms
    assert sum(terms.values()) == pytest.approx(plan.latency_s)


def test_compare_names_only_the_terms_that_differ_largest_first():
    winner = _plan(8, "cfg=2,pipefusion=4", 1.0, breakdown={"compute_s": 0.8, "communication_s": 0.1, "bubble_s": 0.1},
                   tiers={"socket": 0.1})
    other = _plan(8, "ulysses=8", 3.0, breakdown={"compute_s": 0.8, "communication_s": 2.2, "bubble_s": 0.0},
                  tiers={"socket": 2.0, "pcie-switch": 0.2})
    comparison = compare("runner-up", winner, other)
    terms = [d.term for d in comparison.differences]
    assert terms[0] == "exposed communication on socket"
    assert "compute" not in terms  # equal compute is not worth a line
    assert "bubble" in terms and "exposed communication on pcie-switch" in terms
    lines = comparison.lines()
    assert lines[0].startswith("vs runner-up ulysses=8") or "ulysses=8" in lines[0]
    assert any("(-1.900 s)" in line for line in lines)


def test_explanation_compares_with_runner_up_and_best_pure_method():
    plans = [
        _plan(8, "cfg=2,pipefusion=4", 1.0),
        _plan(8, "cfg=2,ring=4", 1.1),
        _plan(8, "pipefusion=8", 1.2),
        _plan(8, "ulysses=8", 5.0),
    ]
    result = _result(plans)
    roles = [c.role for c in result.comparisons()]
    assert roles == ["runner-up", "best pure pipefusion"]
    assert result.comparisons()[0].other.config == ParallelConfig(cfg=2, ring=4)
    payload = result.to_dict()
    assert [c["role"] for c in payload["explanation"]["comparisons"]] == roles
    assert payload["plans"][0]["config"] == str(ParallelConfig(cfg=2, pipefusion=4))
    assert payload["plans"][0]["speedup"] == pytest.approx(8.0)
    assert any("fidelity" in line for line in result.explanation())


def test_runner_up_that_is_the_best_pure_method_is_compared_once():
    result = _result([_plan(8, "cfg=2,pipefusion=4", 1.0), _plan(8, "pipefusion=8", 1.2), _plan(8, "ring=8", 3.0)])
    assert [c.role for c in result.comparisons()] == ["runner-up (also the best pure pipefusion)"]


def test_pure_winner_is_compared_with_another_method():
    result = _result([_plan(4, "ulysses=4", 1.0), _plan(4, "ulysses=2,ring=2", 1.1), _plan(4, "ring=4", 1.3)])
    assert result.best_pure().config == ParallelConfig(ring=4)


def test_pareto_front_flags_and_plot(tmp_path):
    plans = [
        _plan(1, "cfg=1", 8.0),
        _plan(2, "cfg=2", 4.2),
        _plan(4, "cfg=2,pipefusion=2", 2.5),
        _plan(8, "cfg=2,pipefusion=4", 1.3),
        _plan(16, "cfg=2,pipefusion=4,dp=2", 1.3),  # no faster than 8 GPUs: off the latency-vs-GPUs front
    ]
    result = _result(plans)
    frame = pareto_front(result)
    assert list(frame["gpus"]) == [1, 2, 4, 8, 16]
    assert list(frame["front_latency_vs_gpus"]) == [True, True, True, True, False]
    # GPU-seconds per image: 8, 8.4, 10, 10.4, 10.4 (dp=2 makes two images): 16 GPUs ties 8 on both axes.
    assert frame.loc[frame["gpus"] == 16, "gpu_seconds_per_image"].item() == pytest.approx(10.4)
    assert list(frame["front_latency_vs_gpu_seconds"]) == [True, True, True, True, True]
    assert frame["chosen"].sum() == 1 and frame.loc[frame["chosen"], "gpus"].item() == 8
    figure = plot_pareto(result, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    labels = [axes.get_xlabel() for axes in figure.axes]
    assert labels == ["GPUs", "GPU-seconds per image (s)"]
    assert all(axes.get_ylabel() == "predicted latency (s)" for axes in figure.axes)
    texts = [t.get_text() for axes in figure.axes for t in axes.texts]
    assert any(text.startswith("cfg=2,pipefusion=4") for text in texts)
