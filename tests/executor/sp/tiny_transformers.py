"""Tiny random-weight transformers of the six families, with inputs shaped as their pipelines pass them.

Each has at least 4 attention blocks (Flux: 2 double- and 2 single-stream; HunyuanDiT: 6, so its long
skips pair up) and hidden 64 = 4 heads x 16, so every SP layout up to degree 4 divides. Rotary tables
(HunyuanDiT, CogVideoX) are random: the check only needs each row to land on its own token, and
random rows catch a misplaced row where smooth ones might not.
"""
from __future__ import annotations

from typing import Any

import torch

HEADS, HEAD_DIM, HIDDEN, TEXT_DIM, TEXT_TOKENS = 4, 16, 64, 32, 6


def build(family: str, heads: int = HEADS, seed: int = 0) -> torch.nn.Module:
    """The family's diffusers transformer, seeded, fp32, in eval mode."""
    from diffusers import (
        CogVideoXTransformer3DModel,
        FluxTransformer2DModel,
        HunyuanDiT2DModel,
        LatteTransformer3DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    torch.manual_seed(seed)
    if family == "pixart":
        model = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=4,
            cross_attention_dim=heads * HEAD_DIM, sample_size=16, caption_channels=TEXT_DIM,
        )
    elif family == "sd3":
        # Block 0 has SD3.5's extra image-only attention; the last block is context_pre_only.
        model = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=HEAD_DIM, num_attention_heads=heads,
            joint_attention_dim=TEXT_DIM, caption_projection_dim=heads * HEAD_DIM, pooled_projection_dim=TEXT_DIM,
            out_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
    elif family == "flux":
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
        )
    elif family == "hunyuan":
        model = HunyuanDiT2DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, patch_size=2, sample_size=16,
            hidden_size=heads * HEAD_DIM, num_layers=6, cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, text_len=TEXT_TOKENS, text_len_t5=TEXT_TOKENS, use_style_cond_and_image_meta_size=False,
        )
    elif family == "cogvideox":
        model = CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=TEXT_DIM, num_layers=4, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
            max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=True,
        )
    elif family == "latte":
        model = LatteTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=4,
            cross_attention_dim=heads * HEAD_DIM, sample_size=8, patch_size=2, video_length=3, caption_channels=TEXT_DIM,
            norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.eval()


def inputs(family: str, batch: int = 2, size: int = 16, seed: int = 1) -> dict[str, Any]:
    """Keyword arguments of one transformer call; `size` is the latent height = width (2-D families)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    timestep = torch.tensor([500.0, 250.0][:batch] + [100.0] * max(0, batch - 2))
    text = randn(batch, TEXT_TOKENS, TEXT_DIM)
    # Padded prompts: the cross-attention mask must keep working on each rank's share of the queries.
    text_mask = torch.ones(batch, TEXT_TOKENS)
    text_mask[-1, -2:] = 0
    if family == "pixart":
        return dict(hidden_states=randn(batch, 4, size, size), encoder_hidden_states=text, timestep=timestep,
                    encoder_attention_mask=text_mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    if family == "sd3":
        return dict(hidden_states=randn(batch, 4, size, size), encoder_hidden_states=text,
                    pooled_projections=randn(batch, TEXT_DIM), timestep=timestep, return_dict=False)
    if family == "flux":
        rows, cols = size // 2, size // 2
        image_ids = torch.zeros(rows * cols, 3)
        image_ids[:, 1] = torch.arange(rows).repeat_interleave(cols)
        image_ids[:, 2] = torch.arange(cols).repeat(rows)
        return dict(hidden_states=randn(batch, rows * cols, 16), encoder_hidden_states=text,
                    pooled_projections=randn(batch, TEXT_DIM), timestep=timestep / 1000, img_ids=image_ids,
                    txt_ids=torch.zeros(TEXT_TOKENS, 3), return_dict=False)
    if family == "hunyuan":
        tokens = (size // 2) ** 2
        return dict(hidden_states=randn(batch, 4, size, size), timestep=timestep, encoder_hidden_states=text,
                    text_embedding_mask=text_mask.long(), encoder_hidden_states_t5=randn(batch, TEXT_TOKENS, TEXT_DIM),
                    text_embedding_mask_t5=torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
                    image_rotary_emb=(randn(tokens, HEAD_DIM), randn(tokens, HEAD_DIM)), return_dict=False)
    if family == "cogvideox":
        frames, side = 2, size // 2
        tokens = frames * (side // 2) ** 2
        return dict(hidden_states=randn(batch, frames, 4, side, side), encoder_hidden_states=text, timestep=timestep,
                    image_rotary_emb=(randn(tokens, HEAD_DIM), randn(tokens, HEAD_DIM)), return_dict=False)
    if family == "latte":
        return dict(hidden_states=randn(batch, 4, 3, size // 2, size // 2), timestep=timestep,
                    encoder_hidden_states=text, enable_temporal_attentions=True, return_dict=False)
    raise ValueError(f"unknown family {family!r}")
