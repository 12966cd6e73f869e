"""Flux (dev and schnell): MM-DiT double-stream then single-stream blocks, packed 2x2 latent tokens.

No classifier-free guidance: Flux-dev embeds the guidance scale in the transformer input and
Flux-schnell has none, so a job has only the "cond" branch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import POOLED_DIM, TEXT_DIM, TEXT_TOKENS, TinyRandom
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, rotary_rows
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, split_tokens
from executor.sp.processors import FluxAttentionProcessor, SequenceShard


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


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Image tokens are split after the embedder, and the text too where its token count divides;
    the position embedder's rotary table is cut to the same rows."""
    processor = FluxAttentionProcessor(shard)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        install_processor(handle, block.attn, processor)
    handle.add_hook(transformer.x_embedder.register_forward_hook(split_tokens(shard)))

    def split_text(module, args, output):
        # Flux's single-stream blocks run attention and MLP over [text; image]: a whole text stream on
        # every rank repeats that work sp times (T = 512 against S/sp = 512 image tokens at 1024 px on
        # 8 ranks), so the text is split like the image when its token count divides; else it stays whole.
        text_tokens = output.shape[1]
        shard.text_split = text_tokens % shard.degree == 0
        if not shard.text_split:
            shard.text_tokens, shard.text_rows = text_tokens, slice(0, text_tokens)
            return output
        per_rank = text_tokens // shard.degree
        shard.text_tokens, shard.text_rows = per_rank, slice(shard.chunk * per_rank, (shard.chunk + 1) * per_rank)
        return output[:, shard.text_rows].contiguous()

    handle.add_hook(transformer.context_embedder.register_forward_hook(split_text))

    def slice_rotary(module, args, output):
        # pos_embed(ids) for ids = [text ids; image ids]: keep my text rows and my image rows.
        text_total = output[0].shape[0] - shard.image_tokens
        keep = torch.cat([torch.arange(text_total)[shard.text_rows], text_total + torch.arange(shard.start, shard.stop)])
        return tuple(part[keep.to(part.device)] for part in output)

    handle.add_hook(transformer.pos_embed.register_forward_hook(slice_rotary))


class FluxStages(StagedTransformer):
    family = "flux"
    carries_text = True
    first_stage_attrs = ("x_embedder", "context_embedder")
    last_stage_attrs = ("norm_out", "proj_out")

    def _double(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_count(self) -> int:
        return self._double() + len(self.transformer.single_transformer_blocks)

    def _block(self, unit: int) -> tuple[nn.ModuleList, int]:
        if unit < self._double():
            return self.transformer.transformer_blocks, unit
        return self.transformer.single_transformer_blocks, unit - self._double()

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [self._block(unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        out: list[tuple[nn.Module, TextPosition]] = []
        for u in units:
            blocks, i = self._block(u)
            out.append((blocks[i].attn, "first"))  # both block kinds put the text tokens first
        return out

    @staticmethod
    def _ids(ids: torch.Tensor) -> torch.Tensor:
        return ids[0] if ids.ndim == 3 else ids

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        # Packed latents [B, rows*cols, C]: the grid is read from the position ids.
        ids = self._ids(kwargs["img_ids"])
        rows, cols = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
        if rows * cols != latents.shape[-2]:
            raise ValueError(f"Flux img_ids describe a {rows}x{cols} grid but the latents hold {latents.shape[-2]} tokens")
        return PatchLayout(rows, cols, cols, 1, patches)

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        step = timestep.to(latents.dtype) * 1000
        guidance = kwargs.get("guidance")
        pooled = kwargs["pooled_projections"]
        if guidance is None:
            temb = t.time_text_embed(step, pooled)
        else:
            temb = t.time_text_embed(step, guidance.to(latents.dtype) * 1000, pooled)
        txt_ids, img_ids = self._ids(kwargs["txt_ids"]), self._ids(kwargs["img_ids"])
        rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        text = kwargs["encoder_hidden_states"]
        return {"temb": temb, "rotary": rotary, "raw_text": text, "text_tokens": txt_ids.shape[0]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        return {"hidden": t.x_embedder(latents), "text": t.context_embedder(cond["raw_text"])}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        blocks, i = self._block(unit)
        rotary = rotary_rows(cond["rotary"], index, cond["text_tokens"], text_index)
        text, hidden = blocks[i](
            hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], temb=cond["temb"],
            image_rotary_emb=rotary, joint_attention_kwargs=None,
        )
        return {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        return gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"])), gather)


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny Flux-dev transformer (half the layers double-stream, half single-stream) with
    packed latents of (rows/2) x (cols/2) tokens, their position ids and the embedded guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers // 2, num_single_layers=layers - layers // 2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
    )
    rand = TinyRandom(seed)
    token_rows, token_cols = rows // 2, cols // 2
    image_ids = torch.zeros(token_rows, token_cols, 3)
    image_ids[..., 1] = torch.arange(token_rows)[:, None]
    image_ids[..., 2] = torch.arange(token_cols)[None, :]
    latents = rand.randn(batch, token_rows * token_cols, 16)
    inputs = {"encoder_hidden_states": rand.text(batch), "pooled_projections": rand.randn(batch, POOLED_DIM),
              "txt_ids": torch.zeros(TEXT_TOKENS, 3), "img_ids": image_ids.reshape(-1, 3), "guidance": torch.full((batch,), 3.5)}
    return TinyTransformer(rand.finish(model), latents, inputs, FlowMatchEulerDiscreteScheduler, guided=False,
                           timestep_divisor=1000.0)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    config = transformer.config
    return BlockDescription(
        blocks=[{"kind": "joint", "count": int(config.num_layers)}, {"kind": "single", "count": int(config.num_single_layers)}],
        mlp_width=transformer.single_transformer_blocks[0].proj_mlp.out_features,
        # 2x2 latent pixels packed into one token by the pipeline.
        figures={"patch_size": 2, "in_channels": int(config.in_channels) // 4},
    )


def checkpoint_of(pipe: Any) -> str:
    """Flux-dev embeds the guidance scale in its transformer; Flux-schnell does not."""
    return "flux-dev" if pipe.transformer.config.guidance_embeds else "flux-schnell"


FAMILY = Family(
    name="flux",
    pipelines={"FluxPipeline": "flux-dev"},
    adapter=FluxAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=FluxAttentionProcessor,
    stages=FluxStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=True,
    one_block_config={"num_layers": 1, "num_single_layers": 1},
    checkpoint_of=checkpoint_of,
)
