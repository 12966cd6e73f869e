"""Each family's transformer cut into pipeline pieces: conditioning, embedding, blocks, head.

`forward` of a diffusers DiT is: conditioning (timestep / pooled-text / caption embeddings, rotary
tables), patch embedding, a stack of blocks, an output head (norm, projection, unpatchify). Here the
same computation is exposed piece by piece so that
- a pipeline stage can run a contiguous range of "units" (a block; Latte: a spatial+temporal pair;
  Flux: the double-stream blocks then the single-stream blocks),
- any piece can run on one patch (a row strip of token rows) instead of the whole image.

Conditioning is cheap and needed by every block, so every stage computes it from the step's inputs;
the patch embedding lives on the first stage, the head on the last. The state passed from stage to
stage is the "carry": the image tokens of the patch, the patch's strip of the text stream where it
evolves through the blocks (SD3, Flux, CogVideoX: the text is split into M strips like the image
rows, PatchLayout.text_slice, and its K/V are buffered like the image's, see stale_kv.py) and
HunyuanDiT's long skips.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from executor.pipefusion.layout import PatchLayout, take_tokens
from executor.pipefusion.stale_kv import TextPosition

Carry = dict[str, torch.Tensor]
Cond = dict[str, Any]
TokenIndex = slice | torch.Tensor | None  # None: the whole image
Gather = Callable[[torch.Tensor], torch.Tensor] | None


def _gathered(tokens: torch.Tensor, gather: Gather) -> torch.Tensor:
    return tokens if gather is None else gather(tokens)


def _unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch: int, channels: int) -> torch.Tensor:
    """[N, rows*cols, patch*patch*channels] -> [N, channels, rows*patch, cols*patch]."""
    n = tokens.shape[0]
    x = tokens.reshape(n, rows, cols, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, rows * patch, cols * patch)


def _rotary_rows(rotary: Any, index: TokenIndex, text_tokens: int = 0, text_index: slice | None = None) -> Any:
    """Rows of a (cos, sin) rotary table for the patch's tokens. The table's first `text_tokens`
    rows are the text's (Flux); of those the patch's text strip `text_index` is kept (None: all)."""
    if rotary is None or (index is None and text_index is None):
        return rotary
    parts = []
    for table in rotary:
        image = table[text_tokens:] if index is None else take_tokens(table[text_tokens:], index, dim=0)
        text = table[:text_tokens] if text_index is None else table[:text_tokens][text_index]
        parts.append(torch.cat([text, image]) if text_tokens else image)
    return tuple(parts)


class StagedTransformer:
    """Base of the per-family decompositions; see the module docstring."""

    family: str = ""
    first_stage_attrs: tuple[str, ...] = ()
    last_stage_attrs: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.config = transformer.config
        # Figures of the last PipeFusion run on this rank (stage units, K/V buffer bytes, bytes sent).
        self.stats: dict[str, Any] = {}
        # Parameters per unit, taken while every block is present (stages are balanced by them).
        self.unit_weights = [
            sum(p.numel() for blocks, i in self.unit_modules(u) for p in blocks[i].parameters()) for u in range(self.unit_count())
        ]

    # -- structure -------------------------------------------------------------------------
    def unit_count(self) -> int:
        raise NotImplementedError

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        """(module list, position) of every block in `unit`."""
        raise NotImplementedError

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        """Self-attention modules over image tokens in `units`, and where their text tokens sit."""
        raise NotImplementedError

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        """The token grid of `latents` (latent rows and columns last, square patches of the
        transformer's `patch_size`, one frame of tokens); Flux and CogVideoX lay theirs out otherwise."""
        p = self.config.patch_size
        return PatchLayout(latents.shape[-2] // p, latents.shape[-1] // p, p, 1, patches)

    # -- computation -----------------------------------------------------------------------
    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        raise NotImplementedError

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        """The carry for the whole image (the first stage's job)."""
        raise NotImplementedError

    def select(self, carry: Carry, index: TokenIndex, text_index: slice | None = None) -> Carry:
        """The carry of one patch out of the whole image's: its image tokens and its text strip."""
        out = dict(carry)
        if index is not None:
            out["hidden"] = take_tokens(carry["hidden"], index, dim=1)
        if text_index is not None and "text" in carry:
            out["text"] = carry["text"][:, text_index]
        return out

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        """Run `unit` on the carry of image tokens `index` (None: all) and, for joint-attention
        families, of the text strip `text_index` (None: the whole text)."""
        raise NotImplementedError

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        """Latent-shaped model output for the patch (or the whole image when `patch` is None).

        `gather`, under sequence parallelism, reassembles the patch's output tokens [N, tokens, C]
        from the ranks' shares before they are unpatchified."""
        raise NotImplementedError

    carries_text = False  # the text stream evolves through the blocks and travels with the patch

    def hidden_size(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def carry_spec(self, cond: Cond, batch: int, tokens: int, text_tokens: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the carry passed from a stage to the next for `tokens` image tokens and a text
        strip of `text_tokens` (skips aside).

        Derived from the configuration alone, so a stage knows what it will receive before it
        receives it (gloo needs the sizes of both ends to agree).
        """
        spec = {"hidden": (batch, tokens, self.hidden_size())}
        if self.carries_text:
            spec["text"] = (batch, text_tokens, self.hidden_size())
        return spec

    def skip_pairs(self) -> list[tuple[int, int, str]]:
        """(producing unit, consuming unit, carry key) of every long skip (HunyuanDiT); each has the
        hidden state's shape."""
        return []

    def carry_batch(self, cond: Cond, batch: int) -> int:
        """Leading size of the carried image tokens for a model batch of `batch`."""
        return batch

    def text_tokens(self, cond: Cond) -> int:
        """Text tokens of the whole joint sequence (0 where text does not join the attention)."""
        return int(cond.get("text_tokens", 0))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], layout: PatchLayout) -> torch.Tensor:
        """Every piece in sequence on the whole image: equals `transformer(...)`."""
        cond = self.condition(latents, timestep, kwargs)
        carry = self.embed(latents, cond)
        for unit in range(self.unit_count()):
            carry = self.run_unit(unit, carry, cond, None)
        return self.head(carry, cond, layout, None)

    def _rows_of(self, layout: PatchLayout, patch: int | None) -> int:
        return layout.token_rows if patch is None else layout.patch_rows(patch)


class PixArtStages(StagedTransformer):
    family = "pixart"
    first_stage_attrs = ("pos_embed",)
    last_stage_attrs = ("norm_out", "proj_out", "scale_shift_table")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "none") for u in units]

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        batch = latents.shape[0]
        temb, embedded = t.adaln_single(timestep, kwargs.get("added_cond_kwargs"), batch_size=batch, hidden_dtype=latents.dtype)
        text = kwargs["encoder_hidden_states"]
        if t.caption_projection is not None:
            text = t.caption_projection(text).view(batch, -1, t.inner_dim)
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None and mask.ndim == 2:  # keep/discard mask -> additive bias, as the model's forward does
            mask = ((1 - mask.to(latents.dtype)) * -10000.0).unsqueeze(1)
        return {"temb": temb, "embedded": embedded, "text": text, "text_mask": mask}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        return {"hidden": self.transformer.pos_embed(latents)}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        hidden = block(
            carry["hidden"], attention_mask=None, encoder_hidden_states=cond["text"],
            encoder_attention_mask=cond["text_mask"], timestep=cond["temb"], cross_attention_kwargs=None, class_labels=None,
        )
        return {"hidden": hidden}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        shift, scale = (t.scale_shift_table[None] + cond["embedded"][:, None]).chunk(2, dim=1)
        hidden = t.norm_out(carry["hidden"]) * (1 + scale) + shift
        hidden = _gathered(t.proj_out(hidden), gather)
        return _unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)


