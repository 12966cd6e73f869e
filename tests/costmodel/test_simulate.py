"""The simulator: API, properties (hypothesis), PipeFusion, memory, traces, estimate, no torch."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from costmodel import ParallelConfig, Placement, check_config, estimate, load_cluster, load_model, simulate

MODELS = ["pixart-alpha", "sd3-medium", "flux-dev", "hunyuan-dit", "cogvideox-2b", "latte"]
CLUSTERS = ["l40-pcie-8", "h100-sxm-nvlink-8", "rtx4090-pcie-8", "a100-sxm-nvlink-8", "l40-pcie-8x2-eth"]
SHAPES = {"pixart-alpha": (1024, 1024, 1, 20), "sd3-medium": (1024, 1024, 1, 28), "flux-dev": (1024, 1024, 1, 28),
          "hunyuan-dit": (1024, 1024, 1, 50), "cogvideox-2b": (480, 720, 49, 50), "latte": (512, 512, 16, 50)}
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    model = draw(st.sampled_from(MODELS))
    cluster = draw(st.sampled_from(CLUSTERS))
    gpus = draw(st.sampled_from([1, 2, 4, 8, 16] if cluster.endswith("x2-eth") else [1, 2, 4, 8]))
    degrees = {}
    remaining = gpus
    for axis in ("cfg", "ulysses", "ring", "pipefusion"):
        options = [d for d in (1, 2, 4, 8) if remaining % d == 0 and (axis != "cfg" or d <= 2)]
        degrees[axis] = draw(st.sampled_from(options))
        remaining //= degrees[axis]
    degrees["dp"] = remaining
    p = degrees["pipefusion"]
    patches = draw(st.sampled_from([p, 2 * p])) if p > 1 else 1
    warmup = draw(st.integers(0, 2))
    config = ParallelConfig(patches=patches, warmup=warmup, **degrees)
    height, width, frames, steps = SHAPES[model]
    assume(not check_config(config, model, height, width, frames, steps, gpus))
    return model, cluster, gpus, config, (height, width, frames, steps)


def run(model, cluster, gpus, config, shape, **extra):
    height, width, frames, steps = shape
    return simulate(model, load_cluster(cluster, gpus=gpus), config, height=height, width=width, frames=frames,
                    steps=steps, **extra)


@PROPERTY
@given(cases())
def test_latency_positive_finite_and_breakdown_sums(case):
    result = run(*case)
    assert math.isfinite(result.latency_s) and result.latency_s > 0
    assert math.isfinite(result.memory_gib) and result.memory_gib > 0
    assert all(value >= 0 for value in result.breakdown.values())
    if result.feasible:
        assert sum(result.breakdown.values()) == pytest.approx(result.latency_s, rel=1e-9)
    else:
        assert "GiB" in result.reason


@PROPERTY
@given(cases(), st.sampled_from(["pcie", "socket", "nvlink", "network"]), st.floats(1.01, 20.0))
def test_more_bandwidth_on_any_link_never_predicts_slower(case, tier, factor):
    model, cluster_id, gpus, config, shape = case
    cluster = load_cluster(cluster_id, gpus=gpus)
    assume(tier in cluster.tiers())
    faster = cluster.with_link_scaled(tier, factor)
    height, width, frames, steps = shape
    base = simulate(model, cluster, config, height=height, width=width, frames=frames, steps=steps).latency_s
    better = simulate(model, faster, config, height=height, width=width, frames=frames, steps=steps).latency_s
    assert better <= base * (1 + 1e-12)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["pixart-alpha", "sd3-medium", "flux-dev", "hunyuan-dit"]), st.sampled_from([2, 4, 8]),
       st.sampled_from([1, 2]), st.integers(1, 6))
def test_pipefusion_with_all_steps_warm_is_a_synchronous_pipeline(model, p, patch_factor, steps):
    cluster = load_cluster("l40-pcie-8", gpus=p)
    shape = dict(height=1024, width=1024, frames=1)
    synchronous = simulate(model, cluster, ParallelConfig(pipefusion=p, patches=p * patch_factor, warmup=steps),
                           steps=steps, **shape).latency_s
    one_step = simulate(model, cluster, ParallelConfig(pipefusion=p, patches=p * patch_factor, warmup=1),
                        steps=1, **shape).latency_s
    assert synchronous == pytest.approx(steps * one_step)
    # A synchronous pipeline computes what one GPU computes, plus the hand-offs between stages.
    serial = simulate(model, load_cluster("l40-pcie-8", gpus=1), "cfg=1", steps=steps, **shape).latency_s
    spec = load_model(model)
    slab = (2 if spec.uses_cfg else 1) * (spec.image_tokens(1024, 1024, 1) + spec.text_tokens) * spec.hidden_size * 2
    if spec.skip_connections:  # HunyuanDiT relays its long skips with the hand-off
        slab *= 1 + spec.num_blocks // 2
    hand_off = max(cluster.comm_time("p2p", ((a, b),), slab)[0] for a in range(p) for b in range(p) if a != b)
    assert serial <= synchronous <= serial + steps * p * hand_off + 1e-9
    # The patch pipeline itself is faster than running every step synchronously.
    pipelined = simulate(model, cluster, ParallelConfig(pipefusion=p, patches=p * patch_factor, warmup=0),
                         steps=max(steps, 4), **shape).latency_s
    assert pipelined < max(steps, 4) * one_step


@pytest.mark.parametrize("model", ["flux-dev", "pixart-alpha", "hunyuan-dit"])
def test_parameter_memory_per_gpu_falls_as_pipefusion_grows(model):
    params = []
    for p in (1, 2, 4, 8):
        result = simulate(model, load_cluster("h100-sxm-nvlink-8", gpus=p), ParallelConfig(pipefusion=p),
                          height=1024, width=1024, steps=20)
        params.append(result.memory["params_gib"])
    assert all(a > b for a, b in zip(params, params[1:]))
    assert params[-1] < params[0] / 6


def test_out_of_memory_is_infeasible_with_figures():
    result = simulate("flux-dev", load_cluster("rtx4090-pcie-8", gpus=1), "cfg=1", height=1024, width=1024, steps=28)
    assert not result.feasible
    assert "GiB per GPU" in result.reason and "params 22.2" in result.reason and "has 22.4 GiB" in result.reason
    fits = simulate("flux-dev", load_cluster("l40-pcie-8", gpus=8), "pipefusion=8", height=1024, width=1024, steps=28)
    assert fits.feasible and fits.reason == ""


def test_public_api_result_fields_and_json():
    result = simulate(load_model("flux-dev"), load_cluster("h100-sxm-nvlink-8", gpus=4), ParallelConfig.parse("ulysses=4"),
                      height=1024, width=1024, frames=1, steps=28)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["feasible"] is True and data["latency_s"] > 0 and data["memory_gib"] > 0
    assert set(data["breakdown"]) == {"compute_s", "communication_s", "linear_flops_per_step",
                                      "attention_flops_per_step", "other_flops_per_step", "bytes_per_step"}
    split = sum(data["breakdown"][f"{kind}_flops_per_step"] for kind in ("linear", "attention", "other"))
    assert data["flops_per_step"] == pytest.approx(split) and data["flops_per_step"] > 7e13  # Flux-dev: ~74 TFLOP per 1024² image
    assert data["end_to_end_s"] == pytest.approx(result.text_encode_s + result.latency_s + result.vae_decode_s)
    assert set(result.comm_by_tier) == {"nvlink"}
    assert result.per_step_s * 28 == pytest.approx(result.latency_s)
    assert result.text_encode_s > 0 and result.vae_decode_s > 0  # reported apart from latency_s


def test_mechanisms_the_published_data_shows():
    """Physical consequences, not fitted numbers: cross-socket all-to-all is slow on L40, NVLink is not."""
    l40 = load_cluster("l40-pcie-8", gpus=8)
    shape = dict(height=1024, width=1024, steps=20)
    serial = simulate("pixart-alpha", load_cluster("l40-pcie-8", gpus=1), "cfg=1", **shape).latency_s
    ulysses = simulate("pixart-alpha", l40, "ulysses=8", **shape)
    ring = simulate("pixart-alpha", l40, "ring=8", **shape).latency_s
    pipefusion = simulate("pixart-alpha", l40, "cfg=2,pipefusion=4", **shape).latency_s
    assert ulysses.latency_s > serial and max(ulysses.comm_by_tier, key=ulysses.comm_by_tier.get) == "socket"
    assert pipefusion < ring < ulysses.latency_s
    h100 = load_cluster("h100-sxm-nvlink-8", gpus=4)
    flux = {c: simulate("flux-dev", h100, c, height=1024, width=1024, steps=28).latency_s
            for c in ("ulysses=4", "ring=4", "ulysses=2,ring=2")}
    assert min(flux, key=flux.get) == "ulysses=4"


def test_hunyuan_skips_make_deep_pipelines_costly():
    """The long skips are relayed stage to stage: their cost over a skip-free twin grows with the degree.
    At 2048 px, where a stage's kernels outlast the host's dispatch of them; at 1024 px eight stages are
    host-bound and the relays hide under the dispatch."""
    import dataclasses

    hunyuan = load_model("hunyuan-dit")
    twin = dataclasses.replace(hunyuan, skip_connections=False)
    overhead = {}
    for p in (2, 4, 8):
        cluster = load_cluster("l40-pcie-8", gpus=p)
        config = ParallelConfig(pipefusion=p, warmup=0)
        with_skips = simulate(hunyuan, cluster, config, height=2048, width=2048, steps=50).latency_s
        without = simulate(twin, cluster, config, height=2048, width=2048, steps=50).latency_s
        overhead[p] = with_skips / without
    assert 1.0 < overhead[2] < overhead[4] < overhead[8]


def test_flux_text_splits_over_sp_ranks_only_where_the_executor_splits_it():
    """Per-rank activation rows are image + text tokens: Flux's text divides over the SP ranks without
    PipeFusion (T/sp), and stays whole where it does not divide, with PipeFusion, and for SD3."""
    import dataclasses

    flux, sd3 = load_model("flux-dev"), load_model("sd3-medium")
    odd_flux = dataclasses.replace(flux, text_tokens=flux.text_tokens + 1)  # 513 divides by no SP degree
    even_sd3 = dataclasses.replace(sd3, text_tokens=336)
    image = flux.image_tokens(1024, 1024, 1)

    def rows(model, config: str) -> float:
        result = simulate(model, load_cluster("l40-pcie-8", gpus=4), config, height=1024, width=1024, steps=4)
        return result.memory["activations_gib"]

    per_row = rows(flux, "ulysses=4") / (image / 4 + flux.text_tokens / 4)
    assert rows(odd_flux, "ulysses=4") == pytest.approx(per_row * (image / 4 + odd_flux.text_tokens))
    assert rows(flux, "ulysses=2,pipefusion=2") == pytest.approx(per_row * (image / 2 + flux.text_tokens))
    sd3_per_row = rows(sd3, "ring=4") / (image / 4 + sd3.text_tokens)
    assert rows(even_sd3, "ring=4") == pytest.approx(sd3_per_row * (image / 4 + 336))
    # Less text per rank is less work: the split Flux is faster than its one-token-longer twin.
    for config in ("ulysses=4", "ring=4", "ulysses=2,ring=2"):
        split = simulate(flux, load_cluster("l40-pcie-8", gpus=4), config, height=1024, width=1024, steps=4)
        whole = simulate(odd_flux, load_cluster("l40-pcie-8", gpus=4), config, height=1024, width=1024, steps=4)
        assert split.breakdown["compute_s"] < 0.97 * whole.breakdown["compute_s"], config


def test_a_ring_hop_hides_behind_a_whole_merge_only_once_a_running_output_exists(monkeypatch):
    """The first hop travels while the local block is attended and upcast into the running output;
    only the later hops overlap a whole merge. So a costlier merge hides none of a 2-rank ring's hop
    without text keys, but some of a 4-rank ring's, and of a joint-attention ring's first hop (the
    text keys start the running output there)."""
    import costmodel.block_cost as block_cost_module
    from costmodel.sim_setup import build_setup

    def exposed(model: str, config: str, kind: str, merge_passes: float) -> float:
        monkeypatch.setattr(block_cost_module, "RING_MERGE_PASSES", merge_passes)
        st = build_setup(model, "l20-pcie-8", config, None, None, None, None, None)
        return block_cost_module.block_cost(st, kind, st.tokens // st.config.ring, st.text, False).comm

    two = exposed("latte", "ring=2", "cross", 10.0)
    assert two > 0 and exposed("latte", "ring=2", "cross", 100.0) == pytest.approx(two)
    assert exposed("latte", "ring=4", "cross", 100.0) < exposed("latte", "ring=4", "cross", 10.0)
    joint = exposed("sd3-medium", "ring=2", "joint", 10.0)
    assert joint > 0 and exposed("sd3-medium", "ring=2", "joint", 100.0) < joint


def test_a_joint_attention_patch_copies_its_whole_kv_buffer_and_a_cross_attention_patch_only_its_rows(tmp_path):
    """PipeFusion's patch steps write each patch's fresh K/V rows into the buffers; joint attention
    also concatenates the whole image buffer with the text's, so its per-patch copy does not shrink
    with the patch. (On a profiled CPU, where no host time hides the copies.)"""
    from test_profiler import synthetic_profile, write_profile

    from costmodel import compute
    from costmodel.block_cost import STALE_KV_CAT_PASSES, STALE_KV_PUT_PASSES, block_cost
    from costmodel.sim_setup import build_setup

    cluster = load_cluster(str(write_profile(tmp_path, synthetic_profile())), gpus=2)

    def added(model: str, kind: str, patches: int) -> tuple[float, float]:
        st = build_setup(model, cluster, f"pipefusion=2,patches={patches}", None, None, None, None, None)
        rows, text = st.tokens // patches, -(-st.text // patches)
        extra = (block_cost(st, kind, rows, text, False, stale_kv=True).compute
                 - block_cost(st, kind, rows, text, False).compute)
        slab = st.batch * st.model.hidden_size * st.model.dtype_bytes
        hw = st.cluster.hardware
        put = compute.elementwise_seconds(hw, STALE_KV_PUT_PASSES * (rows + text) * slab, (rows + text) * slab)
        cat = compute.elementwise_seconds(hw, STALE_KV_CAT_PASSES * (st.tokens + st.text) * slab,
                                          (st.tokens + st.text) * slab) if st.text else 0.0
        return extra, put + cat

    for model, kind in (("sd3-medium", "joint"), ("pixart-alpha", "cross")):
        for patches in (2, 8):
            extra, expected = added(model, kind, patches)
            assert extra == pytest.approx(expected, rel=1e-9) and extra > 0, (model, patches)
    # Per step (x patches) the joint block's copies grow with the patch count; the cross block's do not.
    assert 8 * added("sd3-medium", "joint", 8)[0] > 3 * 2 * added("sd3-medium", "joint", 2)[0]
    assert 8 * added("pixart-alpha", "cross", 8)[0] == pytest.approx(2 * added("pixart-alpha", "cross", 2)[0], rel=0.3)


def test_placement_changes_the_tier():
    cluster = load_cluster("l40-pcie-8", gpus=8)
    config = ParallelConfig.parse("ulysses=2,pipefusion=4")
    inner = simulate("pixart-alpha", cluster, config, placement=Placement(config), height=1024, width=1024, steps=20)
    outer = simulate("pixart-alpha", cluster, config, placement=Placement.parse(config, "pipefusion,ring,ulysses,cfg,dp"),
                     height=1024, width=1024, steps=20)
    assert outer.latency_s > inner.latency_s and "socket" in outer.comm_by_tier


def test_trace_has_a_track_per_rank_with_compute_communication_and_waiting():
    result = simulate("sd3-medium", load_cluster("l40-pcie-8", gpus=8), "cfg=2,ulysses=2,pipefusion=2,patches=4",
                      height=1024, width=1024, steps=6, trace=True)
    events = [e for e in result.trace if e["ph"] == "X"]
    assert {e["pid"] for e in events} == set(range(8))
    assert {"compute", "communication", "waiting"} <= {e["cat"] for e in events}
    computed = [e for e in events if e["cat"] == "compute"]
    assert max(e["ts"] + e["dur"] for e in computed) == pytest.approx(result.latency_s * 1e6, rel=1e-9)
    assert simulate("sd3-medium", load_cluster("l40-pcie-8", gpus=8), "cfg=2,ulysses=4", height=1024, width=1024,
                    steps=6).trace is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_pipefusion_shortcut_to_its_periodic_state_changes_nothing(case):
    """Without a trace the event simulation stops once a step shifts every time alike and
    extrapolates; with one it runs every step. Both give the same figures."""
    model, cluster, gpus, config, shape = case
    assume(config.pipefusion > 1)
    quick = run(model, cluster, gpus, config, shape)
    full = run(model, cluster, gpus, config, shape, trace=True)
    assert quick.latency_s == pytest.approx(full.latency_s, rel=1e-9)
    for key, value in full.breakdown.items():
        assert quick.breakdown[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("config", ["pipefusion=8", "cfg=2,pipefusion=4,patches=8", "ulysses=2,pipefusion=4,warmup=0"])
def test_closed_form_estimate_tracks_the_simulator(config):
    cluster = load_cluster("l40-pcie-8", gpus=8)
    simulated = simulate("pixart-alpha", cluster, config, height=2048, width=2048, steps=20).latency_s
    estimated = estimate("pixart-alpha", cluster, config, height=2048, width=2048, steps=20).latency_s
    assert estimated == pytest.approx(simulated, rel=0.1)


@pytest.mark.timeout(120)
def test_cost_model_and_cli_import_neither_torch_nor_diffusers():
    code = (
        "import sys, costmodel, planner.cli\n"
        "from planner.commands import common, models, clusters, simulate, validate\n"
        "r = costmodel.simulate('flux-dev', costmodel.load_cluster('h100-sxm-nvlink-8', gpus=4), 'ulysses=4',"
        " height=1024, width=1024, steps=28)\n"
        "costmodel.validation_table()\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert completed.returncode == 0, completed.stderr
