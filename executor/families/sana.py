"""SANA (Gemma-2 text, linear-attention DiT with a convolutional MLP, DPM-Solver flow steps).

A SANA block (`SanaTransformerBlock`) differs from PixArt's in two places the executor must cut:
* its self-attention is ReLU linear attention: a query attends through the key-value summary
  [v; 1] k^T of all tokens, a (head_dim + 1) x head_dim fp32 matrix per head, so a split sequence
  needs the summaries of the other tokens, never their keys and values;
* its MLP (GLUMBConv) runs a 3x3 depthwise convolution over the 2-D token grid, so a shard of
  token rows needs the row above and the row below it (a one-row halo) at every block.

Here, everything the executor needs for the family:
* `SanaAdapter`: the pipeline's `__call__` cut apart, resolution binning included (the pipeline
  generates at the nearest size of its aspect-ratio bins and resizes the decoded image back).
* sequence parallelism (`install_sequence_parallel`): the image tokens are split by whole token
  rows after the patch embedding. `SanaLinearAttentionProcessor` runs the linear attention: under
  Ulysses the all-to-all gives each rank all tokens of its heads; under Ring each rank sums the
  summaries of its tokens, and the summaries travel r - 1 hops around the ring and are added in
  ring order (every rank gets the same sum). A pre-hook on each block passes it the local token
  rows, and hooks on the MLP add the neighbouring ranks' halo rows and drop them after it.
* `SanaStages`: the PipeFusion cutter. The stale state of a linear-attention layer is each patch's
  summary (fresh for the patch computed now, the last one written for the others), kept in the
  stale-KV layer's image buffer; the MLP's halo of a patch is the row above from the patch computed
  just before (this step) and the row below from the next patch's last computation (the previous
  step: stale like the summaries, exact when warmup = steps).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from torch import nn

from costmodel.errors import DitplanError
from executor.families.base import BlockDescription, DenoiseJob, Family, FamilyAdapter, GenerationRequest, TinyTransformer
from executor.families.tiny_parts import TEXT_DIM, TinyRandom, padded_text_mask
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.stages import Carry, Cond, Gather, StagedTransformer, TokenIndex, gathered, unpatchify
from executor.pipefusion.stale_kv import TextPosition
from executor.sp import SequenceParallelHandle, install_processor
from executor.sp.comm import RingExchange, all_gather_along, group_rank, group_size, ulysses_gather_heads, ulysses_scatter_heads
from executor.sp.processors import SequenceShard, _refuse_mask, _SequenceParallelProcessor


def _resolution_bins() -> dict[int, dict[str, list[float]]]:
    """The pipeline's aspect-ratio bins by transformer sample size (as `SanaPipeline.__call__` picks them)."""
    from diffusers.pipelines.sana.pipeline_sana import (
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
        ASPECT_RATIO_2048_BIN,
        ASPECT_RATIO_4096_BIN,
    )

    return {128: ASPECT_RATIO_4096_BIN, 64: ASPECT_RATIO_2048_BIN, 32: ASPECT_RATIO_1024_BIN, 16: ASPECT_RATIO_512_BIN}


