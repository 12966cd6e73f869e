"""Attention processors that run diffusers' attention layers sequence-parallel.

Each processor computes the layer's projections, norms and rotary embeddings on this rank's tokens
(all per-token operations, so doing them before communication is exact), hands Q/K/V to
`sequence_parallel_attention`, and applies the output projections to its share of the result. The
module's weights are used as they are; nothing of the module is changed but its processor.

A diffusers attention module passes its processor only the keyword arguments that the processor's
`__call__` names (unknown ones are dropped with a warning), so every `__call__` here names each one
its family sends, `image_rotary_emb` included.

Rotary tables reach the processors already cut to this rank's tokens (see executor/sp/__init__.py);
`SequenceShard` says which tokens this rank holds and how many text tokens lead the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch.distributed import ProcessGroup

from costmodel.errors import DitplanError
from executor.sp.attention import KVSource, sequence_parallel_attention
from executor.sp.comm import group_rank, group_size


@dataclass
class SequenceShard:
    """Which image tokens this rank holds in the current forward, shared by the hooks and processors.

    Rank (ring index i, Ulysses index j) holds chunk i*u + j of the image tokens, so each Ulysses
    group holds one contiguous run of the sequence (what ring attention passes around) and the
    all-to-all gathers it in rank order.
    """

    ulysses_group: ProcessGroup | None
    ring_group: ProcessGroup | None
    image_tokens: int = 0  # whole image sequence (Latte: tokens of one frame)
    start: int = 0
    stop: int = 0
    text_tokens: int = 0  # joint-attention text tokens ahead of the image tokens on this rank (Flux single blocks)
    # Flux: True when the text is split over the group like the image (text_rows: mine of the whole
    # text); then each rank's [text; image] chunk is simply its share of one joint sequence.
    text_split: bool = False
    text_rows: slice = field(default_factory=lambda: slice(None))
    agreed_shapes: tuple | None = None  # the input shapes the group last agreed on (executor.sp._agree_on_inputs)

    @property
    def degree(self) -> int:
        return group_size(self.ulysses_group) * group_size(self.ring_group)

    @property
    def chunk(self) -> int:
        """This rank's chunk index in the sequence: ring index * ulysses + Ulysses index."""
        return group_rank(self.ring_group) * group_size(self.ulysses_group) + group_rank(self.ulysses_group)

    def split(self, tokens: int, what: str = "image tokens") -> slice:
        """Fix this forward's token range for a sequence of `tokens`; refuse sizes that do not divide."""
        u, r = group_size(self.ulysses_group), group_size(self.ring_group)
        if tokens % (u * r):
            raise DitplanError(
                f"sequence parallelism: {tokens} {what} do not divide over ulysses={u} x ring={r} = {u * r} ranks; "
                f"the token count must be a multiple of ulysses*ring. Choose a height/width (or frame count) whose "
                f"token count is a multiple of {u * r}, or a smaller sequence-parallel degree."
            )
        per_rank = tokens // (u * r)
        self.image_tokens, self.start, self.stop = tokens, self.chunk * per_rank, (self.chunk + 1) * per_rank
        return slice(self.start, self.stop)


