"""Stale-KV attention: every self-attention layer keeps a K/V buffer for the whole image.

A patch's queries attend to the whole buffer: its own rows hold the fresh K/V just computed, the
other rows hold what was written last (fresh for patches already run this step, the previous
step's for the rest). Warmup steps run the full image in "fill" mode, which writes every row.
Without warmup the first patch step starts from empty buffers: patch m attends to the rows of
patches 0..m, the only ones computed so far.

The substitution happens at the attention kernel call (torch's scaled_dot_product_attention, or
diffusers' dispatch_attention_fn where a processor uses it), after each family's own projections,
norms, rotary embeddings and (with sequence parallelism inside) all-to-all. Wrapping the kernel
rather than re-writing six processors keeps this independent of their internals: our wrapper
processor marks "this call is layer L" and the kernel hook, active only during that call, swaps
the image part of K and V for the buffer. Joint attention (SD3, Flux, CogVideoX) keeps a second
buffer for the text tokens: the text stream is split into M strips like the image (strip m travels
with patch m, PatchLayout.text_slice), so a patch writes its text strip's rows and its image rows
and attends to the whole text and image buffers; the text runs once per step in total.
"""
from __future__ import annotations

import contextvars
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from executor.pipefusion.layout import put_tokens

Mode = Literal["off", "fill", "patch"]
TextPosition = Literal["none", "first", "last"]

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_active_layer: contextvars.ContextVar["StaleKVProcessor | None"] = contextvars.ContextVar("stale_kv_layer", default=None)


@dataclass
class StaleKVState:
    """What the current transformer call is, shared by every stale-KV layer of one stage.

    mode: "off" (plain attention), "fill" (full image: attend normally and copy K/V into the
    buffers), "patch" (write the patch's rows, attend to the whole buffer).
    buffer_tokens: the rows an image buffer holds (the image's tokens; under Ring, this rank's
    share); text_buffer_tokens: the rows a text buffer holds (the whole text). Needed only
    without warmup, where the first patch step creates the buffers.
    index: the patch's positions in the image token sequence ("patch" mode).
    text_tokens: text tokens in the joint sequence of this call (the patch's text strip in "patch"
    mode, the whole text in "fill" mode; 0 where text does not join).
    text_index: the rows of the patch's text strip in the text buffers ("patch" mode; None: the
    call carries the whole text).
    ring_index: see below (PipeFusion x Ring, executor/pipefusion/hybrid.py).
    """

    mode: Mode = "off"
    index: slice | torch.Tensor | None = None
    text_tokens: int = 0
    text_index: slice | None = None
    buffer_tokens: int = 0
    text_buffer_tokens: int = 0
    # Under ring attention: the rows of this rank's buffer (its share of the image) for the patch.
    ring_index: torch.Tensor | None = None
    processors: list["StaleKVProcessor"] = field(default_factory=list)

    def buffer_bytes(self) -> int:
        return sum(p.buffer_bytes() for p in self.processors)


class _RowBuffer:
    """Full-sequence K/V of one token range of one layer (its image tokens, or its text tokens).

    `written` lists the rows written so far while the buffer is still filling (the first patch step
    without warmup); None once every row holds a value."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.written: torch.Tensor | None = None

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value) if t is not None)

    def fill(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key.contiguous().clone(), value.contiguous().clone()
        self.written = None

    def refresh(self, key: torch.Tensor, value: torch.Tensor, index: slice | torch.Tensor, rows: int,
                seq_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the fresh rows at `index` and return the K/V to attend to: the whole buffer, or
        while it is still filling, only the rows written so far (patches 0..m)."""
        if self.key is None or self.value is None:
            self._start_empty(key, rows, seq_dim)
        put_tokens(self.key, index, seq_dim, key)
        put_tokens(self.value, index, seq_dim, value)
        if self.written is None:
            return self.key, self.value
        self.written[index.to(self.written.device) if isinstance(index, torch.Tensor) else index] = True
        if bool(self.written.all()):
            self.written = None
            return self.key, self.value
        written = self.written.nonzero().squeeze(1)
        return self.key.index_select(seq_dim, written), self.value.index_select(seq_dim, written)

    def _start_empty(self, fresh: torch.Tensor, rows: int, seq_dim: int) -> None:
        """Buffers with no row written: a patch step without a warmup step before it (warmup=0)."""
        if rows <= 0:
            raise RuntimeError("stale-KV buffers are empty and their size is unknown: set StaleKVState.buffer_tokens "
                               "(and text_buffer_tokens for joint attention)")
        shape = list(fresh.shape)
        shape[seq_dim] = rows
        self.key, self.value = fresh.new_zeros(shape), fresh.new_zeros(shape)
        self.written = torch.zeros(rows, dtype=torch.bool, device=fresh.device)


