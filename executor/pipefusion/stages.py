"""A transformer cut into pipeline pieces: conditioning, embedding, blocks, head (the base class
here; each family's cutter is its declaration's `stages`, in `executor/families/<family>.py`).

`forward` of a diffusers DiT is: conditioning (timestep / pooled-text / caption embeddings, rotary
tables), patch embedding, a stack of blocks, an output head (norm, projection, unpatchify). Here the
same computation is exposed piece by piece so that
- a pipeline stage can run a contiguous range of "units" (a block; Latte: a spatial+temporal pair;
  Flux: the double-stream blocks then the single-stream blocks),
- any piece can run on one patch (a row strip of token rows) instead of the whole image.

Conditioning is cheap and needed by every block, so every stage computes it from the step's inputs;
the patch embedding lives on the first stage, the head on the last. The state passed from stage to
stage is the "carry": the image tokens of the patch, the patch's strip of the text stream where it
evolves through the blocks (SD3, Flux, CogVideoX: the text is split into M strips like the image
rows, PatchLayout.text_slice, and its K/V are buffered like the image's, see stale_kv.py) and
HunyuanDiT's long skips.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from executor.pipefusion.layout import PatchLayout, take_tokens
from executor.pipefusion.stale_kv import TextPosition

Carry = dict[str, torch.Tensor]
Cond = dict[str, Any]
TokenIndex = slice | torch.Tensor | None  # None: the whole image
Gather = Callable[[torch.Tensor], torch.Tensor] | None


def gathered(tokens: torch.Tensor, gather: Gather) -> torch.Tensor:
    """`tokens`, or under sequence parallelism the whole patch's tokens gathered from the ranks' shares."""
    return tokens if gather is None else gather(tokens)


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch: int, channels: int) -> torch.Tensor:
    """[N, rows*cols, patch*patch*channels] -> [N, channels, rows*patch, cols*patch]."""
    n = tokens.shape[0]
    x = tokens.reshape(n, rows, cols, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, rows * patch, cols * patch)


def rotary_rows(rotary: Any, index: TokenIndex, text_tokens: int = 0, text_index: slice | None = None) -> Any:
    """Rows of a (cos, sin) rotary table for the patch's tokens. The table's first `text_tokens`
    rows are the text's (Flux); of those the patch's text strip `text_index` is kept (None: all)."""
    if rotary is None or (index is None and text_index is None):
        return rotary
    parts = []
    for table in rotary:
        image = table[text_tokens:] if index is None else take_tokens(table[text_tokens:], index, dim=0)
        text = table[:text_tokens] if text_index is None else table[:text_tokens][text_index]
        parts.append(torch.cat([text, image]) if text_tokens else image)
    return tuple(parts)


class StagedTransformer:
    """Base of the per-family decompositions; see the module docstring."""

    family: str = ""
    first_stage_attrs: tuple[str, ...] = ()
    last_stage_attrs: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.config = transformer.config
        # Figures of the last PipeFusion run on this rank (stage units, K/V buffer bytes, bytes sent).
        self.stats: dict[str, Any] = {}
        # Parameters per unit, taken while every block is present (stages are balanced by them).
        self.unit_weights = [
            sum(p.numel() for blocks, i in self.unit_modules(u) for p in blocks[i].parameters()) for u in range(self.unit_count())
        ]

    # -- structure -------------------------------------------------------------------------
    def unit_count(self) -> int:
        raise NotImplementedError

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        """(module list, position) of every block in `unit`."""
        raise NotImplementedError

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        """Self-attention modules over image tokens in `units`, and where their text tokens sit."""
        raise NotImplementedError

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        """The token grid of `latents` (latent rows and columns last, square patches of the
        transformer's `patch_size`, one frame of tokens); Flux and CogVideoX lay theirs out otherwise."""
        p = self.config.patch_size
        return PatchLayout(latents.shape[-2] // p, latents.shape[-1] // p, p, 1, patches)

    # -- computation -----------------------------------------------------------------------
    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        raise NotImplementedError

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        """The carry for the whole image (the first stage's job)."""
        raise NotImplementedError

    def select(self, carry: Carry, index: TokenIndex, text_index: slice | None = None) -> Carry:
        """The carry of one patch out of the whole image's: its image tokens and its text strip."""
        out = dict(carry)
        if index is not None:
            out["hidden"] = take_tokens(carry["hidden"], index, dim=1)
        if text_index is not None and "text" in carry:
            out["text"] = carry["text"][:, text_index]
        return out

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        """Run `unit` on the carry of image tokens `index` (None: all) and, for joint-attention
        families, of the text strip `text_index` (None: the whole text)."""
        raise NotImplementedError

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        """Latent-shaped model output for the patch (or the whole image when `patch` is None).

        `gather`, under sequence parallelism, reassembles the patch's output tokens [N, tokens, C]
        from the ranks' shares before they are unpatchified."""
        raise NotImplementedError

    carries_text = False  # the text stream evolves through the blocks and travels with the patch

    def hidden_size(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def carry_spec(self, cond: Cond, batch: int, tokens: int, text_tokens: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the carry passed from a stage to the next for `tokens` image tokens and a text
        strip of `text_tokens` (skips aside).

        Derived from the configuration alone, so a stage knows what it will receive before it
        receives it (gloo needs the sizes of both ends to agree).
        """
        spec = {"hidden": (batch, tokens, self.hidden_size())}
        if self.carries_text:
            spec["text"] = (batch, text_tokens, self.hidden_size())
        return spec

    def input_problems(self, kwargs: dict[str, Any], cfg: int) -> list[str]:
        """Why the model batch of `kwargs`, cut into `cfg` guidance halves (one per rank), cannot run
        patch by patch (empty: it can)."""
        return []

    def skip_pairs(self) -> list[tuple[int, int, str]]:
        """(producing unit, consuming unit, carry key) of every long skip (HunyuanDiT); each has the
        hidden state's shape."""
        return []

    def carry_batch(self, cond: Cond, batch: int) -> int:
        """Leading size of the carried image tokens for a model batch of `batch`."""
        return batch

    def text_tokens(self, cond: Cond) -> int:
        """Text tokens of the whole joint sequence (0 where text does not join the attention)."""
        return int(cond.get("text_tokens", 0))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], layout: PatchLayout) -> torch.Tensor:
        """Every piece in sequence on the whole image: equals `transformer(...)`."""
        cond = self.condition(latents, timestep, kwargs)
        carry = self.embed(latents, cond)
        for unit in range(self.unit_count()):
            carry = self.run_unit(unit, carry, cond, None)
        return self.head(carry, cond, layout, None)

    def _rows_of(self, layout: PatchLayout, patch: int | None) -> int:
        return layout.token_rows if patch is None else layout.patch_rows(patch)


def staged(transformer: nn.Module, family: str) -> StagedTransformer:
    """The PipeFusion view of `transformer`, cut by its family's stage class (cuts nothing yet)."""
    from executor.families import declaration

    return declaration(family).stages(transformer)
