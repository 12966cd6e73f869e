"""Tiny random transformers of each family with matching model inputs, for single-transformer checks.

Built straight from configs (no pipeline, no text encoder): 4 blocks (Flux 2+2), 4 heads, an
8x8 token grid (16 latent rows) so up to 8 patches fit.
"""
from __future__ import annotations

import json
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import torch

FAMILIES = ("pixart", "sd3", "flux", "hunyuan", "cogvideox", "latte")
HEADS, HEAD_DIM = 4, 8
HIDDEN = HEADS * HEAD_DIM


def build(family: str, seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4,
          heads: int = HEADS, head_dim: int = HEAD_DIM) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """(transformer in eval mode, initial latents, transformer kwargs except latents and timestep)."""
    from diffusers import (CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanDiT2DModel, LatteTransformer3DModel,
                           PixArtTransformer2DModel, SD3Transformer2DModel)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = heads * head_dim
    text_tokens, text_dim = 6, 16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if family == "pixart":
        model = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
            cross_attention_dim=hidden, caption_channels=text_dim, sample_size=rows, patch_size=2, norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
        latents = randn(batch, 4, rows, cols)
        kwargs = {"encoder_hidden_states": randn(batch, text_tokens, text_dim), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    elif family == "sd3":
        model = SD3Transformer2DModel(
            sample_size=rows, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=text_dim, caption_projection_dim=hidden, pooled_projection_dim=12, out_channels=4, pos_embed_max_size=rows,
        )
        latents = randn(batch, 4, rows, cols)
        kwargs = {"encoder_hidden_states": randn(batch, text_tokens, text_dim), "pooled_projections": randn(batch, 12)}
    elif family == "flux":
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers // 2, num_single_layers=layers - layers // 2, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )
        r, c = rows // 2, cols // 2
        img_ids = torch.zeros(r, c, 3)
        img_ids[..., 1] = torch.arange(r)[:, None]
        img_ids[..., 2] = torch.arange(c)[None, :]
        latents = randn(batch, r * c, 16)
        kwargs = {"encoder_hidden_states": randn(batch, text_tokens, text_dim), "pooled_projections": randn(batch, 12),
                  "txt_ids": torch.zeros(text_tokens, 3), "img_ids": img_ids.reshape(-1, 3), "guidance": torch.full((batch,), 3.5)}
    elif family == "hunyuan":
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        model = HunyuanDiT2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, patch_size=2, sample_size=rows, hidden_size=hidden,
            num_layers=layers, cross_attention_dim=text_dim, cross_attention_dim_t5=text_dim, pooled_projection_dim=12, text_len=text_tokens,
            text_len_t5=text_tokens, use_style_cond_and_image_meta_size=False,
        )
        latents = randn(batch, 4, rows, cols)
        r, c = rows // 2, cols // 2
        rotary = get_2d_rotary_pos_embed(head_dim, ((0, 0), (r, c)), (r, c), use_real=True)
        kwargs = {"encoder_hidden_states": randn(batch, text_tokens, text_dim), "text_embedding_mask": torch.ones(batch, text_tokens, dtype=torch.long),
                  "encoder_hidden_states_t5": randn(batch, text_tokens, text_dim), "text_embedding_mask_t5": torch.ones(batch, text_tokens, dtype=torch.long),
                  "image_rotary_emb": rotary}
    elif family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        frames = 2
        head_dim = max(head_dim, 16)  # its 3-D rotary splits head_dim 2:3:3 into even parts
        model = CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, num_layers=layers, text_embed_dim=text_dim,
            sample_width=cols, sample_height=rows, sample_frames=(frames - 1) * 4 + 1, max_text_seq_length=text_tokens, patch_size=2,
            time_embed_dim=hidden, use_rotary_positional_embeddings=True,
        )
        latents = randn(batch, frames, 4, rows, cols)
        cos, sin = get_3d_rotary_pos_embed(head_dim, ((0, 0), (rows // 2, cols // 2)), (rows // 2, cols // 2), frames)
        kwargs = {"encoder_hidden_states": randn(batch, text_tokens, text_dim), "image_rotary_emb": (cos, sin)}
    elif family == "latte":
        frames = 3
        model = LatteTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers, cross_attention_dim=hidden,
            caption_channels=text_dim, sample_size=rows, patch_size=2, norm_type="ada_norm_single", video_length=frames,
        )
        latents = randn(batch, 4, frames, rows, cols)
        kwargs = {"encoder_hidden_states": randn(batch, text_tokens, text_dim)}
    else:
        raise ValueError(family)
    # Random non-zero output heads and modulation tables, so every part of the model shows in the output.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if torch.count_nonzero(param) == 0:
                param.normal_(0, 0.05, generator=gen)
    return model.eval(), latents, kwargs


def model_timestep(family: str, t: float, batch: int) -> torch.Tensor:
    """The timestep tensor each family's forward takes (Flux: sigma in [0, 1]; others: 0..1000)."""
    value = t / 1000 if family == "flux" else t
    return torch.full((batch,), value, dtype=torch.float32 if family == "flux" else torch.long) if family != "hunyuan" else torch.full((batch,), value)


def make_job(family: str, model: torch.nn.Module, latents: torch.Tensor, kwargs: dict[str, Any], steps: int = 4,
             guidance: float = 4.0, seed: int = 0) -> Any:
    """A PatchJob for a bare transformer: the family's usual scheduler, CFG where the family uses it.

    `latents`/`kwargs` come from `build(..., batch=2)`: with CFG the batch is [uncond, cond] over one
    sample; Flux (guidance-distilled, no CFG) denoises both entries as two samples.
    """
    from diffusers import (CogVideoXDDIMScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           FlowMatchEulerDiscreteScheduler)

    from executor.pipefusion.job import PatchJob

    cfg = family != "flux"
    scheduler = {
        "pixart": lambda: DPMSolverMultistepScheduler(),
        "sd3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        "flux": lambda: FlowMatchEulerDiscreteScheduler(),
        "hunyuan": lambda: DDPMScheduler(),
        "cogvideox": lambda: CogVideoXDDIMScheduler(),
        "latte": lambda: DDIMScheduler(),
    }[family]()
    scheduler.set_timesteps(steps)
    sample = latents[:1] if cfg else latents
    channel_dim = 2 if family == "cogvideox" else (2 if family == "flux" else 1)
    channels = sample.shape[channel_dim]
    generator = torch.Generator().manual_seed(seed)

    def model_input(x: torch.Tensor, t: Any) -> torch.Tensor:
        return torch.cat([x, x]) if cfg else x

    def guide(out: torch.Tensor, step_index: int, t: Any) -> torch.Tensor:
        out = out.narrow(channel_dim, 0, channels)  # drop a learned sigma
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def step(sched: Any, noise: torch.Tensor, t: Any, x: torch.Tensor, step_index: int, patch: int | None) -> torch.Tensor:
        extra = {"generator": generator} if family == "hunyuan" else {}
        return sched.step(noise, t, x, return_dict=False, **extra)[0]

    def model_timestep(t: Any, batch: int) -> torch.Tensor:
        value = float(t)
        if family == "flux":
            return torch.full((batch,), value / 1000)
        return torch.full((batch,), value) if family == "hunyuan" else torch.full((batch,), int(value), dtype=torch.long)

    return PatchJob(sample.clone(), list(scheduler.timesteps), scheduler, kwargs, model_input, model_timestep, guide, step, cfg)


@contextmanager
def reported_results(rank: int, out_path: str) -> Iterator[list[dict[str, Any]]]:
    """A list a spawned worker fills with its results; on leaving, rank 0 (and any rank that raised)
    writes {"results", "error"} as JSON to `out_path` (`out_path.rankN` for others), and a rank that
    did not fail leaves the process group."""
    import torch.distributed as dist

    results: list[dict[str, Any]] = []
    error = None
    try:
        yield results
    except Exception:
        error = traceback.format_exc()
        raise
    finally:
        if rank == 0 or error:
            with open(out_path if rank == 0 else f"{out_path}.rank{rank}", "w") as f:
                json.dump({"results": results, "error": error}, f)
        if error is None and dist.is_initialized():
            dist.destroy_process_group()
