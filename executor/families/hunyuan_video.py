"""HunyuanVideo text-to-video: dual-stream blocks (image and text streams with their own weights,
joint attention over [image; text]) then single-stream blocks (one stream over the concatenation),
Llama text refined per token, CLIP pooled text, 3-D rotary over the video tokens, embedded guidance.

The pipeline pads the Llama text to `max_sequence_length` at the end and passes the padding mask;
the transformer runs its token refiner (self-attention among the text tokens, under that mask) and
turns the mask into a key mask over the joint sequence that drops the padded text keys. The
split-sequence paths here take the padding off instead, after the refiner: a key that every query
ignores is no key at all, so cutting the text to the tokens it keeps is exact (the padded text
tokens' own outputs never reach an image token). That needs one kept length per batch (the rows of
one call, or of one CFG half); other batches are refused in words.

Guidance is embedded (`guidance_scale` enters the conditioning, as Flux-dev's), so a job has only
the "cond" branch; the pipeline's true CFG (`true_cfg_scale` with a negative prompt) is not run by
the executor. The image-to-video variants (`image_condition_type`) are refused.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from costmodel.errors import DitplanError
from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import POOLED_DIM, TEXT_DIM, TEXT_TOKENS, TinyRandom
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, rotary_rows
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, split_tokens
from executor.sp.processors import SequenceShard, _SequenceParallelProcessor, _tokens_first


def _refuse_variant(config: Any) -> None:
    if getattr(config, "image_condition_type", None) is not None:
        raise DitplanError(
            f"hunyuan-video: transformers with image_condition_type={config.image_condition_type!r} (the image-to-video "
            "variants) are not supported by the parallel executor; only the text-to-video transformer is."
        )


def kept_text_length(mask: torch.Tensor | None, tokens: int) -> int | None:
    """The text tokens every row of a padding mask keeps, its padding all at the end (None: the rows
    keep different counts). No mask keeps all `tokens`."""
    if mask is None:
        return tokens
    mask = mask.bool()
    length = int(mask[0].sum())
    return length if bool(mask[:, :length].all()) and not bool(mask[:, length:].any()) else None


def _mixed_lengths(where: str) -> str:
    return (f"{where}: the prompts of this batch keep different numbers of text tokens under the padding mask, which "
            "the split sequence cannot honour; give prompts of equal token length, or one prompt per call (or per "
            "data-parallel replica)")


class HunyuanVideoAdapter(FamilyAdapter):
    family = "hunyuan-video"
    latent_layout = "BCFHW"
    is_video = True

    def __init__(self, pipe: Any) -> None:
        _refuse_variant(pipe.transformer.config)
        super().__init__(pipe)

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False  # the guidance scale is embedded; true CFG (true_cfg_scale) is not run here

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import retrieve_timesteps

        pipe, device, dtype = self.pipe, self.device, self.dtype
        config = pipe.transformer.config
        height, width, steps, guidance, _, batch = self.basics(request, self.call_default("height"), self.call_default("width"))
        if height % 16 or width % 16:
            raise DitplanError(f"hunyuan-video: height and width must be multiples of 16 pixels; {height}x{width} is not.")
        num_frames = request.num_frames or self.call_default("num_frames")
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=request.prompts, prompt_template=self.call_default("prompt_template"), num_videos_per_prompt=1,
            device=device, max_sequence_length=self.call_default("max_sequence_length"),
        )
        scheduler = self.fresh_scheduler()
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas)
        # The pipeline draws float32 latents whatever the transformer's dtype.
        latents = pipe.prepare_latents(batch, config.in_channels, height, width, num_frames, torch.float32, device,
                                       request.generators)
        scheduler.set_begin_index(0)
        cond = {
            "encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "guidance": torch.tensor([guidance] * batch, dtype=dtype, device=device) * 1000.0,
        }
        p, p_t = config.patch_size, config.patch_size_t
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs={"cond": cond},
            shared_inputs={"attention_kwargs": None}, guidance_scale=guidance, batch_size=batch, height=height,
            width=width, num_frames=num_frames, latent_layout=self.latent_layout, output_type=request.output_type,
            token_grid=(latents.shape[2] // p_t, latents.shape[-2] // p, latents.shape[-1] // p),
        )

    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents.to(self.dtype)

    def timestep_input(self, job: DenoiseJob, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.expand(batch).to(job.latents.dtype)

    @torch.no_grad()
    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type=output_type)


# ---------------------------------------------------------------------------------------------------
# Sequence parallelism


class HunyuanVideoAttentionProcessor(_SequenceParallelProcessor):
    """HunyuanVideo's joint attention on this rank's video tokens, the text whole on every rank.

    Dual-stream layers project the text with their own `add_*` projections and norms and return
    (video output, text output) through `to_out` and `to_add_out`; single-stream layers project both
    with the same weights and return both unprojected. The rotary table (its rows cut to this rank's
    tokens) applies to the video tokens only. The key mask the transformer builds keeps every key
    here: the text reaching these layers is cut to the tokens the padding mask keeps (see the module
    docstring), so the mask is not applied."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise RuntimeError("HunyuanVideoAttentionProcessor needs the text stream (encoder_hidden_states)")
        dual_stream = attn.add_q_proj is not None

        def project(states: torch.Tensor, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # Token-major [B, S, H, D], as the model's own processor: norms and rotary act per head vector.
            if text and dual_stream:
                layers, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
            else:
                layers, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
            query, key, value = (layer(states).unflatten(2, (attn.heads, -1)) for layer in layers)
            if norms[0] is not None:
                query = norms[0](query)
            if norms[1] is not None:
                key = norms[1](key)
            return query, key, value

        query, key, value = project(hidden_states, text=False)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_query, text_key, text_value = project(encoder_hidden_states, text=True)
        out, text_out = self._attend(*(x.transpose(1, 2) for x in (query, key, value, text_query, text_key, text_value)))
        out, text_out = _tokens_first(out).to(query.dtype), _tokens_first(text_out).to(query.dtype)
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Split the video tokens after `x_embedder` and the rows of the rotary table `rope` computes (it
    runs first, so it fixes the split); cut the refined text to the tokens its padding mask keeps.
    The token refiner runs whole on every rank (per-sample work every rank repeats)."""
    _refuse_variant(transformer.config)
    processor = HunyuanVideoAttentionProcessor(shard)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        install_processor(handle, block.attn, processor)

    def my_rotary_rows(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        rows = shard.split(output[0].shape[0], "video tokens")
        return tuple(table[rows] for table in output)

    def kept_text(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        # context_embedder(text, timestep, mask): the forward then builds its key mask from the mask's
        # kept count and the text's length, so with the text cut to that count it keeps every key.
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        length = kept_text_length(mask, output.shape[1])
        if length is None:
            raise DitplanError(_mixed_lengths("sequence parallelism") + ".")
        return output[:, :length]

    handle.add_hook(transformer.rope.register_forward_hook(my_rotary_rows))
    handle.add_hook(transformer.x_embedder.register_forward_hook(split_tokens(shard, "video tokens")))
    handle.add_hook(transformer.context_embedder.register_forward_hook(kept_text, with_kwargs=True))


# ---------------------------------------------------------------------------------------------------
# PipeFusion


class _EmptyTextStrip(TorchFunctionMode):
    """For one block call on an empty text strip (more patches than text tokens): HunyuanVideo's
    blocks and attention split [video; text] apart with x[:, :-n] and x[:, -n:], which for n = 0 give
    nothing and everything instead of everything and nothing. Here those two slices of the token
    dimension mean what they mean for any n > 0. Scoped to that call; every other index passes."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.Tensor.__getitem__ and isinstance(args[1], tuple) and len(args[1]) > 1 and args[1][0] == slice(None):
            token_slice = args[1][1]
            if token_slice == slice(None, 0):  # x[:, :-0]: all but the (no) text tokens
                token_slice = slice(None)
            elif token_slice == slice(0, None):  # x[:, -0:]: the (no) text tokens
                token_slice = slice(0, 0)
            args = (args[0], (args[1][0], token_slice, *args[1][2:]))
        return func(*args, **(kwargs or {}))


class HunyuanVideoStages(StagedTransformer):
    """Dual-stream blocks then single-stream blocks, one unit each; a row strip spans every frame.
    The refined text (cut to the tokens its mask keeps) travels with the patches in strips, after
    the video tokens in the joint sequence."""

    family = "hunyuan-video"
    carries_text = True
    first_stage_attrs = ("x_embedder", "context_embedder")
    last_stage_attrs = ("norm_out", "proj_out")

    def __init__(self, transformer: nn.Module) -> None:
        _refuse_variant(transformer.config)
        super().__init__(transformer)

    def _dual(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_count(self) -> int:
        return self._dual() + len(self.transformer.single_transformer_blocks)

    def _block(self, unit: int) -> tuple[nn.ModuleList, int]:
        if unit < self._dual():
            return self.transformer.transformer_blocks, unit
        return self.transformer.single_transformer_blocks, unit - self._dual()

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [self._block(unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        out: list[tuple[nn.Module, TextPosition]] = []
        for unit in units:
            blocks, i = self._block(unit)
            out.append((blocks[i].attn, "last"))  # both block kinds attend over [video; text]
        return out

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        p, p_t = self.config.patch_size, self.config.patch_size_t
        return PatchLayout(latents.shape[-2] // p, latents.shape[-1] // p, p, latents.shape[2] // p_t, patches)

    def input_problems(self, kwargs: dict[str, Any], cfg: int) -> list[str]:
        mask, text = kwargs.get("encoder_attention_mask"), kwargs["encoder_hidden_states"]
        halves = mask.chunk(cfg) if mask is not None else [None]
        return [_mixed_lengths("PipeFusion")] if any(kept_text_length(half, text.shape[1]) is None for half in halves) else []

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        text, mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_attention_mask")
        length = kept_text_length(mask, text.shape[1])
        if length is None:  # refused at the entrance (input_problems)
            raise DitplanError(_mixed_lengths("PipeFusion") + ".")
        temb, _ = t.time_text_embed(timestep, kwargs["pooled_projections"], kwargs.get("guidance"))
        return {"temb": temb, "rotary": t.rope(latents), "raw_text": text, "text_mask": mask, "timestep": timestep,
                "text_tokens": length, "batch": latents.shape[0], "frames": latents.shape[2]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        # The refiner sees the padded text under its mask, as in the forward; its kept tokens go on.
        text = t.context_embedder(cond["raw_text"], cond["timestep"], cond["text_mask"])
        return {"hidden": t.x_embedder(latents), "text": text[:, : cond["text_tokens"]]}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        blocks, i = self._block(unit)
        with _EmptyTextStrip() if carry["text"].shape[1] == 0 else contextlib.nullcontext():
            hidden, text = blocks[i](carry["hidden"], carry["text"], cond["temb"], None, rotary_rows(cond["rotary"], index))
        return {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"])), gather)
        p, p_t = self.config.patch_size, self.config.patch_size_t
        x = hidden.reshape(cond["batch"], cond["frames"] // p_t, self._rows_of(layout, patch), layout.row_tokens, -1, p_t, p, p)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ---------------------------------------------------------------------------------------------------
# Tiny transformer and cost-model description


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny HunyuanVideo transformer (half the layers dual-stream, half single-stream, the
    real model's MLP ratio) over 2 latent frames (rows, cols: the latent's size); every row's text
    ends in two padding tokens under the mask, so the padded keys must stay out of the attention.
    Its token refiner keeps its embeddings but no self-attention layer: next to four blocks this
    small, one refiner layer would put most of the model on the first PipeFusion stage, which the
    real model's two refiner layers next to its 60 blocks do not (the tiny pipeline has one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    frame_axis = 2 * (head_dim // 8)  # three even rotary axes (frame, row, column) that fill head_dim
    row_axis = 2 * ((head_dim - frame_axis) // 4)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
        num_layers=layers // 2, num_single_layers=layers - layers // 2, num_refiner_layers=0, mlp_ratio=4.0,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(frame_axis, row_axis, head_dim - frame_axis - row_axis),
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, 2, rows, cols)
    mask = torch.ones(batch, TEXT_TOKENS)
    mask[:, -2:] = 0
    inputs = {"encoder_hidden_states": rand.text(batch), "encoder_attention_mask": mask,
              "pooled_projections": rand.randn(batch, POOLED_DIM), "guidance": torch.full((batch,), 6000.0)}
    return TinyTransformer(rand.finish(model), latents, inputs, FlowMatchEulerDiscreteScheduler, guided=False)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    config = transformer.config
    return BlockDescription(
        blocks=[{"kind": "joint", "count": int(config.num_layers)}, {"kind": "single", "count": int(config.num_single_layers)}],
        mlp_width=transformer.single_transformer_blocks[0].proj_mlp.out_features,
        figures={"temporal_patch_size": int(config.patch_size_t)},
    )


FAMILY = Family(
    name="hunyuan-video",
    pipelines={"HunyuanVideoPipeline": "hunyuan-video"},
    adapter=HunyuanVideoAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=HunyuanVideoAttentionProcessor,
    stages=HunyuanVideoStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=True,
    one_block_config={"num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1},
)
