"""Stable Diffusion 3 (MM-DiT joint attention, CLIP-L + CLIP-G + T5 text, flow matching)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import POOLED_DIM, TEXT_DIM, TinyRandom
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, unpatchify
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, split_tokens
from executor.sp.processors import JointAttentionProcessor, SequenceShard


class SD3Adapter(FamilyAdapter):
    family = "sd3"

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(request, pipe.default_sample_size * pipe.vae_scale_factor)
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=request.prompts, prompt_2=None, prompt_3=None, negative_prompt=request.negative_prompt,
            do_classifier_free_guidance=do_cfg, device=device, num_images_per_prompt=1,
            max_sequence_length=self.call_default("max_sequence_length"),
        )
        latents = pipe.prepare_latents(batch, config.in_channels, height, width, embeds.dtype, device, request.generators)
        scheduler = self.fresh_scheduler()
        scheduler_kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            tokens = (latents.shape[-2] // config.patch_size) * (latents.shape[-1] // config.patch_size)
            scheduler_kwargs["mu"] = calculate_shift(
                tokens, scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.16),
            )
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, sigmas=None, **scheduler_kwargs)
        branches = {"cond": {"encoder_hidden_states": embeds, "pooled_projections": pooled}}
        if do_cfg:
            branches["uncond"] = {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled}
        patch = config.patch_size
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=branches,
            shared_inputs={"joint_attention_kwargs": None}, guidance_scale=guidance, batch_size=batch, height=height,
            width=width, num_frames=1, latent_layout=self.latent_layout, output_type=request.output_type,
            token_grid=(1, latents.shape[-2] // patch, latents.shape[-1] // patch),
        )

    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # flow matching: no input scaling

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Image tokens are split after the patch embedding; the text joins every rank's attention whole."""
    processor = JointAttentionProcessor(shard)
    for block in transformer.transformer_blocks:
        install_processor(handle, block.attn, processor)
        if getattr(block, "attn2", None) is not None:  # SD3.5: a second, image-only self-attention
            install_processor(handle, block.attn2, processor)
    handle.add_hook(transformer.pos_embed.register_forward_hook(split_tokens(shard)))


class SD3Stages(StagedTransformer):
    family = "sd3"
    carries_text = True
    first_stage_attrs = ("pos_embed", "context_embedder")
    last_stage_attrs = ("norm_out", "proj_out")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        layers: list[tuple[nn.Module, TextPosition]] = []
        for u in units:
            block = self.transformer.transformer_blocks[u]
            layers.append((block.attn, "last"))  # joint attention: image tokens first, then text
            if getattr(block, "use_dual_attention", False):
                layers.append((block.attn2, "none"))
        return layers

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        text = kwargs["encoder_hidden_states"]
        temb = self.transformer.time_text_embed(timestep, kwargs["pooled_projections"])
        return {"temb": temb, "raw_text": text, "text_tokens": text.shape[1]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        return {"hidden": t.pos_embed(latents).contiguous(), "text": t.context_embedder(cond["raw_text"])}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        text, hidden = block(hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], temb=cond["temb"], joint_attention_kwargs=None)
        return {"hidden": hidden} if text is None else {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"])), gather)
        return unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny SD3 transformer: block 0 has SD3.5's extra image-only attention, the last block is
    context_pre_only, and q/k are RMS-normed (rows, cols: the latent's size)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=rows, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=TEXT_DIM, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=POOLED_DIM, out_channels=4, pos_embed_max_size=max(rows, cols), dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, rows, cols)
    inputs = {"encoder_hidden_states": rand.text(batch), "pooled_projections": rand.randn(batch, POOLED_DIM)}
    return TinyTransformer(rand.finish(model), latents, inputs, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0))


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(blocks=[{"kind": "joint", "count": int(transformer.config.num_layers)}],
                            mlp_width=transformer.transformer_blocks[0].ff.net[2].in_features)


FAMILY = Family(
    name="sd3",
    pipelines={"StableDiffusion3Pipeline": "sd3-medium"},
    adapter=SD3Adapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=JointAttentionProcessor,
    stages=SD3Stages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=True,
)
