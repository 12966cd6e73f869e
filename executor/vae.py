"""Patch-parallel VAE decode: the `vae` ranks of one replica decode the latent in row strips.

Rank i of the decode group takes latent rows [start_i, start_i + rows_i) and runs the unmodified
diffusers decoder on them, with hooks on its modules that make the strip's result equal to the
corresponding rows of a one-process decode:

* every convolution with a kernel taller than one row gets the halo rows it reads from the
  neighbouring strips before it runs (one `batch_isend_irecv` with both neighbours: point-to-point
  posted in the same order on every rank, so it is safe under NCCL) and its extra output rows cropped
  after it;
* every GroupNorm normalises with statistics of the whole image: per group, the strips' counts, sums
  and sums of squares are all-reduced (float64) before the strip is normalised;
* every attention layer (the AutoencoderKL mid-block) attends from its strip's queries to the keys and
  values of all strips: the key/value projections are all-gathered in strip order;
* the decoder's output strips are gathered on the group's first rank (the replica leader), which
  returns the full image; the other ranks return their strip.

Nearest-neighbour upsampling, activations and 1x1 convolutions are row-local and need nothing.
Works on the AutoencoderKL decoder (PixArt, SD3, Flux, HunyuanDiT, Latte) and on CogVideoX's
causal 3D decoder, whose frame-batched calls each get the same treatment.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from costmodel.config import ParallelConfig, Placement
from costmodel.pipeline_stages import WHOLE_DECODE
from costmodel.errors import DitplanError
from costmodel.pipeline_stages import decode_groups


def strip_rows(total: int, parts: int) -> list[int]:
    """Rows of each strip: near-equal, the first ones one row bigger where `parts` does not divide."""
    if parts < 1 or total < parts:
        raise DitplanError(f"vae={parts}: the latent has {total} rows, so at most {total} ranks can decode it in strips.")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class DecodeGroup:
    """This rank's decode group: its members (global ranks, strip order) and its process group."""

    ranks: list[int]
    rank: int
    group: Any

    @property
    def index(self) -> int:
        return self.ranks.index(self.rank)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> int:
        return self.ranks[0]


def build_decode_group(config: ParallelConfig, placement: Placement, rank: int) -> DecodeGroup | None:
    """Create every replica's decode group (collective: every rank of the job calls it in the same
    order) and return the one that holds `rank` (None when vae=1 or the rank decodes nothing)."""
    if config.vae == 1:
        return None
    mine = None
    for ranks in decode_groups(config, placement.order):
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine = DecodeGroup(ranks=list(ranks), rank=rank, group=group)
    return mine


@dataclass
class _Strips:
    """The split of the current decoder call: rows per strip at the latent's resolution."""

    group: DecodeGroup
    rows: list[int] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.group.index

    @property
    def last(self) -> bool:
        return self.index == self.group.size - 1

    def sizes_at(self, local: int) -> list[int]:
        """Every strip's extent along a dimension where this strip has `local` entries: the decoder
        only upsamples by integers, so each strip's extent is its latent rows times the same factor."""
        scale, remainder = divmod(local, self.rows[self.index])
        if remainder:
            raise AssertionError(f"strip extent {local} is not a multiple of its {self.rows[self.index]} latent rows")
        return [rows * scale for rows in self.rows]


