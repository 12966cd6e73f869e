"""HunyuanDiT (cross-attention DiT with long skips, BERT + mT5 text, 2-D rotary, DDPM)."""
from __future__ import annotations

from typing import Any

import torch

from executor.families.base import DenoiseJob, FamilyAdapter, GenerationRequest


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
