"""Latte (video; alternating spatial blocks with cross-attention and temporal blocks)."""
from __future__ import annotations

from typing import Any

import torch

from executor.families.base import DenoiseJob, FamilyAdapter, GenerationRequest


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
