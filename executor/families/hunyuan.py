"""HunyuanDiT (cross-attention DiT with long skips, BERT + mT5 text, 2-D rotary, DDPM)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import POOLED_DIM, TEXT_DIM, TEXT_TOKENS, TinyRandom, padded_text_mask
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, rotary_rows, unpatchify
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, slice_rotary_argument, split_tokens
from executor.sp.processors import SelfAttentionProcessor, SequenceShard


class HunyuanAdapter(FamilyAdapter):
    family = "hunyuan"
    text_state_keys = ("encoder_hidden_states", "encoder_hidden_states_t5")

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_2d_rotary_pos_embed, get_resize_crop_region_for_grid

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(request, pipe.default_sample_size * pipe.vae_scale_factor)
        # The pipeline rounds sizes down to multiples of 16; resolution binning is not applied.
        height, width = int(height // 16 * 16), int(width // 16 * 16)
        # The pipeline wants the negative prompt in the prompt's type (a list here).
        negative = None if request.negative_prompt is None else [request.negative_prompt] * batch
        encoded = [
            pipe.encode_prompt(
                prompt=request.prompts, device=device, dtype=pipe.transformer.dtype, num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative, max_sequence_length=length,
                text_encoder_index=index,
            )
            for index, length in ((0, 77), (1, 256))
        ]
        (embeds, negative_embeds, mask, negative_mask), (embeds_t5, negative_embeds_t5, mask_t5, negative_mask_t5) = encoded
        scheduler = self.fresh_scheduler()
        scheduler.set_timesteps(steps, device=device)
        latents = pipe.prepare_latents(batch, config.in_channels, height, width, embeds.dtype, device, request.generators)
        grid_height = height // 8 // config.patch_size
        grid_width = width // 8 // config.patch_size
        base_size = 512 // 8 // config.patch_size
        rotary = get_2d_rotary_pos_embed(
            pipe.transformer.inner_dim // pipe.transformer.num_heads,
            get_resize_crop_region_for_grid((grid_height, grid_width), base_size),
            (grid_height, grid_width), device=device, output_type="pt",
        )
        original_size = self.call_default("original_size")
        crops = self.call_default("crops_coords_top_left")
        time_ids = torch.tensor([list(original_size + (height, width) + crops)], dtype=embeds.dtype).to(device)

        def branch(states: torch.Tensor, states_mask: torch.Tensor, states_t5: torch.Tensor, states_t5_mask: torch.Tensor) -> dict[str, Any]:
            return {
                "encoder_hidden_states": states, "text_embedding_mask": states_mask,
                "encoder_hidden_states_t5": states_t5, "text_embedding_mask_t5": states_t5_mask,
                "image_meta_size": time_ids.repeat(batch, 1), "style": torch.zeros(batch, dtype=torch.long, device=device),
            }

        branches = {"cond": branch(embeds, mask, embeds_t5, mask_t5)}
        if do_cfg:
            branches["uncond"] = branch(negative_embeds, negative_mask, negative_embeds_t5, negative_mask_t5)
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=scheduler.timesteps, scheduler=scheduler, branch_inputs=branches,
            shared_inputs={"image_rotary_emb": rotary}, guidance_scale=guidance, batch_size=batch, height=height,
            width=width, num_frames=1, latent_layout=self.latent_layout, output_type=request.output_type,
            token_grid=(1, grid_height, grid_width),
            extras={"step_kwargs": pipe.prepare_extra_step_kwargs(request.generators, 0.0),
                    "guidance_rescale": float(self.call_default("guidance_rescale"))},
        )

    def timestep_input(self, job: DenoiseJob, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.expand(batch).to(dtype=job.latents.dtype)

    def noise_prediction(self, job: DenoiseJob, output: torch.Tensor) -> torch.Tensor:
        return output.chunk(2, dim=1)[0]  # learned sigma: keep the noise half

    def combine_guidance(self, job: DenoiseJob, uncond: torch.Tensor, cond: torch.Tensor, step_index: int, t: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import rescale_noise_cfg

        noise = super().combine_guidance(job, uncond, cond, step_index, t)
        if job.extras["guidance_rescale"] > 0.0:
            noise = rescale_noise_cfg(noise, cond, guidance_rescale=job.extras["guidance_rescale"])
        return noise

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        image = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Image tokens are split after the patch embedding and the rotary table passed in is cut to them;
    the long skips are per token and stay local."""
    processor = SelfAttentionProcessor(shard)
    for block in transformer.blocks:
        install_processor(handle, block.attn1, processor)  # attn2 (cross-attention) takes the cut rotary table as it is
    handle.add_hook(transformer.register_forward_pre_hook(slice_rotary_argument(shard, transformer), with_kwargs=True))
    handle.add_hook(transformer.pos_embed.register_forward_hook(split_tokens(shard)))


