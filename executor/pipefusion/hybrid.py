"""PipeFusion x sequence parallelism: inside each pipeline stage, the patch's tokens are split over
an SP group of ulysses x ring ranks, with the SP helper's attention processors (executor.sp).

Stale K/V stays exact because attention does not depend on the order of its keys:
- Ulysses: the stale-KV layer, the SP processor's `KVSource`, is asked for the K/V of the local
  attention call after the all-to-all, where K/V hold every token of the patch for this rank's
  heads; the buffer covers the whole image for those heads.
  (After the all-to-all the SP code puts joint-attention text after the image tokens.)
- Ring: the ring passes K/V blocks around; each ring rank's buffer covers its own 1/r of the image
  (its share of every patch) and is the block it sends around, so the queries meet every token's
  K/V exactly once per step: fresh where already computed, stale elsewhere. Text K/V travel apart:
  every ring rank holds the patch's text strip whole, so each keeps the same whole-text buffer and
  hands it to ring attention as its local text block.

Token shares: in a patch, SP rank c (= ring index * u + Ulysses index) holds the c-th contiguous
1/(u*r) of the patch's tokens. For the whole image (warmup steps) under Ring, a rank holds its
share of every patch, in patch order, so the buffer rows a ring rank fills in warmup are exactly
the tokens it later refreshes patch by patch; without Ring it holds the c-th 1/u of the image.
"""
from __future__ import annotations

from typing import Any

import torch

from costmodel.errors import DitplanError
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import StagedTransformer, TokenIndex
from executor.pipefusion.stale_kv import TextPosition


def _positions(index: slice | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.arange(index.start, index.stop, device=device) if isinstance(index, slice) else index


class SequenceInStage:
    """The SP split of one stage: installs the SP processors and decides each rank's tokens."""

    def __init__(self, stages: StagedTransformer, units: range, layout: PatchLayout, ulysses_group: Any, ring_group: Any,
                 device: torch.device | str = "cpu") -> None:
        from executor.sp.comm import group_rank, group_size
        from executor.sp.processors import SequenceShard

        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.u, self.r = group_size(ulysses_group), group_size(ring_group)
        self.degree = self.u * self.r
        self.chunk = group_rank(ring_group) * self.u + group_rank(ulysses_group)
        self.layout, self.device = layout, device
        self._ring_rows: dict[int, torch.Tensor] = {}
        self.shard = SequenceShard(ulysses_group, ring_group)
        self._originals: list[tuple[Any, Any]] = []
        layers = [module for module, _ in stages.stale_layers(units)]
        for module in layers:  # every check before anything is installed
            if module.heads % self.u:
                raise DitplanError(
                    f"PipeFusion x Ulysses: attention layers with {module.heads} heads do not divide over ulysses={self.u}; "
                    "heads % ulysses must be 0."
                )
        from executor.families import declaration

        processor = declaration(stages.family).sp_processor(self.shard)
        for module in layers:
            self._originals.append((module, module.processor))
            module.processor = processor

    def remove(self) -> None:
        for module, original in self._originals:
            module.processor = original
        self._originals = []

    def text_position(self, native: TextPosition) -> TextPosition:
        return "last" if native != "none" and self.r == 1 else "none"

    def _sub(self, m: int) -> int:
        return self.layout.patch_tokens(m) // self.degree

    def share(self, m: int | None, text_tokens: int) -> TokenIndex:
        """Image-sequence positions of the tokens this rank computes for patch m (None: the image);
        `text_tokens`: the joint text tokens of the call (patch m's text strip, or the whole text)."""
        self.shard.text_tokens = text_tokens  # Flux single-stream blocks read it
        if m is not None:
            patch, sub = self.layout.token_index(m, self.device), self._sub(m)
            if isinstance(patch, slice):
                return slice(patch.start + self.chunk * sub, patch.start + (self.chunk + 1) * sub)
            return patch[self.chunk * sub:(self.chunk + 1) * sub]
        if self.r == 1:
            per_rank = self.layout.image_tokens // self.degree
            return slice(self.chunk * per_rank, (self.chunk + 1) * per_rank)
        return torch.cat([_positions(self.share(k, text_tokens), self.device) for k in range(self.layout.patches)])

    def ring_rows(self, m: int) -> torch.Tensor:
        """Rows of this ring rank's buffer holding patch m's tokens (as they arrive after the all-to-all);
        made once per patch, on the device (layers index with it at every call)."""
        if m not in self._ring_rows:
            rows_per_rank = self.layout.image_tokens // self.degree
            before = sum(self._sub(k) for k in range(m))
            self._ring_rows[m] = torch.cat([torch.arange(j * rows_per_rank + before, j * rows_per_rank + before + self._sub(m))
                                            for j in range(self.u)]).to(self.device)
        return self._ring_rows[m]

    def gather(self, tokens: torch.Tensor, m: int | None, text_tokens: int) -> torch.Tensor:
        """The output tokens of the whole patch (image) from every rank's share, in sequence order."""
        from executor.sp.comm import all_gather_along

        whole = all_gather_along(all_gather_along(tokens, dim=1, group=self.ulysses_group), dim=1, group=self.ring_group)
        if m is not None or self.r == 1:
            return whole
        # Shares of the whole image are per patch under Ring: put the tokens back in image order.
        order = torch.cat([_positions(self._share_of(chunk), self.device) for chunk in range(self.degree)])
        return whole[:, torch.argsort(order).to(whole.device)]

    def _share_of(self, chunk: int) -> torch.Tensor:
        mine = self.chunk
        self.chunk = chunk
        try:
            return _positions(self.share(None, self.shard.text_tokens), self.device)
        finally:
            self.chunk = mine
