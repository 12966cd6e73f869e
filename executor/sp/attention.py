"""Sequence-parallel attention: Ulysses, Ring (exact log-sum-exp merge) and their hybrid USP.

Layout everywhere: [batch, heads, tokens, head_dim]. Image tokens are split over the SP group (rank
with Ulysses index j and Ring index i holds chunk i*u + j of the sequence); text tokens of joint
attention (MM-DiT) are held whole by every rank and never sent.

How the pieces combine (docs/executor.md):
* Ulysses (group of u): all-to-all Q, K, V from all heads of my tokens to H/u heads of all the
  group's tokens; attend; all-to-all back. Text Q/K/V are sliced to the same H/u heads locally, and
  the text output is all-gathered over heads afterwards.
* Ring (group of r): each rank keeps its queries; K/V blocks travel around the ring r-1 times while
  the rank attends to the block it holds. Text K/V is one more block, attended once, locally.
* USP: Ulysses first (inside groups of nearest ranks), then Ring over the H/u heads.

Partial attentions over disjoint key blocks merge exactly: with each block's output o_i and
log-sum-exp l_i of the scaled scores, l = log sum exp(l_i) and o = sum exp(l_i - l) * o_i.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from executor.sp.comm import (
    RingExchange,
    all_gather_along,
    group_size,
    local_heads,
    ulysses_gather_heads,
    ulysses_scatter_heads,
)


def lse_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which kernel computes attention with its log-sum-exp here: "cpu-flash" on the CPU; on CUDA
    "flash" where the GPU has it (compute capability 8.0+, fp16/bf16, head_dim a multiple of 8 up
    to 256), else "efficient" (memory-efficient attention: any dtype on 8.0+, fp16/fp32 before,
    so T4 and V100), else "reference" (plain math, any device)."""
    if device.type == "cpu":
        return "cpu-flash"
    if device.type != "cuda":
        return "reference"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    if major >= 8 or dtype != torch.bfloat16:
        return "efficient"
    return "reference"


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (scale 1/sqrt(head_dim), no mask) and the float32 log-sum-exp of each query's scores.

    Uses a fused kernel that returns the LSE where the device has one (`lse_kernel`), so ring
    attention costs what plain attention costs.
    """
    kernel = lse_kernel(query.device, query.dtype, query.shape[-1])
    if kernel == "cpu-flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False)
        return out, lse.float()
    if kernel == "flash":
        result = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False)
        return result[0], result[1].float()
    if kernel == "efficient":
        result = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True)
        # The memory-efficient kernel may pad the LSE's token dimension; keep the real queries.
        return result[0], result[1][..., : query.shape[-2]].float()
    return _reference_attention_with_lse(query, key, value)


def _reference_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-math attention with its LSE, for devices without a fused kernel that returns it."""
    scores = (query.float() @ key.float().transpose(-1, -2)) / math.sqrt(query.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ value.float()
    return out.to(query.dtype), lse


class LseMerger:
    """Accumulates partial attentions over disjoint key blocks into the exact full attention.

    Each `add(out, lse)` folds one block in (online, in float32): after all blocks, `result()` equals
    softmax attention over the union of the keys, up to rounding.
    """

    def __init__(self) -> None:
        self._out: torch.Tensor | None = None
        self._lse: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        lse = lse.float()
        if self._out is None:
            self._out, self._lse, self._dtype = out.float(), lse, out.dtype
            return
        merged = torch.logaddexp(self._lse, lse)
        self._out = torch.exp(self._lse - merged).unsqueeze(-1) * self._out + torch.exp(lse - merged).unsqueeze(-1) * out.float()
        self._lse = merged

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._out is None:
            raise RuntimeError("LseMerger.result() before any block was added")
        return self._out.to(self._dtype), self._lse


def merge_partial_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (out_i, lse_i) of attention over disjoint key blocks, in list order, into (out, lse)."""
    merger = LseMerger()
    for out, lse in parts:
        merger.add(out, lse)
    return merger.result()


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: ProcessGroup,
    text_query: torch.Tensor | None = None,
    text_key: torch.Tensor | None = None,
    text_value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of my queries to the keys of every rank of the ring (and to the text, if given).

    query/key/value: this rank's image tokens [B, H, S/r, D]; text_*: the text tokens every rank
    holds whole [B, H, T, D]. Returns my image output and the text queries' output [B, H, T, D].

    K and V travel as one buffer; each hop is posted before the attention on the block in hand, so it
    overlaps that compute. Text queries attend to every block too; their partials are merged in block
    order (not arrival order), so every rank of the ring computes bit-identical text outputs.
    """
    ring = group_size(group)
    has_text = text_query is not None
    # An empty text strip (PipeFusion's text travels in strips) asks nothing; the CPU kernel fails on zero queries.
    text_asks = has_text and text_query.shape[-2] > 0
    image = LseMerger()
    text_parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if has_text:
        assert text_key is not None and text_value is not None, "joint attention needs text keys and values"
        # The text keys are one more block, held by every rank: attended once, with no communication.
        image.add(*attention_with_lse(query, text_key, text_value))
        if text_asks:
            text_parts[-1] = attention_with_lse(text_query, text_key, text_value)

    exchange = RingExchange(group)
    me = torch.distributed.get_rank(group)
    block = torch.stack([key, value])
    for hop in range(ring):
        if hop < ring - 1:
            exchange.start(block)
        block_key, block_value = block[0], block[1]
        image.add(*attention_with_lse(query, block_key, block_value))
        if text_asks:
            text_parts[(me - hop) % ring] = attention_with_lse(text_query, block_key, block_value)
        if hop < ring - 1:
            block = exchange.wait()

    image_out, _ = image.result()
    if not has_text:
        return image_out, None
    if not text_asks:
        return image_out, torch.empty_like(text_query)
    text_out, _ = merge_partial_attention([text_parts[index] for index in sorted(text_parts)])
    return image_out, text_out


class KVSource(Protocol):
    """Replaces the K/V that attention is about to use (PipeFusion's stale-KV buffers,
    executor/pipefusion/stale_kv.py); tensors are [B, H, tokens, D]."""

    def local(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the one local kernel call: the group's image tokens, then the text tokens if any."""
        ...

    def ring_blocks(self, key: torch.Tensor, value: torch.Tensor, text_key: torch.Tensor | None,
                    text_value: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's image K/V block that the ring passes around, and the text K/V attended locally."""
        ...


def sequence_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ulysses_group: ProcessGroup | None,
    ring_group: ProcessGroup | None,
    text_query: torch.Tensor | None = None,
    text_key: torch.Tensor | None = None,
    text_value: torch.Tensor | None = None,
    kv_source: KVSource | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """USP attention over the whole sequence from this rank's share of it (Ulysses u x Ring r).

    query/key/value: [B, H, S/(u*r), D], this rank's chunk of the image tokens, all heads.
    text_*: [B, H, T, D], the joint-attention text tokens (every rank holds them whole), or None.
    Returns (image output [B, H, S/(u*r), D], text output [B, H, T, D] or None), equal to full
    attention over image+text tokens restricted to my image tokens (and to all text tokens).
    kv_source: where given, replaces the K/V the kernel attends to, after the all-to-all.
    """
    has_text = text_query is not None
    if has_text and (text_key is None or text_value is None):
        raise ValueError("joint attention needs text_query, text_key and text_value together")

    if group_size(ulysses_group) > 1:
        # Q, K and V travel in one all-to-all (one message per peer instead of three).
        query, key, value = ulysses_scatter_heads([query, key, value], ulysses_group)
    if has_text:
        text_query = local_heads(text_query, ulysses_group)
        text_key = local_heads(text_key, ulysses_group)
        text_value = local_heads(text_value, ulysses_group)

    if group_size(ring_group) > 1:
        if kv_source is not None:
            key, value, text_key, text_value = kv_source.ring_blocks(key, value, text_key, text_value)
        out, text_out = ring_attention(query, key, value, ring_group, text_query, text_key, text_value)
    elif has_text:
        # One fused call over image+text: the image tokens of the group are all here now, the text after them.
        joint_key, joint_value = torch.cat([key, text_key], dim=2), torch.cat([value, text_value], dim=2)
        if kv_source is not None:
            joint_key, joint_value = kv_source.local(joint_key, joint_value)
        joint = F.scaled_dot_product_attention(torch.cat([query, text_query], dim=2), joint_key, joint_value)
        out, text_out = joint[:, :, : query.shape[2]], joint[:, :, query.shape[2] :]
    else:
        if kv_source is not None:
            key, value = kv_source.local(key, value)
        out, text_out = F.scaled_dot_product_attention(query, key, value), None

    out = ulysses_gather_heads(out, ulysses_group)
    if text_out is not None:
        text_out = all_gather_along(text_out, dim=1, group=ulysses_group)
    return out, text_out