class SD3Stages(StagedTransformer):
    family = "sd3"
    carries_text = True
    first_stage_attrs = ("pos_embed", "context_embedder")
    last_stage_attrs = ("norm_out", "proj_out")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        layers: list[tuple[nn.Module, TextPosition]] = []
        for u in units:
            block = self.transformer.transformer_blocks[u]
            layers.append((block.attn, "last"))  # joint attention: image tokens first, then text
            if getattr(block, "use_dual_attention", False):
                layers.append((block.attn2, "none"))
        return layers

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        text = kwargs["encoder_hidden_states"]
        temb = self.transformer.time_text_embed(timestep, kwargs["pooled_projections"])
        return {"temb": temb, "raw_text": text, "text_tokens": text.shape[1]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        return {"hidden": t.pos_embed(latents).contiguous(), "text": t.context_embedder(cond["raw_text"])}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        text, hidden = block(hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], temb=cond["temb"], joint_attention_kwargs=None)
        return {"hidden": hidden} if text is None else {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = _gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"])), gather)
        return _unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)


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
        rotary = _rotary_rows(cond["rotary"], index, cond["text_tokens"], text_index)
        text, hidden = blocks[i](
            hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], temb=cond["temb"],
            image_rotary_emb=rotary, joint_attention_kwargs=None,
        )
        return {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        return _gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"])), gather)


class HunyuanStages(StagedTransformer):
    """HunyuanDiT: block j > L//2 adds the output of block L-1-j (a long skip).

    Each skip is a carry entry of its own ("skip.<producing block>"), so the pipeline can send it
    straight from the stage that produces it to the mirror stage that consumes it (`skip_pairs`).
    """

    family = "hunyuan"
    first_stage_attrs = ("pos_embed",)
    last_stage_attrs = ("norm_out", "proj_out")

    def unit_count(self) -> int:
        return len(self.transformer.blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.blocks[u].attn1, "none") for u in units]

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        t5 = kwargs["encoder_hidden_states_t5"]
        temb = t.time_extra_emb(timestep, t5, kwargs.get("image_meta_size"), kwargs.get("style"), hidden_dtype=timestep.dtype)
        batch, length, _ = t5.shape
        t5 = t.text_embedder(t5.view(-1, t5.shape[-1])).view(batch, length, -1)
        text = torch.cat([kwargs["encoder_hidden_states"], t5], dim=1)
        mask = torch.cat([kwargs["text_embedding_mask"], kwargs["text_embedding_mask_t5"]], dim=-1).unsqueeze(2).bool()
        text = torch.where(mask, text, t.text_embedding_padding)
        return {"temb": temb, "text": text, "rotary": kwargs.get("image_rotary_emb")}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        return {"hidden": self.transformer.pos_embed(latents)}

    def skip_pairs(self) -> list[tuple[int, int, str]]:
        layers = self.config.num_layers
        return [(i, layers - 1 - i, f"skip.{i}") for i in range(layers // 2 - 1)]

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        layers = self.config.num_layers
        block = self.transformer.blocks[unit]
        out = dict(carry)
        kwargs = dict(temb=cond["temb"], encoder_hidden_states=cond["text"], image_rotary_emb=_rotary_rows(cond["rotary"], index))
        if unit > layers // 2:
            hidden = block(carry["hidden"], skip=out.pop(f"skip.{layers - 1 - unit}"), **kwargs)
        else:
            hidden = block(carry["hidden"], **kwargs)
        if unit < layers // 2 - 1:
            out[f"skip.{unit}"] = hidden
        out["hidden"] = hidden
        return out

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = _gathered(t.proj_out(t.norm_out(carry["hidden"], cond["temb"].to(torch.float32))), gather)
        return _unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)


class CogVideoXStages(StagedTransformer):
    """CogVideoX: one sequence [text, frame-major video tokens]; a row strip spans every frame."""

    family = "cogvideox"
    carries_text = True
    first_stage_attrs = ("patch_embed", "embedding_dropout")
    last_stage_attrs = ("norm_final", "norm_out", "proj_out")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "first") for u in units]

    def _token_frames(self, frames: int) -> int:
        pt = self.config.patch_size_t
        return frames if pt is None else (frames + pt - 1) // pt

    def layout(self, latents: torch.Tensor, kwargs: dict[str, Any], patches: int) -> PatchLayout:
        p = self.config.patch_size
        return PatchLayout(latents.shape[-2] // p, latents.shape[-1] // p, p, self._token_frames(latents.shape[1]), patches)

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        emb = t.time_embedding(t.time_proj(timestep).to(latents.dtype), kwargs.get("timestep_cond"))
        if t.ofs_embedding is not None:
            emb = emb + t.ofs_embedding(t.ofs_proj(kwargs["ofs"]).to(latents.dtype))
        text = kwargs["encoder_hidden_states"]
        return {"temb": emb, "raw_text": text, "text_tokens": text.shape[1], "rotary": kwargs.get("image_rotary_emb"),
                "frames": latents.shape[1], "batch": latents.shape[0]}

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        t = self.transformer
        tokens = t.embedding_dropout(t.patch_embed(cond["raw_text"], latents))
        n = cond["text_tokens"]
        return {"hidden": tokens[:, n:], "text": tokens[:, :n]}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        block = self.transformer.transformer_blocks[unit]
        hidden, text = block(
            hidden_states=carry["hidden"], encoder_hidden_states=carry["text"], temb=cond["temb"],
            image_rotary_emb=_rotary_rows(cond["rotary"], index), attention_kwargs=None,
        )
        return {"hidden": hidden, "text": text}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        hidden = _gathered(t.proj_out(t.norm_out(t.norm_final(carry["hidden"]), temb=cond["temb"])), gather)
        p, pt = self.config.patch_size, self.config.patch_size_t
        rows, cols, batch = self._rows_of(layout, patch), layout.row_tokens, cond["batch"]
        if pt is None:
            x = hidden.reshape(batch, cond["frames"], rows, cols, -1, p, p)
            return x.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        x = hidden.reshape(batch, layout.token_frames, rows, cols, -1, pt, p, p)
        return x.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


class LatteStages(StagedTransformer):
    """Latte: unit i is spatial block i (per frame, over image tokens) then temporal block i
    (per token position, over frames). Temporal attention never mixes positions, so only the
    spatial self-attention needs stale KV."""

    family = "latte"
    first_stage_attrs = ("pos_embed",)
    last_stage_attrs = ("norm_out", "proj_out", "scale_shift_table")

    def unit_count(self) -> int:
        return len(self.transformer.transformer_blocks)

    def unit_modules(self, unit: int) -> list[tuple[nn.ModuleList, int]]:
        return [(self.transformer.transformer_blocks, unit), (self.transformer.temporal_transformer_blocks, unit)]

    def stale_layers(self, units: range) -> list[tuple[nn.Module, TextPosition]]:
        return [(self.transformer.transformer_blocks[u].attn1, "none") for u in units]

    def carry_batch(self, cond: Cond, batch: int) -> int:
        return batch * cond["frames"]  # spatial blocks see every frame as a batch entry

    def condition(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> Cond:
        t = self.transformer
        batch, frames = latents.shape[0], latents.shape[2]
        temb, embedded = t.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=batch, hidden_dtype=latents.dtype)
        text = t.caption_projection(kwargs["encoder_hidden_states"])
        text = text.repeat_interleave(frames, dim=0).view(-1, text.shape[-2], text.shape[-1])
        return {
            "temb": temb, "temb_spatial": temb.repeat_interleave(frames, dim=0).view(-1, temb.shape[-1]),
            "embedded": embedded.repeat_interleave(frames, dim=0).view(-1, embedded.shape[-1]),
            "text": text, "text_mask": kwargs.get("encoder_attention_mask"), "batch": batch, "frames": frames,
            "temporal": kwargs.get("enable_temporal_attentions", True),
        }

    def embed(self, latents: torch.Tensor, cond: Cond) -> Carry:
        b, c, f, h, w = latents.shape
        return {"hidden": self.transformer.pos_embed(latents.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w))}

    def run_unit(self, unit: int, carry: Carry, cond: Cond, index: TokenIndex, text_index: slice | None = None) -> Carry:
        t = self.transformer
        hidden = t.transformer_blocks[unit](carry["hidden"], None, cond["text"], cond["text_mask"], cond["temb_spatial"], None, None)
        if cond["temporal"]:
            batch, frames = cond["batch"], cond["frames"]
            tokens, width = hidden.shape[-2], hidden.shape[-1]
            hidden = hidden.reshape(batch, frames, tokens, width).permute(0, 2, 1, 3).reshape(-1, frames, width)
            if unit == 0 and frames > 1:
                hidden = hidden + t.temp_pos_embed.to(hidden.dtype)
            temb_temporal = cond["temb"].repeat_interleave(tokens, dim=0).view(-1, cond["temb"].shape[-1])
            hidden = t.temporal_transformer_blocks[unit](hidden, None, None, None, temb_temporal, None, None)
            hidden = hidden.reshape(batch, tokens, frames, width).permute(0, 2, 1, 3).reshape(-1, tokens, width)
        return {"hidden": hidden}

    def head(self, carry: Carry, cond: Cond, layout: PatchLayout, patch: int | None, gather: Gather = None) -> torch.Tensor:
        t = self.transformer
        shift, scale = (t.scale_shift_table[None] + cond["embedded"][:, None]).chunk(2, dim=1)
        hidden = _gathered(t.proj_out(t.norm_out(carry["hidden"]) * (1 + scale) + shift), gather)
        out = _unpatchify(hidden, self._rows_of(layout, patch), layout.row_tokens, self.config.patch_size, t.out_channels)
        return out.reshape(cond["batch"], cond["frames"], *out.shape[1:]).permute(0, 2, 1, 3, 4)


STAGES: dict[str, type[StagedTransformer]] = {
    cls.family: cls for cls in (PixArtStages, SD3Stages, FluxStages, HunyuanStages, CogVideoXStages, LatteStages)
}


def staged(transformer: nn.Module, family: str) -> StagedTransformer:
    if family == "wan":
        from executor.families.wan import WanStages

        return WanStages(transformer)
    try:
        return STAGES[family](transformer)
    except KeyError:
        raise ValueError(f"no PipeFusion stage decomposition for family {family!r}; known: {', '.join(STAGES)}") from None