class HunyuanStages(StagedTransformer):
    """HunyuanDiT: block j > L//2 adds the output of block L-1-j (a long skip).

    Each skip is a carry entry of its own ("skip.<producing block>"), so the pipeline can send it
    straight from the stage that produces it to the mirror stage that consumes it (`skip_pairs`).
    """

    family = "hunyuan"
    first_stage_attrs = ("pos_embed",)
    last_stage_attrs = ("norm_out", "proj_out")

    def unit_count(self) -> int:
        return len(self.transformer.blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.blocks[u].attn1, "none") for u in units]

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        t5 = kwargs["encoder_hidden_states_t5"]
        temb = t.time_extra_emb(timestep, t5, kwargs.get("image_meta_size"), kwargs.get("style"), hidden_dtype=timestep.dtype)
        batch, length, _ = t5.shape
        t5 = t.text_embedder(t5.view(-1, t5.shape[-1])).view(batch, length, -1)
        text = torch.cat([kwargs["encoder_hidden_states"], t5], dim=1)
        mask = torch.cat([kwargs["text_embedding_mask"], kwargs["text_embedding_mask_t5"]], dim=-1).unsqueeze(2).bool()
        text = torch.where(mask, text, t.text_embedding_padding)
        return {"temb": temb, "text": text, "rotary": kwargs.get("image_rotary_emb")}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        return {"hidden": self.transformer.pos_embed(latents)}

    def skip_pairs(self) -> list[tuple[int, int, str]]:
        layers = self.config.num_layers
        return [(i, layers - 1 - i, f"skip.{i}") for i in range(layers // 2 - 1)]

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        layers = self.config.num_layers
        block = self.transformer.blocks[unit]
        out = dict(carry)
        kwargs = dict(temb=cond["temb"], encoder_hidden_states=cond["text"], image_rotary_emb=rotary_rows(cond["rotary"], index))
        if unit > layers // 2:
            hidden = block(carry["hidden"], skip=out.pop(f"skip.{layers - 1 - unit}"), **kwargs)
        else:
            hidden = block(carry["hidden"], **kwargs)
        if unit < layers // 2 - 1:
            out[f"skip.{unit}"] = hidden
        out["hidden"] = hidden
        return out

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"].to(torch.float32))), gather)
        return unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny HunyuanDiT transformer (long skips pair up from 4 layers) with padded text, mT5
    states and a random rotary table (rows, cols: the latent's size)."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel

    torch.manual_seed(seed)
    model = HunyuanDiT2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, patch_size=2, sample_size=rows,
        hidden_size=heads * head_dim, num_layers=layers, cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, text_len=TEXT_TOKENS, text_len_t5=TEXT_TOKENS, use_style_cond_and_image_meta_size=False,
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, rows, cols)
    inputs = {"encoder_hidden_states": rand.text(batch), "text_embedding_mask": padded_text_mask(batch, torch.long),
              "encoder_hidden_states_t5": rand.text(batch), "text_embedding_mask_t5": torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
              "image_rotary_emb": rand.rotary((rows // 2) * (cols // 2), head_dim)}
    return TinyTransformer(rand.finish(model), latents, inputs, DDPMScheduler)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(blocks=[{"kind": "cross", "count": int(transformer.config.num_layers)}],
                            mlp_width=transformer.blocks[0].ff.net[2].in_features,
                            figures={"hidden_size": int(transformer.config.hidden_size), "skip_connections": True})


FAMILY = Family(
    name="hunyuan",
    pipelines={"HunyuanDiTPipeline": "hunyuan-dit"},
    adapter=HunyuanAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=SelfAttentionProcessor,
    stages=HunyuanStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=False,
)
