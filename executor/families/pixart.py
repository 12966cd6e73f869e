"""PixArt-alpha and PixArt-Sigma (cross-attention DiT, T5 text, DPM-Solver by default)."""
from __future__ import annotations

from typing import Any

import torch

from executor.families.base import DenoiseJob, FamilyAdapter, GenerationRequest


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