def _exchange_halo(x: torch.Tensor, top: int, bottom: int, strips: _Strips) -> torch.Tensor:
    """`x` (rows at dim -2) with `top` rows of the strip above and `bottom` rows of the strip below
    (where there is one); each neighbour gets the rows it needs of this strip in return."""
    rows = x.shape[-2]
    if rows < max(top, bottom):
        raise DitplanError(
            f"vae={strips.group.size}: a strip of {rows} rows is thinner than the {max(top, bottom)}-row halo of a "
            "convolution; use fewer decode ranks for this size."
        )
    ranks, index = strips.group.ranks, strips.index
    ops: list[dist.P2POp] = []
    from_above = from_below = None
    # Every rank posts (send up, send down, receive up, receive down), skipping missing neighbours:
    # the same order on both ends of each link.
    if index > 0 and bottom:
        ops.append(dist.P2POp(dist.isend, x[..., :bottom, :].contiguous(), ranks[index - 1], strips.group.group))
    if not strips.last and top:
        ops.append(dist.P2POp(dist.isend, x[..., rows - top:, :].contiguous(), ranks[index + 1], strips.group.group))
    if index > 0 and top:
        from_above = x.new_empty((*x.shape[:-2], top, x.shape[-1]))
        ops.append(dist.P2POp(dist.irecv, from_above, ranks[index - 1], strips.group.group))
    if not strips.last and bottom:
        from_below = x.new_empty((*x.shape[:-2], bottom, x.shape[-1]))
        ops.append(dist.P2POp(dist.irecv, from_below, ranks[index + 1], strips.group.group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    parts = [part for part in (from_above, x, from_below) if part is not None]
    return torch.cat(parts, dim=-2) if len(parts) > 1 else x


def _conv_halo(conv: torch.nn.Module) -> tuple[int, int]:
    """(rows read above, rows read below) an output row of a stride-1 convolution."""
    kernel, padding = conv.kernel_size[-2], conv.padding[-2]
    return padding, kernel - 1 - padding


def _conv_hooks(conv: torch.nn.Module, strips: _Strips) -> list[Any]:
    top, bottom = _conv_halo(conv)

    def add_halo(module: torch.nn.Module, args: tuple) -> tuple:
        return (_exchange_halo(args[0], top, bottom, strips), *args[1:])

    def crop(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # The output rows of the halo (and of the zero padding beyond it) belong to the neighbours.
        skip = top if strips.index > 0 else 0
        keep = output.shape[-2] - skip - (0 if strips.last else bottom)
        return output.narrow(-2, skip, keep)

    return [conv.register_forward_pre_hook(add_halo), conv.register_forward_hook(crop)]


def _group_norm_forward(strips: _Strips) -> Any:
    def forward(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, self.num_groups, -1).float()
        var, mean = torch.var_mean(grouped, dim=-1, correction=0)
        count = torch.full_like(mean, grouped.shape[-1])
        # count, sum and sum of squares per group; float64 keeps sum-of-squares minus mean² exact enough.
        stats = torch.stack([count, mean * count, (var + mean * mean) * count]).double()
        dist.all_reduce(stats, group=strips.group.group)
        total, sums, squares = stats
        mean_all = sums / total
        var_all = (squares / total - mean_all * mean_all).clamp_min(0.0)
        scale = torch.rsqrt(var_all + self.eps).float().unsqueeze(-1)
        normed = ((grouped - mean_all.float().unsqueeze(-1)) * scale).reshape(x.shape)
        if self.affine:
            shape = (1, channels) + (1,) * (x.dim() - 2)
            normed = normed * self.weight.float().reshape(shape) + self.bias.float().reshape(shape)
        return normed.to(x.dtype)

    return forward


def _all_gather_tokens(x: torch.Tensor, strips: _Strips) -> torch.Tensor:
    """Token projections (batch, tokens, channels) of every strip, concatenated in strip order."""
    sizes = strips.sizes_at(x.shape[1])
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=strips.group.group)
    return torch.cat([part[:, :size] for part, size in zip(gathered, sizes)], dim=1)


def _attention_hooks(attention: torch.nn.Module, strips: _Strips) -> list[Any]:
    def gather(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _all_gather_tokens(output, strips)

    return [attention.to_k.register_forward_hook(gather), attention.to_v.register_forward_hook(gather)]


def _gather_image(x: torch.Tensor, strips: _Strips) -> torch.Tensor:
    """The decoder's output strips joined on the leader (rows at dim -2); other ranks keep their strip."""
    group = strips.group
    sizes = strips.sizes_at(x.shape[-2])
    if group.index != 0:
        for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, x.contiguous(), group.leader, group.group)]):
            request.wait()
        return x
    parts = [x] + [x.new_empty((*x.shape[:-2], rows, x.shape[-1])) for rows in sizes[1:]]
    ops = [dist.P2POp(dist.irecv, part, peer, group.group) for part, peer in zip(parts[1:], group.ranks[1:])]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return torch.cat(parts, dim=-2)