class SanaAdapter(FamilyAdapter):
    family = "sana"

    @torch.no_grad()
    def prepare(self, request: GenerationRequest) -> DenoiseJob:
        from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps

        pipe, device = self.pipe, self.device
        config = pipe.transformer.config
        height, width, steps, guidance, do_cfg, batch = self.basics(
            request, self.call_default("height"), self.call_default("width"))
        requested = (height, width)
        if self.call_default("use_resolution_binning"):
            bins = _resolution_bins().get(config.sample_size)
            if bins is None:
                raise DitplanError(f"SANA: the pipeline bins resolutions for transformer sample sizes "
                                   f"{sorted(_resolution_bins())} only; this transformer's is {config.sample_size}.")
            height, width = pipe.image_processor.classify_height_width_bin(height, width, ratios=bins)
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            request.prompts, do_cfg, negative_prompt=request.negative_prompt or "", num_images_per_prompt=1,
            device=device, clean_caption=self.call_default("clean_caption"),
            max_sequence_length=self.call_default("max_sequence_length"),
            complex_human_instruction=self.call_default("complex_human_instruction"),
        )
        scheduler = self.fresh_scheduler()
        timesteps, steps = retrieve_timesteps(scheduler, steps, device, None, None)
        # The pipeline draws float32 latents whatever the transformer's dtype.
        latents = pipe.prepare_latents(batch, config.in_channels, height, width, torch.float32, device, request.generators)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

        def branch(states: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
            return {"encoder_hidden_states": states.to(self.dtype), "encoder_attention_mask": attention_mask}

        branches = {"cond": branch(embeds, mask)}
        if do_cfg:
            branches["uncond"] = branch(negative_embeds, negative_mask)
        patch = config.patch_size
        return DenoiseJob(
            family=self.family, latents=latents, timesteps=timesteps, scheduler=scheduler, branch_inputs=branches,
            shared_inputs={"attention_kwargs": None}, guidance_scale=guidance, batch_size=batch, height=height,
            width=width, num_frames=1, latent_layout=self.latent_layout, output_type=request.output_type,
            token_grid=(1, latents.shape[-2] // patch, latents.shape[-1] // patch),
            extras={"step_kwargs": pipe.prepare_extra_step_kwargs(request.generators, self.call_default("eta")),
                    "requested_size": requested},
        )

    def model_input(self, job: DenoiseJob, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents.to(self.dtype)

    def timestep_input(self, job: DenoiseJob, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.expand(batch) * self.transformer.config.timestep_scale

    def noise_prediction(self, job: DenoiseJob, output: torch.Tensor) -> torch.Tensor:
        output = output.float()
        # Learned sigma: the transformer predicts noise and variance; the scheduler takes the noise.
        if self.transformer.config.out_channels // 2 == self.transformer.config.in_channels:
            return output.chunk(2, dim=1)[0]
        return output

    @torch.no_grad()
    def decode(self, job: DenoiseJob, latents: torch.Tensor, output_type: str | None = None) -> Any:
        output_type = output_type or job.output_type
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if self.call_default("use_resolution_binning"):
            height, width = job.extras["requested_size"]
            image = self.pipe.image_processor.resize_and_crop_tensor(image, width, height)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


# ---------------------------------------------------------------------------------------------------
# Linear attention, serial or sequence-parallel, with PipeFusion's stale summaries


def _summary(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The key-value summary [v; 1] k^T [B, heads, head_dim + 1, head_dim] of fp32 [B, heads, head_dim,
    tokens] keys and values, as diffusers' SanaLinearAttnProcessor2_0 computes it."""
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
    return torch.matmul(value, key.transpose(2, 3))


def _ring_sum(summary: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of every ring rank's summary: r - 1 hops around the ring, added in ring order so that
    every rank holds bit-identical sums."""
    ring = group_size(group)
    if ring == 1:
        return summary
    me = group_rank(group)
    parts = {me: summary}
    exchange, block = RingExchange(group), summary.contiguous()
    for hop in range(1, ring):
        exchange.start(block)
        block = exchange.wait()
        parts[(me - hop) % ring] = block
    total = parts[0]
    for index in range(1, ring):
        total = total + parts[index]
    return total


class SanaLinearAttentionProcessor(_SequenceParallelProcessor):
    """SANA's ReLU linear self-attention (`attn1`) over this rank's image tokens.

    Projections and norms run on the local tokens; Ulysses exchanges Q/K/V (all heads of my tokens
    -> my heads of the group's tokens) and the output back; Ring adds the summaries of the other
    ring ranks (`_ring_sum`). With one rank it is diffusers' processor, operation for operation.
    Under PipeFusion (a stale-KV layer's `kv_source`) the summary attended to is the sum of every
    patch's last summary; `token_patches`, the image positions of each patch, says which tokens
    are whose (the stage passes it).
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_patches: Sequence[slice] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("SanaLinearAttentionProcessor was installed on a cross-attention layer; cross-attention stays local")
        _refuse_mask(attention_mask, "a SANA linear-attention layer")
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        ulysses = self.shard.ulysses_group
        if group_size(ulysses) > 1:
            # [B, H, S/u, D] of my tokens -> [B, H/u, S, D] of my heads, in the model's dtype.
            query, key, value = ulysses_scatter_heads([x.unflatten(2, (attn.heads, -1)).transpose(1, 2)
                                                       for x in (query, key, value)], ulysses)
            query, key, value = (x.transpose(2, 3) for x in (query, key, value))  # [B, H/u, D, S]
        else:
            query, key, value = (x.transpose(1, 2).unflatten(1, (attn.heads, -1)) for x in (query, key, value))
        query, key = F.relu(query), F.relu(key)
        query, key, value = query.float(), key.float(), value.float()

        summary = self._attended_summary(key, value, token_patches)
        out = torch.matmul(summary, query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)  # [B, H/u, D, S]
        if group_size(ulysses) > 1:
            out = ulysses_gather_heads(out.transpose(2, 3).contiguous(), ulysses).transpose(2, 3)
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out

    def _attended_summary(self, key: torch.Tensor, value: torch.Tensor, token_patches: Sequence[slice] | None) -> torch.Tensor:
        source = self.kv_source
        mode = source.state.mode if source is not None else "off"
        ring = self.shard.ring_group
        if mode == "off":
            return _ring_sum(_summary(key, value), ring)
        if token_patches is None:
            raise RuntimeError("SANA stale summaries: the stage did not pass the patches' token positions")
        # The stale-KV layer's image buffer holds this rank's summary of each patch (under Ring: of its
        # share of each patch), [patches, B, heads, head_dim + 1, head_dim].
        buffer = source.image
        if mode == "fill":
            # The whole image: attend through its summary, keep each patch's for the patch steps.
            buffer.key = torch.stack([_summary(key[..., rows], value[..., rows])
                                      for rows in self._patch_rows(token_patches, key.device)])
            buffer.written = None
            return _ring_sum(_summary(key, value), ring)
        patch = list(token_patches).index(source.state.index)
        fresh = _summary(key, value)
        if buffer.key is None:  # a patch step with no warmup before it: only patches computed so far count
            buffer.key = fresh.new_zeros((len(token_patches), *fresh.shape))
            buffer.written = torch.zeros(len(token_patches), dtype=torch.bool)
        buffer.key[patch] = fresh
        if buffer.written is not None:
            buffer.written[patch] = True
            if bool(buffer.written.all()):
                buffer.written = None
        kept = range(len(token_patches)) if buffer.written is None else buffer.written.nonzero().flatten().tolist()
        total = buffer.key[kept[0]]
        for index in kept[1:]:
            total = total + buffer.key[index]
        return _ring_sum(total, ring)

    def _patch_rows(self, token_patches: Sequence[slice], device: torch.device) -> list[slice | torch.Tensor]:
        """Where each patch's tokens are in the sequence this rank attends over in a whole-image call.

        Without Ring that is the image in order. Under Ring each SP rank holds its share of every
        patch, in patch order (executor.pipefusion.hybrid), and the all-to-all puts the Ulysses
        peers' holdings one after the other: patch k is a run of s_k tokens in each peer's part."""
        u, r = group_size(self.shard.ulysses_group), group_size(self.shard.ring_group)
        if r == 1:
            return list(token_patches)
        sizes = [(rows.stop - rows.start) // (u * r) for rows in token_patches]
        per_peer, before, parts = sum(sizes), 0, []
        for size in sizes:
            parts.append(torch.cat([torch.arange(j * per_peer + before, j * per_peer + before + size)
                                    for j in range(u)]).to(device))
            before += size
        return parts


# ---------------------------------------------------------------------------------------------------
# The convolutional MLP over a strip of token rows


def _feed_forward_rows(ff: nn.Module, x: torch.Tensor, above: torch.Tensor | None, below: torch.Tensor | None) -> torch.Tensor:
    """GLUMBConv on a strip of rows [B, C, rows, W] with the rows above and below it (None at the
    image's edge, where the convolution pads): the strip's rows of the whole grid's output."""
    parts = [part for part in (above, x, below) if part is not None]
    if len(parts) == 1:
        return ff(x)
    out = ff(torch.cat(parts, dim=2))
    top = 0 if above is None else 1
    return out[:, :, top:top + x.shape[2]]


def _neighbour_rows(x: torch.Tensor, shard: SequenceShard) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The last row of the chunk before mine and the first row of the chunk after it (None at the ends),
    out of every SP rank's first and last row of `x` [B, C, rows, W], gathered in chunk order."""
    edges = _gathered(torch.cat([x[:, :, :1], x[:, :, -1:]], dim=2), 2, shard)
    chunk, ranks = shard.chunk, shard.degree
    above = edges[:, :, 2 * chunk - 1:2 * chunk] if chunk > 0 else None
    below = edges[:, :, 2 * chunk + 2:2 * chunk + 3] if chunk < ranks - 1 else None
    return above, below


def install_sequence_parallel(transformer: nn.Module, shard: SequenceShard, handle: SequenceParallelHandle) -> None:
    """Hooks and processors that run a SanaTransformer2DModel over this rank's token rows (the caller
    gathers the tokens at `proj_out`)."""
    processor = SanaLinearAttentionProcessor(shard)
    for block in transformer.transformer_blocks:
        install_processor(handle, block.attn1, processor)  # attn2 (cross-attention to the text) stays local
    grid: dict[str, int] = {}

    def split_rows(module, args, output):
        # patch_embed(latents) -> [B, rows * cols, C]: keep this rank's whole token rows.
        patch = transformer.config.patch_size
        rows, cols = args[0].shape[-2] // patch, args[0].shape[-1] // patch
        if rows % shard.degree:
            u, r = group_size(shard.ulysses_group), group_size(shard.ring_group)
            raise DitplanError(
                f"sequence parallelism: SANA's convolutional MLP needs whole token rows on every rank; {rows} token "
                f"rows do not divide over ulysses={u} x ring={r} = {u * r} ranks. Choose a height whose token rows "
                f"are a multiple of {u * r}."
            )
        grid["cols"] = cols
        return output[:, shard.split(output.shape[1], "image tokens")].contiguous()

    def local_height(module, args, kwargs):
        # block(hidden, mask, text, text_mask, timestep, height, width): the rows this rank holds.
        rows = args[0].shape[1] // grid["cols"]
        return (*args[:5], rows, *args[6:]), kwargs

    pending: list[int] = []

    def add_halo(module, args):
        above, below = _neighbour_rows(args[0], shard)
        pending.append(0 if above is None else 1)
        pending.append(args[0].shape[2])
        return (torch.cat([part for part in (above, args[0], below) if part is not None], dim=2),)

    def drop_halo(module, args, output):
        rows, top = pending.pop(), pending.pop()
        return output[:, :, top:top + rows]

    handle.add_hook(transformer.patch_embed.register_forward_hook(split_rows))
    for block in transformer.transformer_blocks:
        handle.add_hook(block.register_forward_pre_hook(local_height, with_kwargs=True))
        handle.add_hook(block.ff.register_forward_pre_hook(add_halo))
        handle.add_hook(block.ff.register_forward_hook(drop_halo))


# ---------------------------------------------------------------------------------------------------
# PipeFusion


class SanaStages(StagedTransformer):
    """SANA: image tokens in row-major order, cross-attention to the text (computed by every stage).

    The attention layers get `SanaLinearAttentionProcessor` (diffusers' arithmetic; it keeps the
    stale summaries where diffusers' processor has no hook), and each block keeps its MLP input's
    first and last row of every patch: the halo rows the neighbouring patches read."""

    family = "sana"
    first_stage_attrs = ("patch_embed",)
    last_stage_attrs = ("norm_out", "proj_out", "scale_shift_table")

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        serial = SanaLinearAttentionProcessor(SequenceShard(None, None))
        for block in transformer.transformer_blocks:
            if isinstance(block.attn1.processor, SanaLinearAttnProcessor2_0):
                block.attn1.set_processor(serial)
        self._patches: PatchLayout | None = None
        # unit -> image row -> that row of the MLP input [B, C, 1, W], for each patch's first and last row.
        self._edges: dict[int, dict[int, torch.Tensor]] = {}

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "none") for u in units]

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        layout = super().layout(latents, kwargs, patches)
        self._patches, self._edges = layout, {}
        return layout

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        batch = latents.shape[0]
        if self.config.guidance_embeds:
            raise DitplanError("PipeFusion: SANA with an embedded guidance scale (SANA-Sprint) is not supported.")
        temb, embedded = t.time_embed(timestep, batch_size=batch, hidden_dtype=latents.dtype)
        text = t.caption_norm(t.caption_projection(kwargs["encoder_hidden_states"]).view(batch, -1, self.hidden_size()))
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None and mask.ndim == 2:  # keep/discard mask -> additive bias, as the model's forward does
            mask = ((1 - mask.to(latents.dtype)) * -10000.0).unsqueeze(1)
        return {"temb": temb, "embedded": embedded, "text": text, "text_mask": mask}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        return {"hidden": self.transformer.patch_embed(latents)}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        hidden = carry["hidden"]
        batch = hidden.shape[0]
        layout = self._patches
        if layout is None:
            raise RuntimeError("SanaStages.layout() must be called before its units run")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + cond["temb"].reshape(batch, 6, -1)).chunk(6, dim=1)
        normed = (block.norm1(hidden) * (1 + scale_msa) + shift_msa).to(hidden.dtype)
        patches = [layout.token_index(m) for m in range(layout.patches)]
        hidden = hidden + gate_msa * block.attn1(normed, token_patches=patches)
        if block.attn2 is not None:
            hidden = block.attn2(hidden, encoder_hidden_states=cond["text"], attention_mask=cond["text_mask"]) + hidden
        normed = block.norm2(hidden) * (1 + scale_mlp) + shift_mlp
        grid = normed.unflatten(1, (hidden.shape[1] // layout.row_tokens, layout.row_tokens)).permute(0, 3, 1, 2)
        out = self._feed_forward(unit, block, grid, index)
        return {"hidden": hidden + gate_mlp * out.flatten(2, 3).permute(0, 2, 1)}

    def _feed_forward(self, unit: int, block: nn.Module, x: torch.Tensor, index: TokenIndex) -> torch.Tensor:
        """The MLP on this rank's rows `x` [B, C, rows, W] of the image tokens `index` (None: all), each
        contiguous run of rows with the rows just above and below it: computed in this call (by this
        or another SP rank, exchanged), else the last ones this block kept (a neighbouring patch's),
        else none (the image's edge, where the convolution pads)."""
        layout = self._patches
        shard = _shard_of(block.attn1)
        runs = _row_runs(index, layout)
        fresh = _fresh_edge_rows(x, runs, shard)
        kept = self._edges.setdefault(unit, {})
        outputs, offset = [], 0
        for first, stop in runs:
            strip = x[:, :, offset:offset + stop - first]
            offset += stop - first
            above = fresh[first - 1] if first - 1 in fresh else kept.get(first - 1)
            below = fresh[stop] if stop in fresh else kept.get(stop)
            outputs.append(_feed_forward_rows(block.ff, strip, above, below))
        if layout.patches > 1:  # keep what the neighbouring patches read: each patch's first and last row
            wanted = sorted({row for first, stop in layout.row_bounds for row in (first, stop - 1)})
            degree = shard.degree if shard is not None else 1
            if x.shape[2] * degree == layout.token_rows:  # the whole image: its inner patch edges too
                kept.update(_image_rows(x, wanted, runs, shard))
            else:
                kept.update({row: edge.clone() for row, edge in fresh.items() if row in wanted})
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = t.norm_out(carry["hidden"], cond["embedded"], t.scale_shift_table)
        hidden = gathered(t.proj_out(hidden), gather)
        return unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size,
                          hidden.shape[-1] // self.config.patch_size ** 2)


def _row_runs(index: TokenIndex, layout: PatchLayout) -> list[tuple[int, int]]:
    """The contiguous runs [first, stop) of token rows that the image tokens `index` cover, in order."""
    cols = layout.row_tokens
    if index is None:
        return [(0, layout.token_rows)]
    positions = torch.arange(index.start, index.stop) if isinstance(index, slice) else index.cpu()
    if len(positions) % cols or bool((positions[::cols] % cols).any()):
        raise DitplanError(f"SANA's convolutional MLP needs whole token rows ({cols} tokens each) on every rank; "
                           f"a share of {len(positions)} tokens is not. Choose patches x sp that divide the token rows.")
    runs: list[list[int]] = []
    for row in (positions[::cols] // cols).tolist():
        if runs and runs[-1][1] == row:
            runs[-1][1] += 1
        else:
            runs.append([row, row + 1])
    return [(first, stop) for first, stop in runs]


def _fresh_edge_rows(x: torch.Tensor, runs: list[tuple[int, int]], shard: SequenceShard | None) -> dict[int, torch.Tensor]:
    """Image row -> [B, C, 1, W]: the first and last row of every run this call computes, this rank's
    and (under SP) every other rank's."""
    edges, rows, offset = [], [], 0
    for first, stop in runs:
        edges += [x[:, :, offset:offset + 1], x[:, :, offset + stop - first - 1:offset + stop - first]]
        rows += [first, stop - 1]
        offset += stop - first
    table, positions = torch.cat(edges, dim=2), torch.tensor(rows, device=x.device)
    if shard is not None:
        table = _gathered(table, 2, shard)
        positions = _gathered(positions, 0, shard)
    return {row: table[:, :, i:i + 1] for i, row in enumerate(positions.tolist())}


def _image_rows(x: torch.Tensor, wanted: list[int], runs: list[tuple[int, int]], shard: SequenceShard | None) -> dict[int, torch.Tensor]:
    """Rows `wanted` of the whole image's MLP input, of which this rank holds the rows `runs`: each
    rank puts in the ones it holds, zeros elsewhere, and the sum over the ranks (one holder per
    row) is exact."""
    table = x.new_zeros((*x.shape[:2], len(wanted), x.shape[3]))
    offset = 0
    for first, stop in runs:
        for position, row in enumerate(wanted):
            if first <= row < stop:
                table[:, :, position] = x[:, :, offset + row - first]
        offset += stop - first
    if shard is not None:
        table = _gathered(table.unsqueeze(0), 0, shard).sum(0)
    return {row: table[:, :, i:i + 1] for i, row in enumerate(wanted)}


def _gathered(tensor: torch.Tensor, dim: int, shard: SequenceShard) -> torch.Tensor:
    """Every SP rank's `tensor` concatenated along `dim`, in chunk order."""
    return all_gather_along(all_gather_along(tensor, dim=dim, group=shard.ulysses_group), dim=dim, group=shard.ring_group)


def _shard_of(attention: nn.Module) -> SequenceShard | None:
    """The SP split of a PipeFusion stage (SequenceInStage installs the family's processor, with its
    shard, on the stage's attention layers; a stale-KV wrapper keeps it as `inner`), or None."""
    processor = attention.processor
    processor = getattr(processor, "inner", processor)
    shard = getattr(processor, "shard", None)
    return shard if shard is not None and shard.degree > 1 else None


def describe_blocks(transformer: nn.Module) -> BlockDescription:
    return BlockDescription(blocks=[{"kind": "cross", "count": len(transformer.transformer_blocks)}],
                            mlp_width=int(transformer.transformer_blocks[0].ff.conv_point.in_channels),
                            figures={"attention": "linear",
                                     "cross_attention_dim": int(transformer.config.cross_attention_dim)})


def tiny_transformer(seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4, heads: int = 4,
                     head_dim: int = 8) -> TinyTransformer:
    """A seeded tiny SANA transformer with a padded text mask (rows, cols: the latent's size)."""
    from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel

    torch.manual_seed(seed)
    hidden = heads * head_dim
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=hidden,
        caption_channels=TEXT_DIM, mlp_ratio=2.5, sample_size=rows, patch_size=1,
    )
    rand = TinyRandom(seed)
    latents = rand.randn(batch, 4, rows, cols)
    inputs = {"encoder_hidden_states": rand.text(batch), "encoder_attention_mask": padded_text_mask(batch)}

    def scheduler() -> Any:
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    return TinyTransformer(rand.finish(model), latents, inputs, scheduler)


FAMILY = Family(
    name="sana",
    pipelines={"SanaPipeline": "sana-1600m"},
    adapter=SanaAdapter,
    install_sequence_parallel=install_sequence_parallel,
    sp_processor=SanaLinearAttentionProcessor,
    stages=SanaStages,
    tiny_transformer=tiny_transformer,
    describe_blocks=describe_blocks,
    joins_attention=False,
)
