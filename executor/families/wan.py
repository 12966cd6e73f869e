"""Wan 2.1 text-to-video (umT5 text, cross-attention DiT over 3-D patches, UniPC flow-matching steps).

The transformer (`WanTransformer3DModel`) computes its own 3-D rotary table (`self.rope`, one row per
video token, applied inside Wan's attention processor), embeds the latent with a Conv3d whose output
`forward` flattens into frame-major tokens, and runs blocks of self-attention (every video token),
cross-attention to the text (per query token) and a feed-forward.

Here, everything the executor needs for the family:
* `WanAdapter`: the pipeline's `__call__` cut apart. The pipeline calls the transformer once per
  guidance branch, so the serial loop does too (`model_output`).
* sequence parallelism (`install_sequence_parallel`): the token split cannot hook the patch
  embedding, whose output is still a [batch, hidden, frames, rows, cols] grid flattened later inside
  `forward`; it is a pre-hook on the first block, the first place the [batch, tokens, hidden]
  sequence exists. The rotary table is cut where it is made (a hook on `rope`), so every block's
  self-attention gets this rank's rows. Cross-attention (`attn2`) stays local.
* `WanStages`: the PipeFusion cutter (conditioning, patch embedding, blocks, head on a row strip).

Wan 2.2 A14B's two experts (`transformer_2`, `boundary_ratio`) take turns as in the pipeline's
`__call__`: the high-noise `transformer` runs while t >= boundary_ratio x the training timesteps,
then the low-noise `transformer_2`, whose steps are guided with `guidance_scale_2` (default: the
guidance scale). The adapter lists both as its `experts`; every method installs on each.
Per-token timesteps (`expand_timesteps`, TI2V) are refused in words.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from costmodel.errors import DitplanError
from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import TEXT_DIM, TinyRandom
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, rotary_rows
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor
from executor.sp.processors import SequenceShard, _project_out, _refuse_mask, _SequenceParallelProcessor


def _refuse_unsupported(pipe: Any) -> None:
    if pipe.transformer is None:
        raise DitplanError("Wan: the pipeline has no transformer loaded.")
    second = getattr(pipe, "transformer_2", None)
    if getattr(pipe.config, "boundary_ratio", None) is not None:
        if second is None:
            raise DitplanError("Wan: the pipeline has a boundary_ratio but no transformer_2 (the low-noise expert) to run "
                               "below it.")
        shapes = [(int(t.config.num_layers), int(t.config.num_attention_heads), int(t.config.attention_head_dim))
                  for t in (pipe.transformer, second)]
        if shapes[0] != shapes[1]:
            raise DitplanError(f"Wan: the two experts differ in (layers, heads, head size): {shapes[0]} and {shapes[1]}; "
                               "the executor cuts both alike, so they must have the same shape.")
    if getattr(pipe.config, "expand_timesteps", False):
        raise DitplanError(
            "Wan: this pipeline expands the timestep per token (expand_timesteps: Wan 2.2 TI2V); the executor runs "
            "pipelines with one timestep per sample only."
        )


class WanAdapter(FamilyAdapter):
    family = "wan"
    latent_layout = "BCFHW"
    is_video = True

    def __init__(self, pipe: Any) -> None:
        _refuse_unsupported(pipe)
        super().__init__(pipe)

    @property
    def experts(self) -> list[nn.Module]:
        """The high-noise `transformer`, and where the pipeline has a boundary the low-noise `transformer_2`."""
        if getattr(self.pipe.config, "boundary_ratio", None) is None:
            return [self.pipe.transformer]
        return [self.pipe.transformer, self.pipe.transformer_2]

    def combine_guidance(self, job: DenoiseJob, uncond: torch.Tensor, cond: torch.Tensor, step_index: int,
                         t: torch.Tensor) -> torch.Tensor:
        """The pipeline's guidance: the low-noise expert's steps take `guidance_scale_2`."""
        scale = job.guidance_scale if job.expert_of(t) == 0 else job.extras["guidance_scale_2"]
        return uncond + scale * (cond - uncond)

    def model_output(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
        """One transformer call per guidance branch, as the pipeline makes them (a batch of two moves
        the last bits of some kernels)."""
        return torch.cat([FamilyAdapter.model_output(self, job, latents, t, (branch,)) for branch in branches])

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(
            request, self.call_default("height"), self.call_default("width"))
        boundary_ratio = getattr(pipe.config, "boundary_ratio", None)
        if height % 16 or width % 16:
            raise DitplanError(f"Wan: height and width must be multiples of 16 pixels; {height}x{width} is not.")
        # The pipeline's own rounding: 4k + 1 frames, a size that patchifies whole.
        temporal = pipe.vae_scale_factor_temporal
        num_frames = request.num_frames or self.call_default("num_frames")
        if num_frames % temporal != 1:
            num_frames = num_frames // temporal * temporal + 1
        num_frames = max(num_frames, 1)
        _, patch_h, patch_w = config.patch_size
        height = height // (pipe.vae_scale_factor_spatial * patch_h) * (pipe.vae_scale_factor_spatial * patch_h)
        width = width // (pipe.vae_scale_factor_spatial * patch_w) * (pipe.vae_scale_factor_spatial * patch_w)

        embeds, negative_embeds = pipe.encode_prompt(
            prompt=request.prompts, negative_prompt=request.negative_prompt, do_classifier_free_guidance=do_cfg,
            num_videos_per_prompt=1, max_sequence_length=self.call_default("max_sequence_length"), device=device,
        )
        embeds = embeds.to(self.dtype)
        scheduler = self.fresh_scheduler()
        scheduler.set_timesteps(steps, device=device)
        # The pipeline draws float32 latents whatever the transformer's dtype.
        latents = pipe.prepare_latents(batch, config.in_channels, height, width, num_frames, torch.float32, device,
                                       request.generators)
        scheduler.set_begin_index(0)
        branches = {"cond": {"encoder_hidden_states": embeds}}
        if do_cfg:
            branches["uncond"] = {"encoder_hidden_states": negative_embeds.to(self.dtype)}
        patch_t = config.patch_size[0]
        boundary = None if boundary_ratio is None else boundary_ratio * scheduler.config.num_train_timesteps
        guidance_2 = guidance if request.guidance_scale_2 is None else float(request.guidance_scale_2)
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=scheduler.timesteps, scheduler=scheduler,
            branch_inputs=branches, shared_inputs={"attention_kwargs": None}, guidance_scale=guidance,
            batch_size=batch, height=height, width=width, num_frames=num_frames, latent_layout=self.latent_layout,
            output_type=request.output_type,
            token_grid=(latents.shape[2] // patch_t, latents.shape[-2] // patch_h, latents.shape[-1] // patch_w),
            extras={"guidance_scale_2": guidance_2}, expert_boundary=boundary,
        )

    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents.to(self.dtype)

    @torch.no_grad()
    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type=output_type)


# ---------------------------------------------------------------------------------------------------
# Sequence parallelism


def apply_wan_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [batch, tokens, heads, head_dim] states: each adjacent channel pair
    (even, odd) is rotated by its angle; the tables repeat each angle's cos/sin on both channels of
    its pair and broadcast over batch and heads. Computed in the tables' precision (float64), then
    cast back, as the model's processor does."""
    even, odd = states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return rotated.to(states.dtype)