def _check_supported(vae: torch.nn.Module) -> None:
    if getattr(vae, "use_tiling", False):
        raise DitplanError(TILING_PROBLEM + ".")
    for name, module in vae.decoder.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.kernel_size[-2] > 1:
            if module.stride[-2] != 1 or module.dilation[-2] != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise DitplanError(
                    f"vae>1: decoder convolution {name} (stride {module.stride}, dilation {module.dilation}, padding "
                    f"{module.padding!r} {module.padding_mode}) is not a zero-padded stride-1 convolution, so it cannot be split in row strips."
                )


TILING_PROBLEM = "vae>1 decodes in strips itself, so the VAE's tiling must be off (vae.disable_tiling())"


def decode_problems(config: ParallelConfig, adapter: Any, job: Any) -> list[str]:
    """Why `config.vae` ranks cannot decode this job's latent in strips (empty when they can)."""
    if config.vae == 1:
        return []
    pipe = adapter.pipe
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor  # CogVideoX names it apart
    rows = job.height // factor
    problems = []
    if adapter.family in WHOLE_DECODE:
        problems.append(f"vae={config.vae}: {WHOLE_DECODE[adapter.family]}; use vae=1")
    if rows < config.vae:
        problems.append(f"vae={config.vae} but the latent has {rows} rows ({job.height} px / {factor}); "
                        "each decode rank needs at least one")
    if getattr(pipe.vae, "use_tiling", False):
        problems.append(TILING_PROBLEM)
    return problems


@contextmanager
def strip_parallel(vae: torch.nn.Module, group: DecodeGroup) -> Iterator[None]:
    """While active, `vae.decode` on every rank of `group` decodes its strip of the full latent it is
    given, and the leader's call returns the whole image."""
    _check_supported(vae)
    decoder = vae.decoder
    strips = _Strips(group)

    def take_strip(module: torch.nn.Module, args: tuple) -> tuple:
        sample = args[0]
        strips.rows = strip_rows(sample.shape[-2], group.size)
        start = sum(strips.rows[: strips.index])
        return (sample.narrow(-2, start, strips.rows[strips.index]), *args[1:])

    def join_strips(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):  # CogVideoX: (frames, conv cache); the cache stays this strip's
            return (_gather_image(output[0], strips), *output[1:])
        return _gather_image(output, strips)

    handles = [decoder.register_forward_pre_hook(take_strip), decoder.register_forward_hook(join_strips)]
    norms = []
    try:
        for module in decoder.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.kernel_size[-2] > 1:
                handles += _conv_hooks(module, strips)
            elif isinstance(module, torch.nn.GroupNorm):
                module.forward = types.MethodType(_group_norm_forward(strips), module)
                norms.append(module)
            elif hasattr(module, "to_k") and hasattr(module, "to_v") and hasattr(module, "processor"):
                handles += _attention_hooks(module, strips)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in norms:
            del module.forward  # back to the class's forward


def decode(adapter: Any, job: Any, latents: torch.Tensor | None, output_type: str, group: DecodeGroup) -> Any:
    """`adapter.decode` of the job's final latents by every rank of `group`; the leader returns the
    images, the others None. Ranks without the latents (PipeFusion's non-leaders) get them from the leader."""
    if output_type == "latent":
        return adapter.decode(job, latents, output_type) if group.index == 0 else None
    if latents is None:
        latents = torch.empty_like(job.latents)
    latents = latents.contiguous()
    # The leader's latents are the replica's result; broadcasting them also makes every strip agree.
    dist.broadcast(latents, src=group.leader, group=group.group)
    with strip_parallel(adapter.pipe.vae, group):
        result = adapter.decode(job, latents, output_type)
    return result if group.index == 0 else None
