"""Sequence parallelism (Ulysses, Ring, USP) for the executor's DiT families, on an unmodified diffusers transformer.

`enable_sequence_parallel(transformer, family, ulysses_group, ring_group)` makes one ordinary
`transformer(**kwargs)` call, run on every rank of the SP group with the same inputs, return the
serial output on every rank while each rank computes only its share of the image tokens:

* a forward hook on the patch embedding keeps this rank's chunk of the image tokens; joint-attention
  text tokens stay whole on every rank (SD3, CogVideoX), except Flux's, which are split like the
  image tokens where their count divides (see `executor.families.flux`);
* rotary tables are cut to the same tokens (a pre-hook on the transformer for tables passed in,
  a hook on Flux's position embedder for the one it computes);
* SP attention processors replace the image self/joint attention processors; cross-attention to
  text, Latte's temporal attention (across frames at one spatial position) and HunyuanDiT's long
  skips are per-token and stay local;
* a forward hook on the output projection `proj_out` (per token) all-gathers the sequence, so the
  unpatchify that follows sees every token.

Where each family embeds its tokens and which of its attention layers see all of them is the
family's `install_sequence_parallel` (in `executor/families/<family>.py`), built from the helpers
here (`split_tokens`, `slice_rotary_argument`, `install_processor`). `handle.remove()` restores the
original processors and removes the hooks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed import ProcessGroup

from costmodel.errors import DitplanError
from executor.sp.attention import sequence_parallel_attention
from executor.sp.comm import agree_shapes, all_gather_along, group_size
from executor.sp.processors import SequenceShard

__all__ = ["SequenceParallelHandle", "SequenceShard", "enable_sequence_parallel", "install_processor",
           "sequence_parallel_attention", "slice_rotary_argument", "split_tokens"]


@dataclass
class SequenceParallelHandle:
    """What `enable_sequence_parallel` installed; `remove()` puts the transformer back as it was."""

    shard: SequenceShard
    _hooks: list[Any] = field(default_factory=list)
    _processors: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)

    _transformer: torch.nn.Module | None = None

    @property
    def layers(self) -> list[torch.nn.Module]:
        """The attention layers that run an SP processor."""
        return [module for module, _ in self._processors]

    def add_hook(self, hook: Any) -> None:
        """Keep a registered hook (a torch RemovableHandle) so that `remove()` removes it."""
        self._hooks.append(hook)

    def new_generation(self) -> None:
        """The next forward checks its input shapes across the group again (see `_agree_on_inputs`)."""
        self.shard.agreed_shapes = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for module, original in self._processors:
            module.set_processor(original)
        self._hooks, self._processors = [], []
        if self._transformer is not None:
            del self._transformer._ditplan_sequence_parallel
            self._transformer = None


def enable_sequence_parallel(
    transformer: torch.nn.Module,
    family: str,
    ulysses_group: ProcessGroup | None,
    ring_group: ProcessGroup | None,
) -> SequenceParallelHandle:
    """Run `transformer` sequence-parallel over Ulysses x Ring groups (None for a degree-1 axis).

    The Ulysses group must hold the nearest ranks and the ring group the ranks across Ulysses groups,
    as `costmodel.config.Placement` builds them. Refuses (DitplanError) heads that do not divide over
    the Ulysses degree now, and token counts that do not divide over the SP degree at the first call.
    """
    from executor.families import declaration

    install = declaration(family).install_sequence_parallel
    shard = SequenceShard(ulysses_group, ring_group)
    handle = SequenceParallelHandle(shard)
    if shard.degree == 1:
        return handle
    if getattr(transformer, "_ditplan_sequence_parallel", False):
        raise DitplanError("sequence parallelism is already enabled on this transformer; call remove() on its handle first.")
    transformer._ditplan_sequence_parallel = True
    handle._transformer = transformer
    try:
        # First pre-hook: sizes are checked before any other hook or layer communicates.
        handle._hooks.append(transformer.register_forward_pre_hook(_agree_on_inputs(shard), with_kwargs=True))
        install(transformer, shard, handle)
        handle._hooks.append(transformer.proj_out.register_forward_hook(_gather_tokens(shard)))
    except BaseException:
        handle.remove()
        raise
    return handle


# ---------------------------------------------------------------------------------------------------
# Hooks shared by the families


def _agree_on_inputs(shard: SequenceShard) -> Callable:
    """Before any collective of a forward: every rank must pass tensors of the same shapes.

    Checked when this rank's shapes differ from the last ones the group agreed on (the first forward
    of a generation, see `SequenceParallelHandle.new_generation`), not at every forward: the check
    reads the gathered shapes on the host, a synchronisation the steps of one generation, all of
    the same shapes, need not pay."""

    def hook(module, args, kwargs):
        shapes: dict[str, tuple[int, ...]] = {}
        named = [*((f"argument {i}", value) for i, value in enumerate(args)), *((name, kwargs[name]) for name in sorted(kwargs))]
        for name, value in named:
            parts = value if isinstance(value, (tuple, list)) else (value,)
            for index, tensor in enumerate(parts):
                if isinstance(tensor, torch.Tensor):
                    shapes[f"{name}[{index}]" if len(parts) > 1 else name] = tuple(tensor.shape)
        signature = tuple(shapes.items())
        if signature == shard.agreed_shapes:
            return
        agree_shapes(shapes, shard.ulysses_group, "transformer inputs")
        agree_shapes(shapes, shard.ring_group, "transformer inputs")
        shard.agreed_shapes = signature

    return hook


def split_tokens(shard: SequenceShard, what: str = "image tokens") -> Callable:
    """Forward hook on an embedding that emits [batch, tokens, hidden]: keep this rank's tokens."""

    def hook(module, args, output):
        # A copy, not a view: the whole sequence's embedding need not stay alive through the forward.
        return output[:, shard.split(output.shape[1], what)].contiguous()

    return hook