class WanSequenceParallelProcessor(_SequenceParallelProcessor):
    """Wan's self-attention (`attn1`) over this rank's video tokens: projections, RMS norms over all
    heads and the 3-D rotary (its rows already cut to these tokens) locally, then SP attention."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("WanSequenceParallelProcessor was installed on a cross-attention layer; cross-attention stays local")
        _refuse_mask(attention_mask, "a Wan self-attention layer")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))  # [B, S, H, D]
        if rotary_emb is not None:
            query, key = apply_wan_rotary(query, *rotary_emb), apply_wan_rotary(key, *rotary_emb)
        out, _ = self._attend(*(x.transpose(1, 2) for x in (query, key, value)))
        return _project_out(attn, out, query.dtype)


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Hooks and processors that run a WanTransformer3DModel over this rank's share of the video tokens
    (the caller gathers the tokens at `proj_out`)."""
    processor = WanSequenceParallelProcessor(shard)
    for block in transformer.blocks:
        install_processor(handle, block.attn1, processor)  # attn2 (cross-attention to the text) stays local

    def cut_rotary(module, args, output):
        # rope(latents) -> (cos, sin), each [1, tokens, 1, head_dim]: keep this rank's rows.
        rows = shard.split(output[0].shape[1], "video tokens")
        return tuple(table[:, rows] for table in output)

    def split_tokens(module, args, kwargs):
        # blocks[0](hidden_states, encoder_hidden_states, temb, rotary_emb): the first [B, tokens, hidden].
        if kwargs.get("hidden_states") is not None:
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden[:, shard.split(hidden.shape[1], "video tokens")].contiguous()}
        hidden = args[0]
        return (hidden[:, shard.split(hidden.shape[1], "video tokens")].contiguous(), *args[1:]), kwargs

    def refuse_token_timesteps(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None and timestep.ndim == 2:
            raise DitplanError("sequence parallelism: Wan with a timestep per token (expand_timesteps) is not supported; "
                               "its per-token modulation would need the same split.")

    handle._hooks.append(transformer.register_forward_pre_hook(refuse_token_timesteps, with_kwargs=True))
    handle._hooks.append(transformer.rope.register_forward_hook(cut_rotary))
    handle._hooks.append(transformer.blocks[0].register_forward_pre_hook(split_tokens, with_kwargs=True))


# ---------------------------------------------------------------------------------------------------
# PipeFusion


class WanStages(StagedTransformer):
    """Wan: one frame-major sequence of video tokens; a row strip spans every frame. The text is
    conditioning (cross-attention), computed by every stage; the rotary table's rows follow the patch."""

    family = "wan"
    first_stage_attrs = ("patch_embedding",)
    last_stage_attrs = ("norm_out", "proj_out", "scale_shift_table")

    def unit_count(self) -> int:
        return len(self.transformer.blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.blocks[u].attn1, "none") for u in units]

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        p_t, p_h, p_w = self.config.patch_size
        return PatchLayout(latents.shape[-2] // p_h, latents.shape[-1] // p_w, p_h, latents.shape[2] // p_t, patches)

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        if timestep.ndim != 1:
            raise DitplanError("PipeFusion: Wan with a timestep per token (expand_timesteps) is not supported.")
        temb, projected, text, image = t.condition_embedder(
            timestep, kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_image"))
        if image is not None:
            text = torch.cat([image, text], dim=1)
        # (cos, sin) as [tokens, 1, head_dim]: rows index the tokens, and they broadcast over batch and heads.
        rotary = tuple(table[0] for table in t.rope(latents))
        return {"temb": temb, "modulation": projected.unflatten(1, (6, -1)), "text": text, "rotary": rotary,
                "batch": latents.shape[0], "frames": latents.shape[2]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        return {"hidden": self.transformer.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.blocks[unit]
        return {"hidden": block(carry["hidden"], cond["text"], cond["modulation"], rotary_rows(cond["rotary"], index))}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = carry["hidden"]
        shift, scale = (t.scale_shift_table + cond["temb"].unsqueeze(1)).chunk(2, dim=1)
        hidden = (t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = gathered(t.proj_out(hidden), gather)
        p_t, p_h, p_w = self.config.patch_size
        x = hidden.reshape(cond["batch"], cond["frames"] // p_t, self._rows_of(layout, patch), layout.row_tokens,
                           p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(blocks=[{"kind": "cross", "count": len(transformer.blocks)}],
                            mlp_width=int(transformer.blocks[0].ffn.net[2].in_features),
                            figures={"temporal_patch_size": int(transformer.config.patch_size[0])})


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny Wan transformer over 2 latent frames (rows, cols: the latent's size); its rotary
    table is its own, made inside `forward`."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=2 * heads * head_dim, num_layers=layers, rope_max_seq_len=64,
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, 2, rows, cols)

    def scheduler() -> Any:
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    return TinyTransformer(rand.finish(model), latents, {"encoder_hidden_states": rand.text(batch)}, scheduler)


def checkpoint_of(pipe: Any) -> str:
    """A WanPipeline with two experts is Wan 2.2 A14B's; one with a transformer alone, Wan 2.1's."""
    two_experts = getattr(pipe, "transformer_2", None) is not None and pipe.config.boundary_ratio is not None
    return "wan2.2-t2v-a14b" if two_experts else "wan2.1-t2v-1.3b"


FAMILY = Family(
    name="wan",
    pipelines={"WanPipeline": "wan2.1-t2v-1.3b"},
    adapter=WanAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=WanSequenceParallelProcessor,
    stages=WanStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=False,
    checkpoint_of=checkpoint_of,
)
