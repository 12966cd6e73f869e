"""Stable Diffusion 3 (MM-DiT joint attention, CLIP-L + CLIP-G + T5 text, flow matching)."""
from __future__ import annotations

from typing import Any

import torch

from executor.families.base import DenoiseJob, FamilyAdapter, GenerationRequest


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
