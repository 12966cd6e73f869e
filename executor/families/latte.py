"""Latte (video; alternating spatial blocks with cross-attention and temporal blocks)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import TEXT_DIM, TinyRandom
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, unpatchify
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, split_tokens
from executor.sp.processors import SelfAttentionProcessor, SequenceShard


class LatteAdapter(FamilyAdapter):
    family = "latte"
    latent_layout = "BCFHW"
    is_video = True

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.latte.pipeline_latte import retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(request, config.sample_size * pipe.vae_scale_factor)
        # The transformer adds a temporal position table of exactly `video_length` frames.
        num_frames = request.num_frames or config.video_length
        embeds, negative_embeds = pipe.encode_prompt(
            request.prompts, do_cfg, negative_prompt=request.negative_prompt or "", num_images_per_prompt=1,
            device=device, clean_caption=self.call_default("clean_caption"), mask_feature=self.call_default("mask_feature"),
        )
        scheduler = self.fresh_scheduler()
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, None)
        latents = pipe.prepare_latents(
            batch, config.in_channels, num_frames, height, width, embeds.dtype, device, request.generators
        )
        branches = {"cond": {"encoder_hidden_states": embeds}}
        if do_cfg:
            branches["uncond"] = {"encoder_hidden_states": negative_embeds}
        patch = config.patch_size
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=branches,
            shared_inputs={"enable_temporal_attentions": self.call_default("enable_temporal_attentions")},
            guidance_scale=guidance, batch_size=batch, height=height, width=width, num_frames=num_frames,
            latent_layout=self.latent_layout, output_type=request.output_type,
            token_grid=(num_frames, latents.shape[-2] // patch, latents.shape[-1] // patch),
            extras={"step_kwargs": pipe.prepare_extra_step_kwargs(request.generators, 0.0)},
        )

    def noise_prediction(self, job: DenoiseJob, output: torch.Tensor) -> torch.Tensor:
        # The pipeline keeps the noise half unless the scheduler itself models a learned variance.
        if getattr(job.scheduler.config, "variance_type", None) in ("learned", "learned_range"):
            return output
        return output.chunk(2, dim=1)[0]

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        video = self.pipe.decode_latents(latents, job.num_frames, decode_chunk_size=job.num_frames)
        return self.pipe.video_processor.postprocess_video(video=video, output_type=output_type)


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Each frame's tokens are split alike, so the temporal blocks (attention across frames at one
    spatial position) find all frames of their positions locally."""
    processor = SelfAttentionProcessor(shard)
    for block in transformer.transformer_blocks:
        install_processor(handle, block.attn1, processor)  # spatial self-attention; attn2 (text) stays local
    # Tokens are [batch*frames, tokens of one frame, hidden].
    handle.add_hook(transformer.pos_embed.register_forward_hook(split_tokens(shard, "image tokens per frame")))

    def local_temporal_timestep(module, args, kwargs):
        # Latte repeats the timestep embedding once per spatial position of a frame (batch*tokens rows);
        # the temporal block sees only my positions, so keep their rows.
        args = list(args)
        in_kwargs = "timestep" in kwargs
        timestep = kwargs["timestep"] if in_kwargs else args[4]
        per_position = timestep.view(-1, shard.image_tokens, timestep.shape[-1])[:, shard.start : shard.stop]
        local = per_position.reshape(-1, timestep.shape[-1])
        if in_kwargs:
            kwargs["timestep"] = local
        else:
            args[4] = local
        return tuple(args), kwargs

    for block in transformer.temporal_transformer_blocks:
        handle.add_hook(block.register_forward_pre_hook(local_temporal_timestep, with_kwargs=True))


class LatteStages(StagedTransformer):
    """Latte: unit i is spatial block i (per frame, over image tokens) then temporal block i
    (per token position, over frames). Temporal attention never mixes positions, so only the
    spatial self-attention needs stale KV."""

    family = "latte"
    first_stage_attrs = ("pos_embed",)
    last_stage_attrs = ("norm_out", "proj_out", "scale_shift_table")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit), (self.transformer.temporal_transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "none") for u in units]

    def carry_batch(self, cond: Cond, batch: int) -> int:
        return batch * cond["frames"]  # spatial blocks see every frame as a batch entry

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        batch, frames = latents.shape[0], latents.shape[2]
        temb, embedded = t.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=batch, hidden_dtype=latents.dtype)
        text = t.caption_projection(kwargs["encoder_hidden_states"])
        text = text.repeat_interleave(frames, dim=0).view(-1, text.shape[-2], text.shape[-1])
        return {
            "temb": temb, "temb_spatial": temb.repeat_interleave(frames, dim=0).view(-1, temb.shape[-1]),
            "embedded": embedded.repeat_interleave(frames, dim=0).view(-1, embedded.shape[-1]),
            "text": text, "text_mask": kwargs.get("encoder_attention_mask"), "batch": batch, "frames": frames,
            "temporal": kwargs.get("enable_temporal_attentions", True),
        }

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        b, c, f, h, w = latents.shape
        return {"hidden": self.transformer.pos_embed(latents.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w))}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        t = self.transformer
        hidden = t.transformer_blocks[unit](carry["hidden"], None, cond["text"], cond["text_mask"], cond["temb_spatial"], None, None)
        if cond["temporal"]:
            batch, frames = cond["batch"], cond["frames"]
            tokens, width = hidden.shape[-2], hidden.shape[-1]
            hidden = hidden.reshape(batch, frames, tokens, width).permute(0, 2, 1, 3).reshape(-1, frames, width)
            if unit == 0 and frames > 1:
                hidden = hidden + t.temp_pos_embed.to(hidden.dtype)
            temb_temporal = cond["temb"].repeat_interleave(tokens, dim=0).view(-1, cond["temb"].shape[-1])
            hidden = t.temporal_transformer_blocks[unit](hidden, None, None, None, temb_temporal, None, None)
            hidden = hidden.reshape(batch, tokens, frames, width).permute(0, 2, 1, 3).reshape(-1, tokens, width)
        return {"hidden": hidden}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        shift, scale = (t.scale_shift_table[None] + cond["embedded"][:, None]).chunk(2, dim=1)
        hidden = gathered(t.proj_out(t.norm_out(carry["hidden"]) * (1 + scale) + shift), gather)
        out = unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)
        return out.reshape(cond["batch"], cond["frames"], *out.shape[1:]).permute(0, 2, 1, 3, 4)


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny Latte transformer over 3 frames (rows, cols: the latent's size)."""
    from diffusers import DDIMScheduler, LatteTransformer3DModel

    frames = 3
    torch.manual_seed(seed)
    model = LatteTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, caption_channels=TEXT_DIM, sample_size=rows, patch_size=2, video_length=frames,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6,
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, frames, rows, cols)
    inputs = {"encoder_hidden_states": rand.text(batch), "enable_temporal_attentions": True}
    return TinyTransformer(rand.finish(model), latents, inputs, DDIMScheduler)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    # Each layer is a spatial block (with cross-attention to text) then a temporal block.
    return BlockDescription(blocks=[{"kind": "cross", "count": 1}, {"kind": "temporal", "count": 1}] * int(transformer.config.num_layers),
                            mlp_width=transformer.transformer_blocks[0].ff.net[2].in_features)


FAMILY = Family(
    name="latte",
    pipelines={"LattePipeline": "latte"},
    adapter=LatteAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=SelfAttentionProcessor,
    stages=LatteStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=False,
)
