"""The log-sum-exp merge that makes Ring attention exact, checked in one process against full attention."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from executor.sp.attention import (
    LseMerger,
    _reference_attention_with_lse,
    attention_with_lse,
    merge_partial_attention,
)


def random_qkv(queries: int, keys: int, seed: int = 0, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 3, queries, 16, generator=generator) * scale
    key = torch.randn(2, 3, keys, 16, generator=generator) * scale
    value = torch.randn(2, 3, keys, 16, generator=generator)
    return query, key, value


def test_fused_lse_is_the_log_sum_exp_of_the_scaled_scores():
    query, key, value = random_qkv(7, 11)
    out, lse = attention_with_lse(query, key, value)
    scores = query @ key.transpose(-1, -2) / math.sqrt(16)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 7)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(query, key, value), atol=1e-6, rtol=0)
    reference_out, reference_lse = _reference_attention_with_lse(query, key, value)
    torch.testing.assert_close(reference_out, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(reference_lse, lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_sizes", [[11], [4, 7], [1, 5, 2, 3], [3, 3, 3, 2]])
def test_merging_blocks_of_keys_gives_full_attention(block_sizes):
    query, key, value = random_qkv(6, sum(block_sizes), seed=len(block_sizes))
    parts, start = [], 0
    for size in block_sizes:
        parts.append(attention_with_lse(query, key[:, :, start : start + size], value[:, :, start : start + size]))
        start += size
    out, lse = merge_partial_attention(parts)
    full_out, full_lse = attention_with_lse(query, key, value)
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=0)
    # The merge is symmetric: any arrival order gives the same attention (to rounding).
    reversed_out, _ = merge_partial_attention(parts[::-1])
    torch.testing.assert_close(reversed_out, full_out, atol=1e-6, rtol=0)


def test_merge_stays_exact_when_one_block_dominates():
    # Scores around +-400: exp() of them overflows float32, so a merge that exponentiates raw LSEs
    # (instead of differences to the running maximum) would return inf/nan here.
    query, key, value = random_qkv(5, 12, seed=3, scale=9.0)
    parts = [attention_with_lse(query, key[:, :, :6], value[:, :, :6]), attention_with_lse(query, key[:, :, 6:], value[:, :, 6:])]
    out, _ = merge_partial_attention(parts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(query, key, value), atol=1e-5, rtol=0)


def test_merge_keeps_the_partial_outputs_dtype():
    query, key, value = random_qkv(4, 8, seed=5)
    parts = [attention_with_lse(q, k, v) for q, k, v in [(query.double(), key[:, :, :4].double(), value[:, :, :4].double()),
                                                          (query.double(), key[:, :, 4:].double(), value[:, :, 4:].double())]]
    out, _ = merge_partial_attention(parts)
    assert out.dtype == torch.float64


def test_merger_refuses_an_empty_result():
    with pytest.raises(RuntimeError, match="before any block"):
        LseMerger().result()
