"""Stale-KV attention: every self-attention layer keeps a K/V buffer for the whole image.

A patch's queries attend to the whole buffer: its own rows hold the fresh K/V just computed, the
other rows hold what was written last (fresh for patches already run this step, the previous
step's for the rest). Warmup steps run the full image in "fill" mode, which writes every row.
Without warmup the first patch step starts from empty buffers: patch m attends to the rows of
patches 0..m, the only ones computed so far.

The substitution happens at the attention kernel call, after each family's own projections, norms,
rotary embeddings and (with sequence parallelism inside) all-to-all, and nothing global is touched:
each stale-KV layer's processor is replaced by a wrapper around it (`install_stale_kv`), and the
wrapper reaches the kernel call of its own layer only.
- diffusers' processors: the wrapper runs the inner processor under a torch function mode
  (`_KernelKV`), a scope that lasts for that one call and sees the processor's call of
  torch's scaled_dot_product_attention (directly, or through diffusers' dispatch_attention_fn with
  its native backend); the mode swaps the image part of K and V for the buffer. A layer whose
  processor reaches no such call (an attention backend outside torch) is refused, never run
  fresh-only.
- the sequence-parallel processors (executor.sp, PipeFusion x Ulysses/Ring): the wrapper's inner
  processor is a copy bound to the wrapper as its `KVSource`, which sequence-parallel attention
  asks for the K/V of its local kernel call, or of the ring's local block.
Wrapping the kernel call rather than re-writing six processors keeps this independent of their
internals. Joint attention (SD3, Flux, CogVideoX) keeps a second
buffer for the text tokens: the text stream is split into M strips like the image (strip m travels
with patch m, PatchLayout.text_slice), so a patch writes its text strip's rows and its image rows
and attends to the whole text and image buffers; the text runs once per step in total.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from executor.pipefusion.layout import put_tokens

Mode = Literal["off", "fill", "patch"]
TextPosition = Literal["none", "first", "last"]



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
        self.state = state
        self.text_position = text_position
        self.image = _RowBuffer()
        self.text = _RowBuffer()  # used by joint-attention layers only
        # A sequence-parallel processor asks its KV source itself; diffusers' are reached by a mode.
        self.asks_kv_source = hasattr(inner, "with_kv_source")
        self.inner = inner.with_kv_source(self) if self.asks_kv_source else inner

    def buffer_bytes(self) -> int:
        return self.image.bytes() + self.text.bytes()

    def _call(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state.mode == "off" or self.asks_kv_source:
            return self.inner(attn, *args, **kwargs)
        kernel = _KernelKV(self)
        with kernel:
            out = self.inner(attn, *args, **kwargs)
        if kernel.calls == 0:
            raise RuntimeError(
                f"stale KV: {type(self.inner).__name__} made no call of torch's scaled_dot_product_attention, so its "
                "K/V could not be swapped for the buffers; run diffusers' attention with its native backend."
            )
        return out

    def local(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KVSource: the K/V [batch, heads, tokens, head_dim] of sequence-parallel attention's local kernel call."""
        if self.state.mode == "off":
            return key, value
        return self.exchange(key, value, seq_dim=-2)

    def ring_blocks(self, key: torch.Tensor, value: torch.Tensor, text_key: torch.Tensor | None,
                    text_value: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """KVSource: ring attention's image block is this rank's buffer share; its text K/V (every ring
        rank holds the same text strip) is the whole text buffer, attended once locally as before."""
        if self.state.mode == "off":
            return key, value, text_key, text_value
        key, value = self.exchange(key, value, seq_dim=-2, text_position="none", index=self.state.ring_index)
        if text_key is not None and text_value is not None:
            text_key, text_value = self.exchange_text(text_key, text_value, seq_dim=-2)
        return key, value, text_key, text_value

    def exchange(self, key: torch.Tensor, value: torch.Tensor, seq_dim: int, text_position: TextPosition | None = None,
                 index: slice | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the buffers from this call's K/V and return the K/V the kernel should use.

        `text_position` and `index` default to the layer's and the state's (`ring_blocks` passes
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


class _KernelKV(TorchFunctionMode):
    """For the length of one layer's processor call: its scaled_dot_product_attention calls attend
    to the layer's buffered K/V. Torch functions called from here on are not seen again (torch
    leaves the mode while its handler runs), so the buffer updates go straight through."""

    def __init__(self, layer: StaleKVProcessor) -> None:
        super().__init__()
        self.layer = layer
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = _SDPA_SIGNATURE.bind(*args, **kwargs)
        given = call.arguments
        # [batch, heads, tokens, head_dim]; diffusers' native dispatch has put the heads first by now.
        given["key"], given["value"] = self.layer.exchange(given["key"], given["value"], seq_dim=-2)
        self.calls += 1
        return func(*call.args, **call.kwargs)


_SDPA_SIGNATURE = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                     for name in ("query", "key", "value")]
                                    + [inspect.Parameter("rest", inspect.Parameter.VAR_POSITIONAL),
                                       inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)])


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

    def release_buffers(self) -> None:
        """Drop the K/V these layers hold (an expert that will not run again); they fill afresh if they do."""
        for module, _ in self._originals:
            module.processor.image, module.processor.text = _RowBuffer(), _RowBuffer()

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
