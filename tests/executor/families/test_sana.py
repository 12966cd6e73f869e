"""The SANA family (executor/families/sana.py) on the tiny SANA pipeline.

Single-process: the linear-attention processor is diffusers' own arithmetic, and the MLP's halo rows
make a strip of token rows compute what the whole grid computes. One process group of 2 ranks
(sana_worker.py) runs Ulysses 2, Ring 2, CFG 2, PipeFusion 2 with warmup = steps and with stale
summaries, and stale patches under Ulysses, Ring and CFG, each against the one-process run, and the
refusals; then `ditplan run` on 2 ranks and the cost model's reading of the tiny profile.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from executor_spawn import assert_follows_nccl_rules  # noqa: E402
from two_rank_checks import (  # noqa: E402
    assert_matches_one_process,
    assert_refused_alike,
    ditplan_run_on_two_ranks,
    spawn_pair,
)
from sana_worker import PLANS  # noqa: E402


def test_the_linear_attention_processor_is_diffusers_arithmetic():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from executor.families.sana import SanaLinearAttentionProcessor, tiny_transformer
    from executor.sp.processors import SequenceShard

    tiny = tiny_transformer(seed=2)
    attention = tiny.model.transformer_blocks[0].attn1
    states = torch.randn(2, 64, attention.to_q.in_features)
    with torch.no_grad():
        expected = SanaLinearAttnProcessor2_0()(attention, states)
        got = SanaLinearAttentionProcessor(SequenceShard(None, None))(attention, states)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_strip_with_its_halo_rows_computes_the_whole_grids_rows():
    from executor.families.sana import _feed_forward_rows, tiny_transformer

    ff = tiny_transformer(seed=2).model.transformer_blocks[0].ff
    grid = torch.randn(2, ff.conv_inverted.in_channels, 12, 7)
    with torch.no_grad():
        whole = ff(grid)
        for first, stop in ((0, 4), (4, 9), (9, 12)):
            above = grid[:, :, first - 1:first] if first > 0 else None
            below = grid[:, :, stop:stop + 1] if stop < 12 else None
            strip = _feed_forward_rows(ff, grid[:, :, first:stop], above, below)
            torch.testing.assert_close(strip, whole[:, :, first:stop], rtol=1e-6, atol=1e-6)
        # Without its halo a strip's edge rows differ: the halo is what makes it exact.
        assert (_feed_forward_rows(ff, grid[:, :, 4:9], None, None) - whole[:, :, 4:9]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return spawn_pair(HERE / "sana_worker.py", tmp_path_factory.mktemp("sana2"))


@pytest.mark.timeout(480)
@pytest.mark.parametrize("plan", PLANS)
def test_two_rank_plan_matches_the_one_process_run(two_ranks, plan):
    assert_matches_one_process(two_ranks[0], plan)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("where, words", [("plan", "9 token rows"), ("transformer", "9 token rows do not divide over ulysses=2")])
def test_rows_that_do_not_split_are_refused_alike_in_words(two_ranks, where, words):
    # The plan is refused by the cost model's rule before anything runs; a transformer called
    # directly (a model without a profile) is refused by the sequence-parallel hooks.
    assert_refused_alike(two_ranks, where, words)


@pytest.mark.timeout(480)
def test_a_decode_in_row_strips_is_refused_in_words(two_ranks):
    message = two_ranks[0]["refusal|vae strips"]
    assert "AutoencoderDC" in message.get("message", ""), message


@pytest.mark.timeout(480)
def test_every_plan_follows_nccl_rules(two_ranks):
    assert_follows_nccl_rules(two_ranks["folder"] / "communication")


@pytest.mark.timeout(300)
def test_ditplan_run_on_two_ranks(tmp_path):
    record = ditplan_run_on_two_ranks(tmp_path / "run", "tiny-sana", "pipefusion=2,patches=2", "--steps", "2")
    assert "pipefusion=2" in record["config"] and len(record["files"]) == 1


def test_the_cost_model_reads_the_tiny_profile(capsys):
    from planner.cli import main

    assert main(["simulate", "--model", "tiny-sana", "--cluster", "l40-pcie-8", "--config", "ulysses=2"]) == 0
    assert "tiny-sana" in capsys.readouterr().out
