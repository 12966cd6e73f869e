"""CogVideoX (video; one stream over text + video tokens, 3-D rotary or sinusoidal positions)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import TEXT_DIM, TEXT_TOKENS, TinyRandom
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, rotary_rows
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, slice_rotary_argument
from executor.sp.processors import CogVideoXAttentionProcessor, SequenceShard


class CogVideoXAdapter(FamilyAdapter):
    family = "cogvideox"
    latent_layout = "BFCHW"
    is_video = True

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(
            request, config.sample_height * pipe.vae_scale_factor_spatial, config.sample_width * pipe.vae_scale_factor_spatial)
        num_frames = request.num_frames or config.sample_frames
        embeds, negative_embeds = pipe.encode_prompt(
            request.prompts, request.negative_prompt, do_cfg, num_videos_per_prompt=1,
            max_sequence_length=self.call_default("max_sequence_length"), device=device,
        )
        scheduler = self.fresh_scheduler()
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, None)
        # CogVideoX 1.5 pads the latent frames to a multiple of the temporal patch (the pipeline's rule).
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        patch_t = config.patch_size_t
        additional_frames = 0
        if patch_t is not None and latent_frames % patch_t != 0:
            additional_frames = patch_t - latent_frames % patch_t
            num_frames += additional_frames * pipe.vae_scale_factor_temporal
        latents = pipe.prepare_latents(
            batch, config.in_channels, num_frames, height, width, embeds.dtype, device, request.generators
        )
        rotary = (
            pipe._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
            if config.use_rotary_positional_embeddings else None
        )
        branches = {"cond": {"encoder_hidden_states": embeds}}
        if do_cfg:
            branches["uncond"] = {"encoder_hidden_states": negative_embeds}
        patch = config.patch_size
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=branches,
            shared_inputs={"image_rotary_emb": rotary, "attention_kwargs": None}, guidance_scale=guidance,
            batch_size=batch, height=height, width=width, num_frames=num_frames, latent_layout=self.latent_layout,
            output_type=request.output_type,
            token_grid=(latents.shape[1] // (patch_t or 1), latents.shape[-2] // patch, latents.shape[-1] // patch),
            extras={"step_kwargs": pipe.prepare_extra_step_kwargs(request.generators, 0.0),
                    "additional_frames": additional_frames, "old_pred_original_sample": None,
                    "dtype": embeds.dtype},
        )

    def noise_prediction(self, job: DenoiseJob, output: torch.Tensor) -> torch.Tensor:
        return output.float()

    def step(self, job: DenoiseJob, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        from diffusers import CogVideoXDPMScheduler

        if not isinstance(job.scheduler, CogVideoXDPMScheduler):
            latents = job.scheduler.step(noise, t, latents, **job.extras["step_kwargs"], return_dict=False)[0]
        else:
            # The DPM variant is a two-step solver: it takes the previous timestep and prediction.
            previous_t = job.timesteps[step_index - 1] if step_index > 0 else None
            latents, job.extras["old_pred_original_sample"] = job.scheduler.step(
                noise, job.extras["old_pred_original_sample"], t, previous_t, latents,
                **job.extras["step_kwargs"], return_dict=False,
            )
        return latents.to(job.extras["dtype"])

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        video = self.pipe.decode_latents(latents[:, job.extras["additional_frames"]:])
        return self.pipe.video_processor.postprocess_video(video=video, output_type=output_type)


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """The joint embedding emits [text; video] tokens: every rank keeps all text and its video tokens,
    and the rotary table passed in is cut to them."""
    processor = CogVideoXAttentionProcessor(shard)
    for block in transformer.transformer_blocks:
        install_processor(handle, block.attn1, processor)

    def split_after_text(module, args, output):
        # patch_embed(text, video) emits [text tokens; image tokens]: all text, my image tokens.
        text_tokens = args[0].shape[1]
        shard.text_tokens = text_tokens
        rows = shard.split(output.shape[1] - text_tokens)
        return torch.cat([output[:, :text_tokens], output[:, text_tokens + rows.start : text_tokens + rows.stop]], dim=1)

    handle.add_hook(transformer.register_forward_pre_hook(slice_rotary_argument(shard, transformer), with_kwargs=True))
    handle.add_hook(transformer.patch_embed.register_forward_hook(split_after_text))


class CogVideoXStages(StagedTransformer):
    """CogVideoX: one sequence [text, frame-major video tokens]; a row strip spans every frame."""

    family = "cogvideox"
    carries_text = True
    first_stage_attrs = ("patch_embed", "embedding_dropout")
    last_stage_attrs = ("norm_final", "norm_out", "proj_out")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "first") for u in units]

    def _token_frames(self, frames: int) -> int:
        pt = self.config.patch_size_t
        return frames if pt is None else (frames + pt - 1) // pt

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        p = self.config.patch_size
        return PatchLayout(latents.shape[-2] // p, latents.shape[-1] // p, p, self._token_frames(latents.shape[1]), patches)

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        emb = t.time_embedding(t.time_proj(timestep).to(latents.dtype), kwargs.get("timestep_cond"))
        if t.ofs_embedding is not None:
            emb = emb + t.ofs_embedding(t.ofs_proj(kwargs["ofs"]).to(latents.dtype))
        text = kwargs["encoder_hidden_states"]
        return {"temb": emb, "raw_text": text, "text_tokens": text.shape[1], "rotary": kwargs.get("image_rotary_emb"),
                "frames": latents.shape[1], "batch": latents.shape[0]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        tokens = t.embedding_dropout(t.patch_embed(cond["raw_text"], latents))
        n = cond["text_tokens"]
        return {"hidden": tokens[:, n:], "text": tokens[:, :n]}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        hidden, text = block(
            hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], temb=cond["temb"],
            image_rotary_emb=rotary_rows(cond["rotary"], index), attention_kwargs=None,
        )
        return {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = gathered(t.proj_out(t.norm_out(t.norm_final(carry["hidden"]), temb=cond["temb"])), gather)
        p, pt = self.config.patch_size, self.config.patch_size_t
        rows, cols, batch = self._rows_of(layout, patch), layout.row_tokens, cond["batch"]
        if pt is None:
            x = hidden.reshape(batch, cond["frames"], rows, cols, -1, p, p)
            return x.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        x = hidden.reshape(batch, layout.token_frames, rows, cols, -1, pt, p, p)
        return x.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny CogVideoX transformer over 2 latent frames with a random 3-D rotary table (rows,
    cols: the latent's size; head_dim at least 16, which its rotary splits 2:3:3 into even parts)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    frames, head_dim = 2, max(head_dim, 16)
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, num_layers=layers,
        text_embed_dim=TEXT_DIM, sample_width=cols, sample_height=rows, sample_frames=(frames - 1) * 4 + 1,
        max_text_seq_length=TEXT_TOKENS, patch_size=2, time_embed_dim=heads * head_dim, use_rotary_positional_embeddings=True,
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, frames, 4, rows, cols)
    inputs = {"encoder_hidden_states": rand.text(batch),
              "image_rotary_emb": rand.rotary(frames * (rows // 2) * (cols // 2), head_dim)}
    return TinyTransformer(rand.finish(model), latents, inputs, CogVideoXDDIMScheduler)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(blocks=[{"kind": "single", "count": int(transformer.config.num_layers)}],
                            mlp_width=transformer.transformer_blocks[0].ff.net[2].in_features,
                            figures={"temporal_patch_size": int(transformer.config.patch_size_t or 1)})


FAMILY = Family(
    name="cogvideox",
    pipelines={"CogVideoXPipeline": "cogvideox-2b"},
    adapter=CogVideoXAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=CogVideoXAttentionProcessor,
    stages=CogVideoXStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=True,
)