def _gather_tokens(shard: SequenceShard) -> Callable:
    """Forward hook on `proj_out`: reassemble the sequence, Ulysses chunks first, then Ring blocks."""

    def hook(module, args, output):
        output = all_gather_along(output, dim=1, group=shard.ulysses_group)
        return all_gather_along(output, dim=1, group=shard.ring_group)

    return hook


def slice_rotary_argument(shard: SequenceShard, transformer: torch.nn.Module) -> Callable:
    """Pre-hook on the transformer: cut the `image_rotary_emb` the pipeline passes ((cos, sin), one row
    per image token) to this rank's tokens, leaving the call's other arguments as they were passed."""
    position = list(inspect.signature(transformer.forward).parameters).index("image_rotary_emb")

    def cut(table):
        rows = shard.split(table[0].shape[0])
        return tuple(part[rows] for part in table)

    def hook(module, args, kwargs):
        if kwargs.get("image_rotary_emb") is not None:
            return args, {**kwargs, "image_rotary_emb": cut(kwargs["image_rotary_emb"])}
        if len(args) > position and args[position] is not None:
            return (*args[:position], cut(args[position]), *args[position + 1 :]), kwargs
        return None

    return hook


def install_processor(handle: SequenceParallelHandle, module: torch.nn.Module, processor: Any) -> None:
    """Give attention layer `module` the SP `processor` (restored by `handle.remove()`); refuses a layer
    whose heads do not divide over the Ulysses degree, or that normalises over the whole sequence."""
    heads = module.heads
    u = group_size(handle.shard.ulysses_group)
    if heads % u:
        raise DitplanError(
            f"sequence parallelism: attention layers with {heads} heads do not divide over ulysses={u} ranks; "
            f"heads % ulysses must be 0 (use a Ulysses degree that divides {heads}, and Ring for the rest)."
        )
    if getattr(module, "group_norm", None) is not None or getattr(module, "spatial_norm", None) is not None:
        raise DitplanError("sequence parallelism: an attention layer normalises over the whole sequence (group/spatial norm); it cannot be split by tokens.")
    handle._processors.append((module, module.processor))
    module.set_processor(processor)
