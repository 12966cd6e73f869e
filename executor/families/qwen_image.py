"""Qwen-Image: dual-stream MM-DiT blocks (text and image streams with their own weights, joint
attention over [text; image]), Qwen2.5-VL text, true CFG with a norm-preserving combination,
packed 2x2 latent tokens (as Flux), a rotary table computed inside `forward` for both streams.

The pipeline calls the transformer once per guidance branch: the prompt and the negative prompt
encode to different token counts (nothing pads them to a common length), so the executor makes one
call per branch too (`QwenImageAdapter.model_output`). PipeFusion's model batch holds both
branches, their texts padded to one length under a mask (`QwenImageAdapter.batched_inputs`);
its stages take the padding off where every row of a CFG half has the same length, and refuse the
rest at the entrance. Prompts of different lengths in one batch are padded by the pipeline itself:
diffusers' attention honours that mask, the split-sequence paths refuse it in words.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from costmodel.errors import DitplanError
from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import TEXT_DIM, TinyRandom
from executor.pipefusion.layout import PatchLayout, take_tokens
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor, split_tokens
from executor.sp.processors import SequenceShard, _SequenceParallelProcessor, _refuse_mask, _tokens_first


def _refuse_variant(config: Any) -> None:
    """The edit and layered variants condition per token (zero_cond_t) or build another rotary table;
    only the text-to-image transformer is cut apart here."""
    if getattr(config, "zero_cond_t", False) or getattr(config, "use_layer3d_rope", False):
        raise DitplanError("qwen-image: transformers with zero_cond_t or use_layer3d_rope (the edit and layered variants) "
                           "are not supported by the parallel executor; only the text-to-image transformer is.")


def _refuse_text_mask(mask: torch.Tensor | None, where: str) -> None:
    if mask is not None:
        raise DitplanError(
            f"{where}: the prompts of this batch encode to different token counts, so their text is padded under a "
            "mask, which the split sequence cannot honour; give prompts of equal token length, or one prompt per call "
            "(or per data-parallel replica)."
        )


def _common_length(mask: torch.Tensor) -> int | None:
    """The text length every row of a padding mask keeps, its padding all at the end (None: rows
    differ). Cutting the text to it is exact: masked tokens take no part in the attention."""
    mask = mask.bool()
    length = int(mask[0].sum())
    return length if bool(mask[:, :length].all()) and not bool(mask[:, length:].any()) else None


class QwenImageAdapter(FamilyAdapter):
    family = "qwen-image"
    latent_layout = "BSC"

    def default_guidance_scale(self) -> float:
        return float(self.call_default("true_cfg_scale"))  # the pipeline's CFG weight; guidance_scale is for distilled variants

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        if config.guidance_embeds:
            raise DitplanError("qwen-image: guidance-distilled transformers (guidance_embeds) are not supported; "
                               "the executor runs true classifier-free guidance.")
        height, width, steps, guidance, do_cfg, batch = self.basics(request, pipe.default_sample_size * pipe.vae_scale_factor)
        max_length = self.call_default("max_sequence_length")
        embeds, mask = pipe.encode_prompt(prompt=request.prompts, device=device, num_images_per_prompt=1,
                                          max_sequence_length=max_length)
        branches: dict[str, dict[str, Any]] = {"cond": {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}}
        if do_cfg:
            # One negative prompt per prompt (the pipeline, given a single string, would encode it once and
            # broadcast it); "" where none is given, as the other families' pipelines do.
            negative = request.negative_prompt if request.negative_prompt is not None else ""
            negative_embeds, negative_mask = pipe.encode_prompt(prompt=[negative] * batch, device=device, num_images_per_prompt=1,
                                                                max_sequence_length=max_length)
            branches["uncond"] = {"encoder_hidden_states": negative_embeds, "encoder_hidden_states_mask": negative_mask}
        latents = pipe.prepare_latents(batch, config.in_channels // 4, height, width, embeds.dtype, device, request.generators)
        rows, cols = int(height) // (pipe.vae_scale_factor * 2), int(width) // (pipe.vae_scale_factor * 2)
        scheduler = self.fresh_scheduler()
        mu = calculate_shift(
            latents.shape[1], scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15),
        )
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        scheduler.set_begin_index(0)
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=branches,
            # The rotary table is computed from the first image shape: one entry serves any batch.
            shared_inputs={"img_shapes": [[(1, rows, cols)]], "guidance": None, "attention_kwargs": {}},
            guidance_scale=guidance, batch_size=batch, height=height, width=width, num_frames=1,
            latent_layout=self.latent_layout, output_type=request.output_type, token_grid=(1, rows, cols),
        )

    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents

    def timestep_input(self, job: DenoiseJob, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.expand(batch).to(job.latents.dtype) / 1000

    def model_output(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
        # One call per branch, as the pipeline makes them: their text lengths differ.
        outputs = [self.transformer(**self.transformer_kwargs(job, latents, t, (branch,)))[0] for branch in branches]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def batched_inputs(self, job: DenoiseJob, branches: Sequence[str]) -> dict[str, Any]:
        # One batch of several branches (PipeFusion's): the shorter texts are padded to the longest
        # under a mask. The stages take the padding off again where a batch (or its CFG half) has one
        # text length (see `_common_length`).
        texts = [job.branch_inputs[b]["encoder_hidden_states"] for b in branches]
        longest = max(text.shape[1] for text in texts)
        if all(text.shape[1] == longest for text in texts):
            return super().batched_inputs(job, branches)
        masks = []
        for branch, text in zip(branches, texts):
            given = job.branch_inputs[branch]["encoder_hidden_states_mask"]
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if given is None else given.bool()
            masks.append(nn.functional.pad(mask, (0, longest - text.shape[1]), value=False))
        padded = [nn.functional.pad(text, (0, 0, 0, longest - text.shape[1])) for text in texts]
        return {"encoder_hidden_states": torch.cat(padded), "encoder_hidden_states_mask": torch.cat(masks), **job.shared_inputs}

    def combine_guidance(
        self, job: DenoiseJob, uncond: torch.Tensor, cond: torch.Tensor, step_index: int, t: torch.Tensor
    ) -> torch.Tensor:
        # The pipeline rescales each token's guided prediction to the norm of its conditional one.
        combined = uncond + job.guidance_scale * (cond - uncond)
        return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))

    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        pipe, vae = self.pipe, self.pipe.vae
        video = pipe._unpack_latents(latents, job.height, job.width, pipe.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(video.device, video.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(video.device, video.dtype)
        image = vae.decode(video / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type=output_type)


# ---------------------------------------------------------------------------------------------------
# Sequence parallelism


class QwenImageAttentionProcessor(_SequenceParallelProcessor):
    """Qwen-Image's joint attention on this rank's image tokens: separate image and text projections
    with their query/key norms and rotary tables ((image rows, text rows), the image rows cut to this
    rank's tokens), the whole text on every rank; returns (image output, text output)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        _refuse_mask(attention_mask, "a Qwen-Image attention layer")
        _refuse_text_mask(encoder_hidden_states_mask, "sequence parallelism")
        if encoder_hidden_states is None:
            raise RuntimeError("QwenImageAttentionProcessor needs the text stream (encoder_hidden_states)")
        head_dim = attn.inner_dim // attn.heads

        def project(states: torch.Tensor, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # Token-major [B, S, H, D], as the model's own processor: norms and rotary act per head vector.
            if text:
                layers, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
            else:
                layers, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
            query, key, value = (layer(states).unflatten(-1, (-1, head_dim)) for layer in layers)
            if norms[0] is not None:
                query = norms[0](query)
            if norms[1] is not None:
                key = norms[1](key)
            return query, key, value

        query, key, value = project(hidden_states, text=False)
        text_query, text_key, text_value = project(encoder_hidden_states, text=True)
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            query, key = (apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in (query, key))
            text_query, text_key = (apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in (text_query, text_key))
        heads_first = [x.transpose(1, 2) for x in (query, key, value, text_query, text_key, text_value)]
        out, text_out = self._attend(*heads_first)
        out = attn.to_out[0](_tokens_first(out).to(query.dtype).contiguous())
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out, attn.to_add_out(_tokens_first(text_out).to(query.dtype).contiguous())


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Split the image tokens after `img_in` and the image rows of the rotary table `pos_embed` computes;
    the text stream stays whole on every rank (its attention output is the same on all of them)."""
    _refuse_variant(transformer.config)
    processor = QwenImageAttentionProcessor(shard)
    for block in transformer.transformer_blocks:
        install_processor(handle, block.attn, processor)

    def unpadded_text(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        # Before the first block: every rank sees the same inputs, so all refuse alike.
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None:
            return None
        length = _common_length(mask)
        if length is None:
            _refuse_text_mask(mask, "sequence parallelism")
        return args, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:, :length], "encoder_hidden_states_mask": None}

    def my_image_rows(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image_freqs, text_freqs = output
        return image_freqs[shard.start : shard.stop], text_freqs

    handle.add_hook(transformer.register_forward_pre_hook(unpadded_text, with_kwargs=True))
    handle.add_hook(transformer.img_in.register_forward_hook(split_tokens(shard)))
    handle.add_hook(transformer.pos_embed.register_forward_hook(my_image_rows))


# ---------------------------------------------------------------------------------------------------
# PipeFusion


class _EmptyStripReshape(TorchFunctionMode):
    """For one block call on an empty text strip (more patches than text tokens): Qwen-Image's rotary
    embedding reshapes the strip's queries and keys with x.reshape(*x.shape[:-1], -1, 2), which torch
    cannot infer for zero elements; here the -1 is the size the leading dimensions leave, as for any
    non-empty strip. Scoped to that call; everything else passes through."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.reshape and args[0].numel() == 0:
            tensor, *shape = args
            shape = list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else list(shape)
            if -1 in shape:
                at = shape.index(-1)
                trailing = math.prod(shape[at + 1:])
                if tuple(shape[:at]) == tuple(tensor.shape[:at]) and math.prod(tensor.shape[at:]) % trailing == 0:
                    shape[at] = math.prod(tensor.shape[at:]) // trailing
            return func(tensor, shape, **kwargs)
        return func(*args, **kwargs)


class QwenImageStages(StagedTransformer):
    """One unit per dual-stream block; the text stream travels with the patches in strips."""

    family = "qwen-image"
    carries_text = True
    first_stage_attrs = ("img_in", "txt_norm", "txt_in")
    last_stage_attrs = ("norm_out", "proj_out")

    def __init__(self, transformer: nn.Module) -> None:
        _refuse_variant(transformer.config)
        super().__init__(transformer)

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn, "first") for u in units]  # joint order [text; image]

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        # Packed latents [B, rows*cols, C]: the grid is the pipeline's image shape (frames, rows, cols).
        _, rows, cols = kwargs["img_shapes"][0][0]
        if rows * cols != latents.shape[-2]:
            raise ValueError(f"qwen-image img_shapes describe a {rows}x{cols} grid but the latents hold {latents.shape[-2]} tokens")
        return PatchLayout(rows, cols, cols, 1, patches)

    def input_problems(self, kwargs: dict[str, Any], cfg: int) -> list[str]:
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None or all(_common_length(half) is not None for half in mask.chunk(cfg)):
            return []
        return ["the qwen-image model batch holds texts of different token lengths (the prompt and the negative "
                "prompt, or prompts of different lengths), which only a padding mask could join, and a patch's "
                "attention to the stale K/V cannot honour one; run the guidance branches on separate ranks (cfg=2) "
                "or without guidance (guidance_scale 1), with prompts of equal token length"]

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        text, mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")
        if mask is not None:
            length = _common_length(mask)
            if length is None:  # refused at the entrance (input_problems)
                raise DitplanError(self.input_problems(kwargs, 1)[0] + ".")
            text = text[:, :length]  # the padding masked out is no text at all: take it off, exactly
        temb = t.time_text_embed(timestep.to(latents.dtype), latents, kwargs.get("additional_t_cond"))
        rotary = t.pos_embed(kwargs["img_shapes"], max_txt_seq_len=text.shape[1], device=latents.device)
        return {"temb": temb, "rotary": rotary, "raw_text": text, "text_tokens": text.shape[1]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        return {"hidden": t.img_in(latents), "text": t.txt_in(t.txt_norm(cond["raw_text"]))}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        image_freqs, text_freqs = cond["rotary"]
        rotary = (image_freqs if index is None else take_tokens(image_freqs, index, dim=0),
                  text_freqs if text_index is None else text_freqs[text_index])
        with _EmptyStripReshape() if carry["text"].shape[1] == 0 else contextlib.nullcontext():
            text, hidden = self.transformer.transformer_blocks[unit](
                hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], encoder_hidden_states_mask=None,
                temb=cond["temb"], image_rotary_emb=rotary, joint_attention_kwargs=None,
            )
        return {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        return gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"])), gather)


# ---------------------------------------------------------------------------------------------------
# Tiny transformer and cost-model description


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny Qwen-Image transformer with packed latents of (rows/2) x (cols/2) tokens and
    their image shape; the guidance rows share one text length (no padding mask)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    frame_axis = 2 * (head_dim // 8)  # three even rotary axes (frame, row, column) that fill head_dim
    row_axis = 2 * ((head_dim - frame_axis) // 4)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=TEXT_DIM, axes_dims_rope=(frame_axis, row_axis, head_dim - frame_axis - row_axis),
    )
    rand = TinyRandom(seed)
    token_rows, token_cols = rows // 2, cols // 2
    latents = rand.randn(batch, token_rows * token_cols, 64)
    inputs = {"encoder_hidden_states": rand.text(batch), "encoder_hidden_states_mask": None,
              "img_shapes": [[(1, token_rows, token_cols)]]}
    return TinyTransformer(rand.finish(model), latents, inputs, FlowMatchEulerDiscreteScheduler, timestep_divisor=1000.0)


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(
        blocks=[{"kind": "joint", "count": int(transformer.config.num_layers)}],
        mlp_width=transformer.transformer_blocks[0].img_mlp.net[2].in_features,
        # 2x2 latent pixels packed into one token by the pipeline.
        figures={"in_channels": int(transformer.config.in_channels) // 4},
    )


FAMILY = Family(
    name="qwen-image",
    pipelines={"QwenImagePipeline": "qwen-image"},
    adapter=QwenImageAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=QwenImageAttentionProcessor,
    stages=QwenImageStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=True,
)
