"""Text encoding, the VAE decode over `vae` ranks, the transfers between them and the end-to-end
latency; the `vae` field of the configuration; where the decode puts memory."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import costmodel
import planner
from costmodel.config import AXES, ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.pipeline_stages import choose_vae, decode_activations_gib, decode_groups, price_stages


def test_vae_is_written_only_where_it_is_not_the_default():
    assert str(ParallelConfig(cfg=2)) == "cfg=2,ulysses=1,ring=1,pipefusion=1,patches=1,warmup=1,dp=1"
    config = ParallelConfig.parse("cfg=2,ulysses=2,vae=4")
    assert config.vae == 4 and config.world_size == 4
    assert str(config).endswith(",dp=1,vae=4") and ParallelConfig.parse(str(config)) == config


@pytest.mark.parametrize("text, words", [("cfg=2,dp=2,vae=4", "divides 2"), ("ulysses=2,vae=0", "vae=0"),
                                         ("ulysses=4,vae=3", "divides 4")])
def test_a_vae_that_does_not_divide_a_replica_is_refused_by_rule(text, words):
    with pytest.raises(DitplanError, match=words):
        ParallelConfig.parse(text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([1, 2]), min_size=5, max_size=5), st.permutations(AXES), st.data())
def test_decode_groups_are_each_replicas_lowest_ranks(degrees, order, data):
    base = ParallelConfig(**dict(zip(AXES, degrees)))
    replica = base.world_size // base.dp
    vae = data.draw(st.sampled_from([n for n in range(1, replica + 1) if replica % n == 0]))
    config = replace(base, vae=vae)
    placement = Placement(config, tuple(order))
    expected = [tuple(sorted(r for r in range(config.world_size) if placement.coordinates(r)["dp"] == d)[:vae])
                for d in range(config.dp)]
    assert list(decode_groups(config, placement.order)) == expected


def _prices(config: str, cluster: str = "l40-pcie-8", model: str = "pixart-alpha", size: int = 2048, frames: int = 1):
    parsed = ParallelConfig.parse(config)
    return price_stages(costmodel.load_model(model), costmodel.load_cluster(cluster, gpus=parsed.world_size), parsed,
                        Placement(parsed), size, size, frames)


def test_one_decode_rank_has_no_decode_traffic():
    prices = _prices("cfg=2,pipefusion=4")
    assert prices.vae == 1 and prices.latent_transfer_s == 0 and prices.vae_comm_s == 0 and prices.image_gather_s == 0
    assert prices.text_encode_s > 0 and prices.vae_compute_s > 0


def test_strips_divide_the_decode_and_add_its_traffic():
    alone, four = _prices("cfg=2,pipefusion=4"), _prices("cfg=2,pipefusion=4,vae=4")
    assert four.vae_compute_s == pytest.approx(alone.vae_compute_s / 4)
    assert four.vae_comm_s > 0 and four.latent_transfer_s > 0
    assert four.decode_activations_gib < alone.decode_activations_gib / 2
    assert four.end_to_end_s(3.0) == pytest.approx(
        four.text_encode_s + 3.0 + four.latent_transfer_s + four.vae_compute_s + four.vae_comm_s)
    # Slower links: the same strips cost more traffic over PCIe than over NVLink.
    assert _prices("cfg=2,pipefusion=4,vae=4", "l40-pcie-8").vae_comm_s > _prices(
        "cfg=2,pipefusion=4,vae=4", "h100-sxm-nvlink-8").vae_comm_s


def test_replicas_send_their_images_to_rank_zero():
    assert _prices("pipefusion=4,dp=2").image_gather_s > 0


def test_decode_memory_falls_with_strips_and_grows_with_resolution():
    model = costmodel.load_model("pixart-alpha")
    peaks = [decode_activations_gib(model, 4096, 4096, 1, n) for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    assert decode_activations_gib(model, 2048, 2048, 1) < peaks[0] / 3
    # CogVideoX decodes a frame batch at a time: more frames do not raise the peak.
    cog = costmodel.load_model("cogvideox-2b")
    assert decode_activations_gib(cog, 480, 720, 49) == decode_activations_gib(cog, 480, 720, 17)


def test_simulate_reports_end_to_end_beside_the_loop():
    result = costmodel.simulate("pixart-alpha", "l40-pcie-8", "cfg=2,pipefusion=4,vae=2", height=2048, width=2048, steps=20)
    data = result.to_dict()
    assert data["end_to_end_s"] == pytest.approx(
        data["latency_s"] + sum(data["stages"][key] for key in
                                ("text_encode_s", "latent_transfer_s", "vae_compute_s", "vae_comm_s", "image_gather_s")))
    assert data["vae_decode_s"] == pytest.approx(data["stages"]["vae_compute_s"] + data["stages"]["vae_comm_s"])
    assert data["memory_gib"] == pytest.approx(sum(data["memory"].values()))


def test_a_decode_that_does_not_fit_is_pruned_and_strips_make_it_fit():
    alone = costmodel.simulate("pixart-alpha", "rtx4090-pcie-8", "pipefusion=4", height=4096, width=4096, steps=20)
    strips = costmodel.simulate("pixart-alpha", "rtx4090-pcie-8", "pipefusion=4,vae=4", height=4096, width=4096, steps=20)
    assert not alone.feasible and "decode" in alone.reason and "vae=N" in alone.reason
    assert strips.feasible


def test_a_plan_that_fits_only_without_the_encoders_says_so():
    result = costmodel.simulate("sd3-medium", "t4-pcie-4", "cfg=1")
    assert not result.feasible and "fits only with the text encoders and VAE elsewhere" in result.reason


def test_choose_vae_prefers_strips_on_fast_links_and_fits_memory():
    model = costmodel.load_model("pixart-alpha")
    config = ParallelConfig(cfg=2, pipefusion=4)
    nvlink = costmodel.load_cluster("h100-sxm-nvlink-8", gpus=8)
    assert choose_vae(model, nvlink, config, Placement(config), 2048, 2048, 1, memory_left_gib=60.0) > 1
    # With no room for the whole decode, the fastest choice that fits wins.
    tight = decode_activations_gib(model, 4096, 4096, 1, 2) * 1.01
    assert choose_vae(model, nvlink, config, Placement(config), 4096, 4096, 1, memory_left_gib=tight) >= 2


@pytest.mark.timeout(120)
def test_search_chooses_vae_and_the_plan_carries_it():
    result = planner.search("pixart-alpha", "rtx4090-pcie-8", 8, height=4096, width=4096, steps=20)
    assert result.best.config.vae > 1
    assert all(plan.end_to_end_s >= plan.latency_s for plan in result.plans)
    assert result.to_plan().config.vae == result.best.config.vae
