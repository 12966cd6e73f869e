"""Row strips of the image and strips of the joint-attention text (executor/pipefusion/layout.py)."""
from __future__ import annotations

import pytest

from costmodel.errors import DitplanError
from executor.pipefusion.layout import PatchLayout


@pytest.mark.parametrize("patches,text_tokens", [(1, 6), (4, 6), (8, 6), (3, 333), (8, 512), (16, 0)])
def test_text_strips_tile_the_text_in_order_with_sizes_one_apart(patches: int, text_tokens: int) -> None:
    layout = PatchLayout(token_rows=16, row_tokens=16, latent_rows_per_token_row=2, token_frames=1, patches=patches)
    strips = [layout.text_slice(m, text_tokens) for m in range(patches)]
    assert strips[0].start == 0 and strips[-1].stop == text_tokens
    assert all(a.stop == b.start for a, b in zip(strips, strips[1:]))
    sizes = [s.stop - s.start for s in strips]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert layout.text_slice(None, text_tokens) == slice(0, text_tokens)


def test_more_patches_than_token_rows_is_refused() -> None:
    with pytest.raises(DitplanError, match="patches=9"):
        PatchLayout(token_rows=8, row_tokens=8, latent_rows_per_token_row=2, token_frames=1, patches=9)
