"""Pieces the families' tiny single-transformer builders share (`Family.tiny_transformer`).

The tiny transformers are for tests that run one transformer, without a pipeline or text encoder:
text tokens are random states of `TEXT_TOKENS` x `TEXT_DIM`, the last prompt padded by two tokens
(masks must keep working on each rank's share of the queries), and rotary tables are random (a
row that lands on the wrong token shows, where smooth tables might hide it).
"""
from __future__ import annotations

import torch

TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 6, 16, 12


class TinyRandom:
    """The seeded random inputs of one tiny build (its own generator: the weights' seed is apart)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed + 1)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def text(self, batch: int) -> torch.Tensor:
        return self.randn(batch, TEXT_TOKENS, TEXT_DIM)

    def rotary(self, tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.randn(tokens, head_dim), self.randn(tokens, head_dim)

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in eval mode with its zero-initialised weights (output heads, modulation tables)
        made random, so every part of the model shows in the output."""
        with torch.no_grad():
            for param in model.parameters():
                if torch.count_nonzero(param) == 0:
                    param.normal_(0, 0.05, generator=self.generator)
        return model.eval()


def padded_text_mask(batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A keep (1) / drop (0) mask over the text tokens; the last prompt ends in two padding tokens."""
    mask = torch.ones(batch, TEXT_TOKENS, dtype=dtype)
    mask[-1, -2:] = 0
    return mask
