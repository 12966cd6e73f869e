"""CogVideoX (video; one stream over text + video tokens, 3-D rotary or sinusoidal positions)."""
from __future__ import annotations

from typing import Any

import torch

from executor.families.base import DenoiseJob, FamilyAdapter, GenerationRequest


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
