"""PixArt-alpha and PixArt-Sigma (cross-attention DiT, T5 text, DPM-Solver by default)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import TEXT_DIM, TinyRandom, padded_text_mask
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, unpatchify
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, split_tokens
from executor.sp.processors import SelfAttentionProcessor, SequenceShard


class PixArtAdapter(FamilyAdapter):
    family = "pixart"

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(request, config.sample_size * pipe.vae_scale_factor)
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            request.prompts, do_cfg, negative_prompt=request.negative_prompt or "", num_images_per_prompt=1,
            device=device, clean_caption=self.call_default("clean_caption"),
            max_sequence_length=self.call_default("max_sequence_length"),
        )
        scheduler = self.fresh_scheduler()
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, None, None)
        latents = pipe.prepare_latents(batch, config.in_channels, height, width, embeds.dtype, device, request.generators)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

        def branch(states: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
            # Micro-conditions only for the 1024px models (sample_size 128), as the pipeline does.
            added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
            if config.sample_size == 128:
                added = {
                    "resolution": torch.tensor([height, width]).repeat(batch, 1).to(dtype=states.dtype, device=device),
                    "aspect_ratio": torch.tensor([float(height / width)]).repeat(batch, 1).to(dtype=states.dtype, device=device),
                }
            return {"encoder_hidden_states": states, "encoder_attention_mask": attention_mask, "added_cond_kwargs": added}

        branches = {"cond": branch(embeds, mask)}
        if do_cfg:
            branches["uncond"] = branch(negative_embeds, negative_mask)
        patch = config.patch_size
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=branches,
            shared_inputs={}, guidance_scale=guidance, batch_size=batch, height=height, width=width, num_frames=1,
            latent_layout=self.latent_layout, output_type=request.output_type,
            token_grid=(1, latents.shape[-2] // patch, latents.shape[-1] // patch),
            extras={"step_kwargs": pipe.prepare_extra_step_kwargs(request.generators, 0.0), "num_steps": steps},
        )

    def noise_prediction(self, job: DenoiseJob, output: torch.Tensor) -> torch.Tensor:
        # Learned sigma: the transformer predicts noise and variance; the scheduler takes the noise.
        if self.transformer.config.out_channels // 2 == self.transformer.config.in_channels:
            return output.chunk(2, dim=1)[0]
        return output

    def step(self, job: DenoiseJob, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        # A one-step generation keeps the predicted original sample, as the pipeline does.
        which = 1 if job.extras["num_steps"] == 1 else 0
        return job.scheduler.step(noise, t, latents, **job.extras["step_kwargs"], return_dict=False)[which]

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        image = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Image tokens are split after the patch embedding; only the self-attention sees all of them."""
    processor = SelfAttentionProcessor(shard)
    for block in transformer.transformer_blocks:
        install_processor(handle, block.attn1, processor)  # attn2 (cross-attention to text) stays local
    handle.add_hook(transformer.pos_embed.register_forward_hook(split_tokens(shard)))


class PixArtStages(StagedTransformer):
    family = "pixart"
    first_stage_attrs = ("pos_embed",)
    last_stage_attrs = ("norm_out", "proj_out", "scale_shift_table")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "none") for u in units]

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        batch = latents.shape[0]
        temb, embedded = t.adaln_single(timestep, kwargs.get("added_cond_kwargs"), batch_size=batch, hidden_dtype=latents.dtype)
        text = kwargs["encoder_hidden_states"]
        if t.caption_projection is not None:
            text = t.caption_projection(text).view(batch, -1, t.inner_dim)
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None and mask.ndim == 2:  # keep/discard mask -> additive bias, as the model's forward does
            mask = ((1 - mask.to(latents.dtype)) * -10000.0).unsqueeze(1)
        return {"temb": temb, "embedded": embedded, "text": text, "text_mask": mask}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        return {"hidden": self.transformer.pos_embed(latents)}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        hidden = block(
            carry["hidden"], attention_mask=None, encoder_hidden_states=cond["text"],
            encoder_attention_mask=cond["text_mask"], timestep=cond["temb"], cross_attention_kwargs=None, class_labels=None,
        )
        return {"hidden": hidden}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        shift, scale = (t.scale_shift_table[None] + cond["embedded"][:, None]).chunk(2, dim=1)
        hidden = t.norm_out(carry["hidden"]) * (1 + scale) + shift
        hidden = gathered(t.proj_out(hidden), gather)
        return unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny PixArt transformer with a padded text mask (rows, cols: the latent's size)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, caption_channels=TEXT_DIM, sample_size=rows, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, rows, cols)
    inputs = {"encoder_hidden_states": rand.text(batch), "encoder_attention_mask": padded_text_mask(batch),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return TinyTransformer(rand.finish(model), latents, inputs, DPMSolverMultistepScheduler)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(blocks=[{"kind": "cross", "count": int(transformer.config.num_layers)}],
                            mlp_width=transformer.transformer_blocks[0].ff.net[2].in_features)


FAMILY = Family(
    name="pixart",
    pipelines={"PixArtAlphaPipeline": "pixart-alpha", "PixArtSigmaPipeline": "pixart-sigma"},
    adapter=PixArtAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=SelfAttentionProcessor,
    stages=PixArtStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=False,
)