def _heads_first(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, _ = tensor.shape
    return tensor.view(b, s, heads, -1).transpose(1, 2)


def _tokens_first(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = tensor.shape
    return tensor.transpose(1, 2).reshape(b, s, h * d)


def _project_out(attn: torch.nn.Module, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention module's output projection (linear + dropout) on a head-major attention result."""
    return attn.to_out[1](attn.to_out[0](_tokens_first(out).to(dtype)))


def _project(attn: torch.nn.Module, states: torch.Tensor, text: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values [B, heads, tokens, head_dim] of `states` through the layer's image
    projections (text: its separate `add_*` text projections), with its query/key norms."""
    if text:
        projections, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
    else:
        projections, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
    query, key, value = (_heads_first(projection(states), attn.heads) for projection in projections)
    if norms[0] is not None:
        query = norms[0](query)
    if norms[1] is not None:
        key = norms[1](key)
    return query, key, value


def _split_leading_text(
    tensors: tuple[torch.Tensor, ...], text_tokens: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """[B, H, text + image, D] tensors whose first `text_tokens` tokens are text -> (image parts, text parts)."""
    return tuple(t[:, :, text_tokens:] for t in tensors), tuple(t[:, :, :text_tokens] for t in tensors)


def _refuse_mask(attention_mask: torch.Tensor | None, layer: str) -> None:
    # None of the executor's families masks its image self-attention; a mask here would be a new use that
    # the split sequence cannot honour silently.
    if attention_mask is not None:
        raise DitplanError(
            f"sequence parallelism: {layer} received an attention mask; masked self-attention over the split image "
            "sequence is not supported (none of the executor's families passes one)."
        )


class _SequenceParallelProcessor:
    def __init__(self, shard: SequenceShard, kv_source: KVSource | None = None) -> None:
        self.shard = shard
        self.kv_source = kv_source

    def with_kv_source(self, kv_source: KVSource) -> "_SequenceParallelProcessor":
        """This processor for one layer whose attention takes its K/V from `kv_source` (stale KV)."""
        return type(self)(self.shard, kv_source)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        text_query: torch.Tensor | None = None,
        text_key: torch.Tensor | None = None,
        text_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return sequence_parallel_attention(
            query, key, value, self.shard.ulysses_group, self.shard.ring_group, text_query, text_key, text_value,
            self.kv_source,
        )


class SelfAttentionProcessor(_SequenceParallelProcessor):
    """Image self-attention of a diffusers `Attention` (PixArt-α/Σ and Latte spatial `attn1`, HunyuanDiT
    `attn1` with rotary embeddings, SD3.5's second image-only attention)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("SelfAttentionProcessor was installed on a cross-attention layer; cross-attention stays local")
        _refuse_mask(attention_mask, "a self-attention layer")
        residual = hidden_states
        query, key, value = _project(attn, hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        out, _ = self._attend(query, key, value)
        out = _project_out(attn, out, query.dtype)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttentionProcessor(_SequenceParallelProcessor):
    """SD3's MM-DiT joint attention (image tokens first, then text; separate text projections)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        _refuse_mask(attention_mask, "a joint-attention layer")
        query, key, value = _project(attn, hidden_states)
        if encoder_hidden_states is None:  # SD3.5's image-only second attention
            out, _ = self._attend(query, key, value)
            return _project_out(attn, out, query.dtype)

        text_query, text_key, text_value = _project(attn, encoder_hidden_states, text=True)
        out, text_out = self._attend(query, key, value, text_query, text_key, text_value)
        out = _project_out(attn, out, query.dtype)
        text_out = _tokens_first(text_out).to(query.dtype)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return out, text_out


class CogVideoXAttentionProcessor(_SequenceParallelProcessor):
    """CogVideoX's joint attention: one set of projections over [text, image], 3-D rotary on the image part."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        _refuse_mask(attention_mask, "a CogVideoX attention layer")
        text_tokens = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        (query, key, value), (text_query, text_key, text_value) = _split_leading_text(_project(attn, joint), text_tokens)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        out, text_out = self._attend(query, key, value, text_query, text_key, text_value)
        joint_out = torch.cat([_tokens_first(text_out), _tokens_first(out)], dim=1)
        joint_out = attn.to_out[1](attn.to_out[0](joint_out))
        text_out, out = joint_out[:, :text_tokens], joint_out[:, text_tokens:]
        return out, text_out


class FluxAttentionProcessor(_SequenceParallelProcessor):
    """Flux's attention, double-stream (separate text projections) and single-stream (the text tokens
    lead `hidden_states`; their count comes from the shard). Rotary rows are [my text, my image tokens]:
    the whole text, or my share of it where the shard splits the text."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        _refuse_mask(attention_mask, "a Flux attention layer")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # Flux works token-major: [B, S, H, D].
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        double_stream = encoder_hidden_states is not None
        if double_stream:
            if getattr(attn, "fused_projections", False):
                text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_query = attn.add_q_proj(encoder_hidden_states)
                text_key = attn.add_k_proj(encoder_hidden_states)
                text_value = attn.add_v_proj(encoder_hidden_states)
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            text_tokens = encoder_hidden_states.shape[1]
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        else:
            text_tokens = self.shard.text_tokens

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, text + S/sp, D]
        if self.shard.text_split:
            # Every rank holds its share of the text too: [text; image] is one piece of the joint
            # sequence, and attention does not care in which order the keys arrive.
            joint, _ = self._attend(query, key, value)
            text_out, out = joint[:, :, :text_tokens], joint[:, :, text_tokens:]
        else:
            image, text = _split_leading_text((query, key, value), text_tokens)
            out, text_out = self._attend(*image, *text)
        out, text_out = _tokens_first(out).to(query.dtype), _tokens_first(text_out).to(query.dtype)
        if double_stream:
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(text_out.contiguous())
        return torch.cat([text_out, out], dim=1)