class StaleKVProcessor:
    """Wraps one attention module's own processor; see the module docstring."""

    def __init__(self, inner: Any, state: StaleKVState, text_position: TextPosition) -> None:
        self.inner = inner
        self.state = state
        self.text_position = text_position
        self.image = _RowBuffer()
        self.text = _RowBuffer()  # used by joint-attention layers only
        self._inner_module = sys.modules[type(inner).__module__]

    def buffer_bytes(self) -> int:
        return self.image.bytes() + self.text.bytes()

    def _call(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state.mode == "off":
            return self.inner(attn, *args, **kwargs)
        dispatch_owner = self._inner_module if hasattr(self._inner_module, "dispatch_attention_fn") else None
        original_dispatch = dispatch_owner.dispatch_attention_fn if dispatch_owner else None
        # The sequence-parallel processors' ring attention takes this rank's K/V block as arguments.
        ring_owner = sys.modules.get("executor.sp.attention") if self._inner_module.__name__ == "executor.sp.processors" else None
        original_ring = ring_owner.ring_attention if ring_owner else None
        F.scaled_dot_product_attention = _stale_sdpa
        if dispatch_owner:
            dispatch_owner.dispatch_attention_fn = _make_stale_dispatch(original_dispatch)
        if ring_owner:
            ring_owner.ring_attention = _make_stale_ring(original_ring)
        token = _active_layer.set(self)
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            _active_layer.reset(token)
            F.scaled_dot_product_attention = _ORIGINAL_SDPA
            if dispatch_owner:
                dispatch_owner.dispatch_attention_fn = original_dispatch
            if ring_owner:
                ring_owner.ring_attention = original_ring

    def exchange(self, key: torch.Tensor, value: torch.Tensor, seq_dim: int, text_position: TextPosition | None = None,
                 index: slice | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the buffers from this call's K/V and return the K/V the kernel should use.

        `text_position` and `index` default to the layer's and the state's (the ring hook passes
        its own: its K/V hold no text, and its buffer rows are the rank's share of the image)."""
        text_position = self.text_position if text_position is None else text_position
        index = self.state.index if index is None else index
        text = self.state.text_tokens if text_position != "none" else 0
        image_len = key.shape[seq_dim] - text
        image_start, text_start = (text, 0) if text_position == "first" else (0, image_len)
        image_k, image_v = key.narrow(seq_dim, image_start, image_len), value.narrow(seq_dim, image_start, image_len)
        if self.state.mode == "fill":
            self.image.fill(image_k, image_v)
            if text_position != "none":
                self.text.fill(key.narrow(seq_dim, text_start, text), value.narrow(seq_dim, text_start, text))
            return key, value
        buffer_k, buffer_v = self.image.refresh(image_k, image_v, index, self.state.buffer_tokens, seq_dim)
        if text_position == "none":
            return buffer_k, buffer_v
        text_k, text_v = self.exchange_text(key.narrow(seq_dim, text_start, text), value.narrow(seq_dim, text_start, text), seq_dim)
        if text_position == "first":
            return torch.cat([text_k, buffer_k], dim=seq_dim), torch.cat([text_v, buffer_v], dim=seq_dim)
        return torch.cat([buffer_k, text_k], dim=seq_dim), torch.cat([buffer_v, text_v], dim=seq_dim)

    def exchange_text(self, key: torch.Tensor, value: torch.Tensor, seq_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The text part of `exchange`: this call's text strip K/V in, the text K/V to attend to out."""
        if self.state.mode == "fill":
            self.text.fill(key, value)
            return key, value
        rows = self.state.text_index if self.state.text_index is not None else slice(0, key.shape[seq_dim])
        return self.text.refresh(key, value, rows, self.state.text_buffer_tokens, seq_dim)


def _stale_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    layer = _active_layer.get()
    token = _active_layer.set(None)  # a kernel that calls sdpa inside must not swap twice
    try:
        if layer is not None:
            key, value = layer.exchange(key, value, seq_dim=-2)  # [batch, heads, tokens, head_dim]
        return _ORIGINAL_SDPA(query, key, value, *args, **kwargs)
    finally:
        _active_layer.reset(token)


def _make_stale_dispatch(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def stale_dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = _active_layer.get()
        token = _active_layer.set(None)
        try:
            if layer is not None:
                key, value = layer.exchange(key, value, seq_dim=1)  # [batch, tokens, heads, head_dim]
            return original(query, key, value, *args, **kwargs)
        finally:
            _active_layer.reset(token)

    return stale_dispatch


def _make_stale_ring(original: Callable[..., Any]) -> Callable[..., Any]:
    """Ring attention's image K/V block is this rank's buffer share; its text K/V (every ring rank
    holds the same text strip) is the whole text buffer, attended once locally as before."""
    signature = inspect.signature(original)

    def stale_ring(*args: Any, **kwargs: Any) -> Any:
        layer = _active_layer.get()
        token = _active_layer.set(None)
        try:
            if layer is None:
                return original(*args, **kwargs)
            call = signature.bind(*args, **kwargs)
            given = call.arguments
            given["key"], given["value"] = layer.exchange(given["key"], given["value"], seq_dim=-2, text_position="none",
                                                          index=layer.state.ring_index)
            if given.get("text_key") is not None:
                given["text_key"], given["text_value"] = layer.exchange_text(given["text_key"], given["text_value"], seq_dim=-2)
            return original(*call.args, **call.kwargs)
        finally:
            _active_layer.reset(token)

    return stale_ring


_wrapper_classes: dict[type, type] = {}


def _wrapper_class(inner_type: type) -> type:
    """A StaleKVProcessor subclass whose __call__ shows the inner processor's signature.

    diffusers' attention modules drop every keyword the processor's __call__ does not name, so the
    wrapper must advertise exactly the inner signature (e.g. `image_rotary_emb`).
    """
    cls = _wrapper_classes.get(inner_type)
    if cls is None:
        def __call__(self: StaleKVProcessor, attn: Any, *args: Any, **kwargs: Any) -> Any:
            return self._call(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(inner_type.__call__)  # type: ignore[attr-defined]
        cls = type(f"StaleKV{inner_type.__name__}", (StaleKVProcessor,), {"__call__": __call__})
        _wrapper_classes[inner_type] = cls
    return cls


class StaleKVHandle:
    def __init__(self, state: StaleKVState, originals: list[tuple[Any, Any]]) -> None:
        self.state = state
        self._originals = originals

    def remove(self) -> None:
        for module, processor in self._originals:
            module.processor = processor
        self.state.processors.clear()


def install_stale_kv(layers: list[tuple[Any, TextPosition]], state: StaleKVState) -> StaleKVHandle:
    """Wrap the processor of each (attention module, where its text tokens sit) with stale KV."""
    originals = []
    for module, text_position in layers:
        inner = module.processor
        wrapper = _wrapper_class(type(inner))(inner, state, text_position)
        originals.append((module, inner))
        module.processor = wrapper
        state.processors.append(wrapper)
    return StaleKVHandle(state, originals)
