"""planner.search on the real cost model: validity, coverage, re-simulation, ranking, plan files."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import costmodel
import planner
from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from planner import ranking
from planner.plan import Plan
from planner.space import enumerate_configs

# (model, cluster, GPUs in the cluster, heights to try); widths follow the model's aspect ratio.
SCENARIOS = [
    ("pixart-alpha", "l40-pcie-8", 8, (1024, 2048)),
    ("sd3-medium", "l40-pcie-8", 8, (1024,)),
    ("flux-dev", "h100-sxm-nvlink-8", 8, (1024, 2048)),
    ("hunyuan-dit", "a100-pcie-4", 4, (1024,)),
    ("cogvideox-2b", "h100-sxm-nvlink-8", 8, (480,)),
    ("latte", "l20-pcie-8", 8, (512,)),
    ("pixart-alpha", "l40-pcie-8x2-eth", 16, (1024,)),
]
SEARCH_SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _shape(model: str, height: int) -> dict[str, int]:
    spec = costmodel.load_model(model)
    width = spec.default_width * height // spec.default_height
    return {"height": height, "width": width, "frames": spec.default_frames, "steps": 8}


@st.composite
def searches(draw):
    model, cluster, size, heights = draw(st.sampled_from(SCENARIOS))
    gpus = draw(st.integers(min_value=1, max_value=size))
    return model, cluster, gpus, _shape(model, draw(st.sampled_from(heights)))


@given(searches())
@SEARCH_SETTINGS
def test_every_plan_validates_multiplies_to_n_and_resimulates(case):
    model, cluster_id, gpus, shape = case
    result = planner.search(model, cluster_id, gpus, **shape)
    spec = costmodel.load_model(model)
    cluster = costmodel.load_cluster(cluster_id, gpus=gpus)
    for plan in result.plans:
        assert plan.gpus == gpus == plan.config.world_size
        assert plan.config.dp * plan.config.cfg * plan.config.ulysses * plan.config.ring * plan.config.pipefusion == gpus
        assert costmodel.check_config(plan.config, spec, shape["height"], shape["width"], shape["frames"],
                                      shape["steps"], gpus) == []
        scorer = costmodel.simulate if plan.scored_by == "simulator" else costmodel.estimate
        again = scorer(spec, cluster, plan.config, placement=plan.placement, **shape)
        assert again.feasible
        assert again.latency_s == pytest.approx(plan.latency_s, rel=1e-12)
        assert again.memory_gib == pytest.approx(plan.memory_gib, rel=1e-12)


@given(searches())
@SEARCH_SETTINGS
def test_nothing_is_dropped_silently(case):
    model, cluster_id, gpus, shape = case
    result = planner.search(model, cluster_id, gpus, **shape)
    assert all(entry.reason.strip() for entry in result.pruned)
    # The search adds its choice of VAE decode ranks (vae) to each candidate of the space.
    ranked = {str(replace(plan.config, vae=1)) for plan in result.plans}
    pruned = {str(replace(ParallelConfig.parse(entry.config), vae=1)) for entry in result.pruned}
    assert not ranked & pruned
    rows = costmodel.load_model(model).token_grid(shape["height"], shape["width"], shape["frames"])[1]
    assert ranked | pruned == {str(c) for c in enumerate_configs(gpus, rows, shape["steps"])}


@given(st.sampled_from(SCENARIOS[:3]), st.integers(min_value=1, max_value=7))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_adding_gpus_to_the_range_never_worsens_the_best(scenario, top):
    model, cluster_id, _, heights = scenario
    shape = _shape(model, heights[0])
    fewer = planner.search(model, cluster_id, f"1-{top}", **shape)
    more = planner.search(model, cluster_id, f"1-{top + 1}", **shape)
    assert more.best.ranked_s <= fewer.best.ranked_s
    assert set(more.best_per_count) >= set(fewer.best_per_count)
    for count, plan in fewer.best_per_count.items():
        assert more.best_per_count[count].latency_s == plan.latency_s


def test_ranking_is_by_latency_then_gpus_then_memory():
    result = planner.search("pixart-alpha", "l40-pcie-8", "1-8", height=1024, width=1024, steps=20)
    keys = [plan.sort_key() for plan in result.plans]
    assert keys == sorted(keys)
    assert result.best is result.plans[0]
    assert result.best.latency_s == min(plan.latency_s for plan in result.plans)
    assert list(result.best_per_count) == list(range(1, 9))


def test_explanation_names_runner_up_and_best_pure_method_with_terms():
    result = planner.search("pixart-alpha", "l40-pcie-8", 8, height=2048, width=2048, steps=20)
    comparisons = result.comparisons()
    roles = [c.role for c in comparisons]
    assert roles[0] == "runner-up" and roles[1].startswith("best pure ")
    runner_up = comparisons[0].other
    assert (runner_up.gpus, runner_up.config) != (result.best.gpus, result.best.config)
    for comparison in comparisons:
        for difference in comparison.differences:
            assert difference.line().startswith(difference.term)
    lines = result.explanation()
    assert lines[0].startswith("winner ")
    assert any(line.startswith("vs runner-up") for line in lines)


def test_plan_file_round_trip(tmp_path):
    result = planner.search("flux-dev", "h100-sxm-nvlink-8", 4, height=1024, width=1024, steps=28)
    path = result.to_plan().save(tmp_path / "plan.json")
    plan = Plan.load(path)
    assert plan.config == result.best.config
    assert plan.placement == result.best.placement
    assert plan.gpus == 4 and plan.model == "flux-dev" and plan.steps == 28
    assert plan.predicted["latency_s"] == result.best.latency_s
    assert sum(plan.predicted["breakdown"].values()) == pytest.approx(plan.predicted["latency_s"])
    assert plan.explanation == result.explanation()


def test_large_space_prescreens_with_the_estimate_and_rescores_the_top(monkeypatch):
    monkeypatch.setattr(ranking, "EXHAUSTIVE_LIMIT", 20)
    result = planner.search("pixart-alpha", "l40-pcie-8", 8, height=1024, width=1024, steps=20, rescore=5)
    scored = [plan.scored_by for plan in result.plans]
    simulated = scored.count("simulator")
    assert 5 <= simulated <= 5 + len(ranking.PURE_AXES)
    assert scored == sorted(scored, key=lambda s: s != "simulator")  # simulator figures rank first
    assert result.best.scored_by == "simulator"
    exhaustive = planner.search("pixart-alpha", "l40-pcie-8", 8, height=1024, width=1024, steps=20, exhaustive=True)
    assert all(plan.scored_by == "simulator" for plan in exhaustive.plans)
    assert {str(p.config) for p in result.plans} == {str(p.config) for p in exhaustive.plans}


def test_multi_node_search_keeps_one_placement_per_shape(tmp_path):
    result = planner.search("flux-dev", "h100-sxm-nvlink-8", 16, nodes=2, height=1024, width=1024, steps=28)
    best = result.best
    assert best.gpus == 16 and best.scored_by == "simulator"
    plan = Plan.load(result.to_plan().save(tmp_path / "plan.json"))
    assert plan.nodes == 2 and plan.gpus == 16
    # Within one configuration no two placements have the same figures.
    seen = set()
    for plan in result.plans:
        key = (str(plan.config), plan.latency_s, plan.memory_gib)
        assert key not in seen
        seen.add(key)


def test_no_configuration_fits_says_why_per_axis():
    result = planner.search("flux-dev", "t4-pcie-4", 3)
    assert result.plans == []
    with pytest.raises(DitplanError) as raised:
        result.best
    message = str(raised.value)
    for axis in ("ulysses=3", "ring=3", "pipefusion=3", "cfg=3", "dp=3"):
        assert axis in message
    assert "GiB" in message  # out-of-memory reasons carry their figures


def test_generation_that_no_configuration_can_run_is_refused():
    with pytest.raises(DitplanError, match="not a multiple of 16"):
        planner.search("pixart-alpha", "l40-pcie-8", 8, height=1000)


def test_out_of_memory_configurations_are_pruned_with_figures():
    result = planner.search("flux-dev", "t4-pcie-4", 2, height=1024, width=1024, steps=28)
    memory = [entry for entry in result.pruned if "GiB" in entry.reason]
    assert memory, "flux-dev (24 GB of bf16 weights) does not fit 16 GB T4s"
    for entry in memory:
        config = ParallelConfig.parse(entry.config)
        simulated = costmodel.simulate("flux-dev", costmodel.load_cluster("t4-pcie-4", gpus=2), config,
                                       height=1024, width=1024, steps=28, placement=Placement(config))
        assert not simulated.feasible and simulated.reason == entry.reason


def test_progress_bar_only_on_a_terminal_for_long_searches(capsys, monkeypatch):
    assert ranking._progress(10 * ranking.PROGRESS_MIN_CANDIDATES, None, "x") is None  # stderr is not a terminal here
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert ranking._progress(10, None, "x") is None  # short search: no bar even on a terminal
    bar = ranking._progress(10 * ranking.PROGRESS_MIN_CANDIDATES, None, "x")
    assert bar is not None
    bar.close()
    monkeypatch.undo()
    planner.search("pixart-alpha", "l40-pcie-8", 4, height=1024, width=1024, steps=20, progress=True)
    captured = capsys.readouterr()
    assert "search 4 GPUs" in captured.err and captured.out == ""


def test_fidelity_floor_prunes_plans_with_less_warmup_and_says_so():
    result = planner.search("pixart-alpha", "l40-pcie-8", 8, height=1024, width=1024, steps=20)  # default floor: 1
    assert all(plan.config.warmup >= 1 for plan in result.plans if plan.config.uses_patches)
    floor = [entry for entry in result.pruned if "fidelity floor" in entry.reason]
    assert floor and all(ParallelConfig.parse(entry.config).warmup == 0 for entry in floor)
    unconstrained = planner.search("pixart-alpha", "l40-pcie-8", 8, height=1024, width=1024, steps=20, min_warmup=0)
    assert unconstrained.best.latency_s <= result.best.latency_s
    # On 8 L40s PipeFusion without warmup is the fastest pixart plan (PipeFusion Table 3); the
    # explanation then says what skipping the warmup costs in quality.
    assert unconstrained.best.config.warmup == 0 and unconstrained.best.config.uses_patches
    assert any("warmup=0 (allowed by --min-warmup 0)" in line for line in unconstrained.explanation())
    with pytest.raises(DitplanError, match="min_warmup=-1"):
        planner.search("pixart-alpha", "l40-pcie-8", 8, min_warmup=-1)
