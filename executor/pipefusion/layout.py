"""How the latent is cut into PipeFusion patches: row strips of whole token rows.

A patch is a contiguous range of token rows. In the latent tensor it is a slice of dimension -2
(latent rows, or packed tokens for Flux), and in the image token sequence it is one contiguous
token range per token frame (several ranges for CogVideoX, whose sequence is frame-major).
The text stream of joint-attention models is cut the same way into M strips of text tokens
(`text_slice`). Every size here follows from the shapes alone, so all ranks agree on every message
size without exchanging any.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from costmodel.errors import DitplanError


@dataclass(frozen=True)
class PatchLayout:
    """Row-strip layout of one latent.

    token_rows: token rows of the image (latent height / patch size).
    row_tokens: tokens per token row (latent width / patch size).
    latent_rows_per_token_row: how many indices of latent dimension -2 one token row spans
        (the patch size for [.., H, W] latents; `row_tokens` for Flux's packed [B, S, C] latents).
    token_frames: frames in one attention sequence (CogVideoX: latent frames; others 1).
    patches: the number of strips M.
    """

    token_rows: int
    row_tokens: int
    latent_rows_per_token_row: int
    token_frames: int
    patches: int

    def __post_init__(self) -> None:
        if self.patches < 1 or self.patches > self.token_rows:
            raise DitplanError(
                f"PipeFusion: patches={self.patches} cannot split an image of {self.token_rows} token rows; "
                f"each patch needs at least one whole token row, so patches must be between 1 and {self.token_rows}."
            )

    @cached_property
    def row_bounds(self) -> tuple[tuple[int, int], ...]:
        """Token-row range [start, stop) of each patch; sizes differ by at most one row."""
        base, extra = divmod(self.token_rows, self.patches)
        bounds, start = [], 0
        for m in range(self.patches):
            stop = start + base + (1 if m < extra else 0)
            bounds.append((start, stop))
            start = stop
        return tuple(bounds)

    @property
    def frame_tokens(self) -> int:
        return self.token_rows * self.row_tokens

    @property
    def image_tokens(self) -> int:
        return self.token_frames * self.frame_tokens

    def patch_rows(self, m: int) -> int:
        start, stop = self.row_bounds[m]
        return stop - start

    def patch_tokens(self, m: int) -> int:
        return self.patch_rows(m) * self.row_tokens * self.token_frames

    def latent_slice(self, m: int) -> slice:
        """The patch's slice of latent dimension -2."""
        start, stop = self.row_bounds[m]
        unit = self.latent_rows_per_token_row
        return slice(start * unit, stop * unit)

    def text_slice(self, m: int | None, text_tokens: int) -> slice:
        """The text strip that travels with patch m (None: the whole text) out of `text_tokens`.

        MM-DiT text is split into M strips like the image rows, so a step runs the text once in
        total; sizes differ by at most one token (strips may be empty when text_tokens < M)."""
        if m is None:
            return slice(0, text_tokens)
        base, extra = divmod(text_tokens, self.patches)
        start = m * base + min(m, extra)
        return slice(start, start + base + (1 if m < extra else 0))

    def token_index(self, m: int, device: torch.device | str = "cpu") -> slice | torch.Tensor:
        """Positions of the patch's tokens in the image sequence (a slice when contiguous, else an
        index tensor on `device`, made once per device: layers index with it at every call)."""
        start, stop = self.row_bounds[m]
        lo, hi = start * self.row_tokens, stop * self.row_tokens
        if self.token_frames == 1:
            return slice(lo, hi)
        made = self.__dict__.setdefault("_indices", {})
        key = (m, str(device))
        if key not in made:
            made[key] = torch.cat([torch.arange(f * self.frame_tokens + lo, f * self.frame_tokens + hi)
                                   for f in range(self.token_frames)]).to(device)
        return made[key]

    def take_latent(self, latents: torch.Tensor, m: int) -> torch.Tensor:
        return latents[..., self.latent_slice(m), :]

    def put_latent(self, latents: torch.Tensor, m: int, strip: torch.Tensor) -> None:
        latents[..., self.latent_slice(m), :] = strip


def patch_problems(layout: "PatchLayout", sp: int) -> list[str]:
    """Why this layout cannot run with its patches split over `sp` sequence-parallel ranks (empty: it can).

    Each rank of the SP group takes an equal contiguous share of every patch's tokens (and of the
    image's in warmup steps), so every one of those counts must divide by sp."""
    if sp == 1:
        return []
    counts = [layout.image_tokens, *(layout.patch_tokens(m) for m in range(layout.patches))]
    uneven = [count for count in counts if count % sp]
    if not uneven:
        return []
    return [
        f"a patch of {uneven[0]} image tokens does not divide over ulysses x ring = {sp} ranks; with patches={layout.patches} "
        f"every patch's token count (token rows x {layout.row_tokens * layout.token_frames} tokens) must be a multiple of {sp}"
    ]


def take_tokens(tokens: torch.Tensor, index: slice | torch.Tensor, dim: int) -> torch.Tensor:
    """Select image tokens along `dim` by a slice or an index tensor."""
    if isinstance(index, slice):
        return tokens.narrow(dim, index.start, index.stop - index.start)
    return tokens.index_select(dim, index.to(tokens.device))


def put_tokens(buffer: torch.Tensor, index: slice | torch.Tensor, dim: int, values: torch.Tensor) -> None:
    """Overwrite the tokens at `index` along `dim` of `buffer` in place."""
    if isinstance(index, slice):
        buffer.narrow(dim, index.start, index.stop - index.start).copy_(values)
    else:
        buffer.index_copy_(dim, index.to(buffer.device), values)
