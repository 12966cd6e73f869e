"""Flux (dev and schnell): MM-DiT double-stream then single-stream blocks, packed 2x2 latent tokens.

No classifier-free guidance: Flux-dev embeds the guidance scale in the transformer input and
Flux-schnell has none, so a job has only the "cond" branch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from executor.families.base import DenoiseJob, FamilyAdapter, GenerationRequest


class FluxAdapter(FamilyAdapter):
    family = "flux"
    latent_layout = "BSC"

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, _, batch = self.basics(request, pipe.default_sample_size * pipe.vae_scale_factor)
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=request.prompts, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=self.call_default("max_sequence_length"),
        )
        latents, image_ids = pipe.prepare_latents(
            batch, config.in_channels // 4, height, width, embeds.dtype, device, request.generators
        )
        scheduler = self.fresh_scheduler()
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1], scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15),
        )
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        cond: dict[str, Any] = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        cond["guidance"] = (
            torch.full([1], guidance, device=device, dtype=torch.float32).expand(batch) if config.guidance_embeds else None
        )
        # Packed tokens: one per 2x2 latent pixels, row-major over (height/16, width/16).
        rows, cols = int(height) // (pipe.vae_scale_factor * 2), int(width) // (pipe.vae_scale_factor * 2)
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs={"cond": cond},
            shared_inputs={"txt_ids": text_ids, "img_ids": image_ids, "joint_attention_kwargs": {}},
            guidance_scale=guidance, batch_size=batch, height=height, width=width, num_frames=1,
            latent_layout=self.latent_layout, output_type=request.output_type, token_grid=(1, rows, cols),
        )

    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents

    def timestep_input(self, job: DenoiseJob, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.expand(batch).to(job.latents.dtype) / 1000

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        pipe = self.pipe
        unpacked = pipe._unpack_latents(latents, job.height, job.width, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(unpacked, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
