"""The search space: GPU counts, degree factorisations, PipeFusion patch counts, warmup and placements.

Everything here is pure arithmetic on the configuration and the cluster's topology; no cost is
computed. The space for N GPUs is every `dp*cfg*ulysses*ring*pipefusion = N` (cfg 1 or 2), with
PipeFusion patch counts M from p to 4p where the latent's token rows split evenly into M strips,
warmup 0-2 where patches are in play, and every rank placement that can cost differently.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from costmodel.config import DEFAULT_PLACEMENT, ParallelConfig, Placement
from costmodel.errors import DitplanError

# Axes whose degree the search factorises N into; cfg is limited to 1 or 2 by ParallelConfig.
FACTOR_AXES: tuple[str, ...] = ("ulysses", "ring", "pipefusion", "dp")
MAX_PATCH_FACTOR = 4  # patches from p up to 4p (the papers suggest M close to p; more only shrinks kernels)
WARMUPS: tuple[int, ...] = (0, 1, 2)  # synchronous warmup steps tried where the patch pipeline runs
# The search's floor on them unless the caller lowers it: with none, the first pipelined step attends
# to K/V that no step has computed yet, which costs image quality.
DEFAULT_MIN_WARMUP = 1
MAX_GPUS_PER_SEARCH = 1 << 16  # a sanity bound on `--gpus`, far above any cluster we ship


def parse_gpu_counts(text: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """`8`, `1-16`, `1,2,4,8` or `2-8,16` -> sorted distinct counts (each >= 1)."""
    if isinstance(text, bool):
        raise DitplanError(f"--gpus {text!r}: give a GPU count such as 8, a range such as 1-16, or a list such as 1,2,4,8.")
    if isinstance(text, int):
        counts = [text]
    elif isinstance(text, (list, tuple)):
        counts = [int(value) for value in text]
    else:
        counts = []
        for part in str(text).split(","):
            part = part.strip()
            low, dash, high = part.partition("-")
            try:
                if dash:
                    first, last = int(low), int(high)
                    if first > last:
                        raise DitplanError(f"--gpus {text!r}: the range {part!r} runs backwards; write it low-high, e.g. 1-16.")
                    counts.extend(range(first, last + 1))
                else:
                    counts.append(int(part))
            except ValueError:
                raise DitplanError(
                    f"--gpus {text!r}: {part!r} is not a count; give a GPU count such as 8, a range such as 1-16, "
                    "or a list such as 1,2,4,8."
                ) from None
    for count in counts:
        if count < 1 or count > MAX_GPUS_PER_SEARCH:
            raise DitplanError(f"--gpus {text!r}: {count} GPUs is not allowed; counts run from 1 to {MAX_GPUS_PER_SEARCH}.")
    if not counts:
        raise DitplanError("--gpus: no GPU count given.")
    return sorted(set(counts))


def _ordered_factorisations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every tuple of `parts` positive integers whose product is n (order matters)."""
    if parts == 1:
        yield (n,)
        return
    for first in range(1, n + 1):
        if n % first == 0:
            for rest in _ordered_factorisations(n // first, parts - 1):
                yield (first, *rest)


def degree_tuples(gpus: int) -> Iterator[dict[str, int]]:
    """Every assignment of degrees to the five axes whose product is `gpus` (cfg 1 or 2)."""
    for cfg in (1, 2):
        if gpus % cfg:
            continue
        for degrees in _ordered_factorisations(gpus // cfg, len(FACTOR_AXES)):
            yield {"cfg": cfg, **dict(zip(FACTOR_AXES, degrees))}


def patch_counts(pipefusion: int, token_rows: int, sp: int = 1) -> list[int]:
    """PipeFusion patch counts tried for p stages: M in [p, 4p] where the token rows split evenly
    into M strips, each further split across the sp ranks of the sequence-parallel group.

    With one stage there is no pipeline to fill, so patches would only shrink every kernel and
    put stale K/V into play for nothing: M = 1. If no M in the range splits the rows evenly, M = p
    is still returned so that the configuration is pruned with the validation's reason rather than
    vanishing.
    """
    if pipefusion == 1:
        return [1]
    fitting = [m for m in range(pipefusion, MAX_PATCH_FACTOR * pipefusion + 1) if token_rows % (m * sp) == 0]
    return fitting or [pipefusion]


def warmup_options(patches: int, steps: int, min_warmup: int = 0) -> list[int]:
    """Warmup steps tried where patches run: 0-2 (at most the step count), plus a fidelity floor
    `min_warmup` above that; without patches only the default, which has no effect there."""
    if patches <= 1:
        return [ParallelConfig().warmup]
    options = {w for w in WARMUPS if w <= steps}
    if min_warmup:
        options.add(min_warmup)  # above the step count, validation prunes it and says why
    return sorted(options)


def enumerate_configs(gpus: int, token_rows: int, steps: int, min_warmup: int = 0) -> Iterator[ParallelConfig]:
    """Every configuration of the space for `gpus` GPUs (before any validation)."""
    for degrees in degree_tuples(gpus):
        for patches in patch_counts(degrees["pipefusion"], token_rows, degrees["ulysses"] * degrees["ring"]):
            for warmup in warmup_options(patches, steps, min_warmup):
                yield ParallelConfig(patches=patches, warmup=warmup, **degrees)


def nontrivial_axes(config: ParallelConfig) -> tuple[str, ...]:
    """The axes of degree > 1, in the default (xDiT) order."""
    return tuple(axis for axis in DEFAULT_PLACEMENT if config.degree(axis) > 1)


def full_order(config: ParallelConfig, inner_order: tuple[str, ...]) -> tuple[str, ...]:
    """A full five-axis order from an order of the non-trivial axes.

    Axes of degree 1 change no rank's position, so where the non-trivial axes keep their default
    relative order the default order itself is returned (that is how plans show xDiT's order).
    """
    if inner_order == nontrivial_axes(config):
        return DEFAULT_PLACEMENT
    return (*inner_order, *(axis for axis in DEFAULT_PLACEMENT if axis not in inner_order))


def _log2(value: int) -> int | None:
    """log2 of a power of two, else None."""
    return value.bit_length() - 1 if value > 0 and value & (value - 1) == 0 else None


@dataclass(frozen=True)
class Hierarchy:
    """Nested domains of GPUs that the cost model treats alike, as block sizes innermost first.

    E.g. (2, 4, 8) for two GPUs per PCIe switch, two switches per socket, two sockets per node;
    nodes are the level above the last block. Inside a block, its sub-blocks are interchangeable
    (same links to the same parent), which is what lets two rank orders cost the same.
    """

    blocks: tuple[int, ...]

    def signature(self, config: ParallelConfig, inner_order: tuple[str, ...]) -> tuple | None:
        """How many factors of two of each axis fall in each level, or None where sizes are not powers of two.

        With powers of two every axis occupies a contiguous range of rank bits and every level a
        range too; two orders that give each axis the same bits in each level differ only by
        permuting interchangeable blocks, so they cost the same.
        """
        world_bits = _log2(config.world_size)
        if world_bits is None or any(_log2(config.degree(axis)) is None for axis in inner_order):
            return None
        cuts = {world_bits}
        for block in self.blocks:
            bits = _log2(block)
            if bits is None:
                return None
            cuts.add(min(bits, world_bits))
        levels = sorted(cuts)
        signature = []
        low = 0
        for axis in inner_order:
            width = _log2(config.degree(axis))
            high = low + width
            per_level, floor = [], 0
            for ceiling in levels:
                per_level.append(max(0, min(high, ceiling) - max(low, floor)))
                floor = ceiling
            signature.append((axis, tuple(per_level)))
            low = high
        return tuple(sorted(signature))


def distinct_placements(config: ParallelConfig, hierarchy: Hierarchy | None = None) -> list[Placement]:
    """One placement per class of orders that put every axis's groups in the same place.

    Two orders are equivalent when every non-trivial axis gets the same groups (same stride), or,
    given the cluster's `hierarchy`, when one maps onto the other by permuting interchangeable
    blocks (e.g. every order is alike inside one NVLink domain). The default order comes first and
    represents its class; the others keep the first order met in a lexicographic walk.
    """
    degrees = tuple(config.degree(axis) for axis in DEFAULT_PLACEMENT)
    return [Placement(config, order) for order in _distinct_orders(degrees, hierarchy)]


@lru_cache(maxsize=4096)
def _distinct_orders(degrees: tuple[int, ...], hierarchy: Hierarchy | None) -> tuple[tuple[str, ...], ...]:
    """The orders of `distinct_placements`, which depend on the degrees only (not patches or warmup)."""
    config = ParallelConfig(**dict(zip(DEFAULT_PLACEMENT, degrees)))
    axes = nontrivial_axes(config)
    seen: set[tuple] = set()
    orders: list[tuple[str, ...]] = []
    for inner in [axes, *(perm for perm in itertools.permutations(axes) if perm != axes)]:
        signature = hierarchy.signature(config, inner) if hierarchy is not None else None
        if signature is None:
            strides = Placement(config, full_order(config, inner)).strides
            signature = tuple((axis, strides[axis]) for axis in axes)
        if signature in seen:
            continue
        seen.add(signature)
        orders.append(full_order(config, inner))
    return tuple(orders)


def pure_axis(config: ParallelConfig) -> str | None:
    """The one non-trivial axis of a pure configuration (None for hybrids and for one GPU)."""
    axes = nontrivial_axes(config)
    return axes[0] if len(axes) == 1 else None


def simplicity(config: ParallelConfig, placement: Placement) -> tuple[int, ...]:
    """Tie-break key after latency and memory: fewer methods, xDiT's order, fewer patches, more warmup.

    More warmup comes last because with equal latency it only brings the result closer to the
    serial one.
    """
    return (
        len(nontrivial_axes(config)),
        0 if placement.order == DEFAULT_PLACEMENT else 1,
        config.patches - config.pipefusion,
        -config.warmup,
    )


def short_config(config: ParallelConfig) -> str:
    """Compact text for tables and plots: the degrees above 1, patches where not p, warmup where patches run.

    `cfg=2,pipefusion=4` for cfg=2,ulysses=1,ring=1,pipefusion=4,patches=4,warmup=1,dp=1 (whose
    warmup is shown only if patches run: `cfg=2,pipefusion=4,warmup=1`). One GPU shows as `serial`.
    """
    parts = [f"{axis}={config.degree(axis)}" for axis in ("cfg", "ulysses", "ring", "pipefusion", "dp")
             if config.degree(axis) > 1]
    if config.patches != config.pipefusion:
        parts.append(f"patches={config.patches}")
    if config.uses_patches:
        parts.append(f"warmup={config.warmup}")
    if config.vae > 1:
        parts.append(f"vae={config.vae}")
    return ",".join(parts) or "serial"
