"""Today's families in the cost model: memory at real sizes, two experts, SANA's linear attention under
Ring and PipeFusion, and sequence parallelism over a video's flattened tokens."""
from __future__ import annotations

from dataclasses import replace

import pytest

from costmodel import estimate, simulate
from costmodel.block_cost import block_cost
from costmodel.config import warmup_steps
from costmodel.rules import check_config
from costmodel.sim_setup import build_setup
from costmodel.specs import load_model


def test_wan_14b_at_720p_does_not_fit_one_l40_beside_its_text_encoder() -> None:
    result = simulate("wan2.1-t2v-14b", "l40-pcie-8", "cfg=1")
    assert not result.feasible
    assert result.memory["encoders_vae_gib"] > 10.0  # umT5-XXL is 5.7 B parameters
    assert result.memory["params_gib"] < result.memory_capacity_gib  # the weights alone would fit
    assert "encoders vae" in result.reason and "L40" in result.reason
    assert simulate("wan2.1-t2v-14b", "h100-sxm-nvlink-8", "cfg=1").feasible


def test_two_experts_are_both_resident_and_pipefusion_cuts_both() -> None:
    one = simulate("wan2.1-t2v-14b", "h100-sxm-nvlink-8", "cfg=1", steps=40)
    two = simulate("wan2.2-t2v-a14b", "h100-sxm-nvlink-8", "cfg=1")
    assert two.memory["params_gib"] == pytest.approx(2 * one.memory["params_gib"])
    assert two.latency_s == pytest.approx(one.latency_s)  # same shape, same steps: each step costs the same
    staged = simulate("wan2.2-t2v-a14b", "h100-sxm-nvlink-8", "pipefusion=2,patches=3")
    assert staged.memory["params_gib"] == pytest.approx(two.memory["params_gib"] / 2)


def test_pipefusion_warms_up_each_expert_as_the_executor_does() -> None:
    # The low-noise expert has no stale K/V of its own at the boundary: its first `warmup` steps run
    # whole too (costmodel.config.warmup_steps, the executor's rule), after the pipeline drains.
    a14b = load_model("wan2.2-t2v-a14b")
    experts = a14b.step_experts(40)
    assert experts == (0,) * 26 + (1,) * 14
    assert warmup_steps(experts, 1) == [True] + [False] * 25 + [True] + [False] * 13
    assert warmup_steps(experts, 0) == [False] * 40 and warmup_steps((0, 0, 1), 5) == [True] * 3
    config = "pipefusion=3,patches=3,warmup=1"  # 720p: 45 token rows
    two = simulate(a14b, "h100-sxm-nvlink-8", config, steps=40, trace=True)
    one = simulate(replace(a14b, experts=1), "h100-sxm-nvlink-8", config, steps=40)
    assert two.breakdown["warmup_s"] == pytest.approx(2 * one.breakdown["warmup_s"])
    assert two.latency_s > one.latency_s
    warm = {e["args"]["step"] for e in two.trace if e.get("cat") == "compute" and e["name"].startswith("warmup step")}
    assert warm == {0, 26}
    last_patch_before = max(e["ts"] + e["dur"] for e in two.trace if e.get("cat") == "compute" and e["args"].get("step") == 25)
    assert min(e["ts"] for e in two.trace if e["name"] == "warmup step 26") >= last_patch_before
    assert estimate(a14b, "h100-sxm-nvlink-8", config, steps=40).latency_s == pytest.approx(two.latency_s, rel=0.1)
    # Without a trace the simulation extrapolates a periodic state, up to the second expert's warmup only.
    quick = simulate(a14b, "h100-sxm-nvlink-8", config, steps=40)
    assert quick.latency_s == pytest.approx(two.latency_s, rel=1e-9)
    assert quick.breakdown == pytest.approx(two.breakdown, rel=1e-9)


def test_sana_ring_exchanges_summaries_not_keys_and_values() -> None:
    sana = load_model("sana-1600m")
    as_softmax = replace(sana, attention="softmax")
    height = width = 4096  # 16k tokens: large enough that K/V hops are not hidden behind the host
    linear = build_setup(sana, "l40-pcie-8", "ring=2", height, width, 1, 20, None)
    softmax = build_setup(as_softmax, "l40-pcie-8", "ring=2", height, width, 1, 20, None)
    half = linear.tokens // 2
    assert block_cost(linear, "cross", half, 0, False).compute < block_cost(softmax, "cross", half, 0, False).compute
    summary_bytes = 2 * 70 * 33 * 32 * 4
    seconds, _ = linear.cluster.comm_time("p2p", linear.groups["ring"], summary_bytes)
    kv_seconds, _ = linear.cluster.comm_time("p2p", linear.groups["ring"], 2.0 * 2 * half * 2240 * 2)
    assert seconds < kv_seconds / 100


def test_sana_pipefusion_keeps_summaries_not_the_sequence() -> None:
    sana = simulate("sana-1600m", "h100-sxm-nvlink-8", "pipefusion=2,patches=4", height=4096, width=4096)
    softmax = simulate(replace(load_model("sana-1600m"), attention="softmax"), "h100-sxm-nvlink-8",
                       "pipefusion=2,patches=4", height=4096, width=4096)
    assert sana.memory["kv_buffers_gib"] < 0.05 and softmax.memory["kv_buffers_gib"] > 1.0


def test_sequence_parallelism_splits_a_videos_flattened_tokens() -> None:
    # 720p has 45 token rows; HunyuanVideo's 33 x 45 x 80 tokens split over 8 (as the public rows run).
    assert check_config("ulysses=8", "hunyuan-video", 720, 1280, 129, 50, 8) == []
    # PipeFusion's patches still cut rows.
    problems = check_config("pipefusion=2,patches=2", "hunyuan-video", 720, 1280, 129, 50, 2)
    assert any("45 token rows" in p for p in problems)
