"""The parallel configuration (`ParallelConfig`) and its rank placement.

A configuration gives one degree per axis; the placement orders the axes innermost first, so the
innermost axis gets the nearest ranks. Both the cost model (to put groups on the topology) and the
executor (to build process groups) derive every group from here, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Sequence

from costmodel.errors import DitplanError

AXES: tuple[str, ...] = ("ulysses", "ring", "pipefusion", "cfg", "dp")
DEFAULT_PLACEMENT: tuple[str, ...] = AXES  # innermost first, as xDiT orders them
TEXT_KEYS: tuple[str, ...] = ("cfg", "ulysses", "ring", "pipefusion", "patches", "warmup", "dp")
# Keys of the text form written only where they differ from their default (so existing identifiers stay).
OPTIONAL_TEXT_KEYS: tuple[str, ...] = ("vae",)


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the hybrid: cfg x ulysses x ring x pipefusion x dp GPUs.

    `patches` is PipeFusion's patch count M (default: the pipefusion degree); `warmup` is the
    number of synchronous full-image steps before the patch pipeline starts (of each expert, for a
    model whose experts take turns: `warmup_steps`). `vae` is how many ranks
    of one replica decode the VAE together in row strips (not an axis: it adds no GPUs).
    """

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    pipefusion: int = 1
    dp: int = 1
    patches: int | None = None
    warmup: int = 1
    vae: int = 1

    def __post_init__(self) -> None:
        for key in ("cfg", "ulysses", "ring", "pipefusion", "dp"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DitplanError(f"configuration: {key}={value!r} is not allowed; every degree must be an integer >= 1.")
        if self.cfg not in (1, 2):
            raise DitplanError(f"configuration: cfg={self.cfg} is not allowed; CFG parallelism splits the unconditional and conditional halves, so cfg must be 1 or 2.")
        if self.patches is None:
            object.__setattr__(self, "patches", self.pipefusion)
        if not isinstance(self.patches, int) or isinstance(self.patches, bool) or self.patches < 1:
            raise DitplanError(f"configuration: patches={self.patches!r} is not allowed; the PipeFusion patch count must be an integer >= 1.")
        if self.patches < self.pipefusion:
            raise DitplanError(
                f"configuration: patches={self.patches} is fewer than pipefusion={self.pipefusion}; "
                "every pipeline stage needs a patch in flight, so patches must be >= pipefusion."
            )
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise DitplanError(f"configuration: warmup={self.warmup!r} is not allowed; warmup steps must be an integer >= 0.")
        replica = self.world_size // self.dp
        if not isinstance(self.vae, int) or isinstance(self.vae, bool) or self.vae < 1 or replica % self.vae:
            raise DitplanError(
                f"configuration: vae={self.vae!r} is not allowed; the VAE decode ranks come from one replica's "
                f"{replica} rank(s), so vae must be an integer >= 1 that divides {replica}."
            )

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (Ulysses x Ring)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return prod(self.degree(axis) for axis in AXES)

    @property
    def uses_patches(self) -> bool:
        """True where the patch pipeline (and so stale KV) is in play."""
        return self.patches > 1

    @property
    def pipelines(self) -> bool:
        """True where PipeFusion runs: several stages, or one stage over several patches."""
        return self.pipefusion > 1 or self.uses_patches

    def degree(self, axis: str) -> int:
        if axis not in AXES:
            raise DitplanError(f"unknown axis {axis!r}; the axes are {', '.join(AXES)}.")
        return getattr(self, axis)

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """Parse `cfg=2,ulysses=2,ring=1,pipefusion=2,patches=4,warmup=1,dp=1`; omitted keys default."""
        values: dict[str, int] = {}
        stripped = text.strip()
        if not stripped:
            raise DitplanError("configuration: empty text; write it as key=value pairs, e.g. 'ulysses=2,cfg=2'.")
        for item in stripped.split(","):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise DitplanError(f"configuration {text!r}: {item.strip()!r} is not key=value; write e.g. 'ulysses=2,cfg=2'.")
            if key not in TEXT_KEYS + OPTIONAL_TEXT_KEYS:
                raise DitplanError(f"configuration {text!r}: unknown key {key!r}; the keys are {', '.join(TEXT_KEYS + OPTIONAL_TEXT_KEYS)}.")
            if key in values:
                raise DitplanError(f"configuration {text!r}: {key!r} is given twice.")
            try:
                values[key] = int(raw.strip())
            except ValueError:
                raise DitplanError(f"configuration {text!r}: {key}={raw.strip()!r} is not an integer.") from None
        return cls(**values)

    def __str__(self) -> str:
        optional = [key for key in OPTIONAL_TEXT_KEYS if getattr(self, key) != 1]
        return ",".join(f"{key}={getattr(self, key)}" for key in TEXT_KEYS + tuple(optional))


@dataclass(frozen=True)
class Placement:
    """Maps ranks to per-axis coordinates: `order` lists the axes innermost (nearest ranks) first.

    rank = c[order[0]] + d[order[0]] * (c[order[1]] + d[order[1]] * (...)).
    """

    config: ParallelConfig
    order: tuple[str, ...] = DEFAULT_PLACEMENT

    def __post_init__(self) -> None:
        order = tuple(self.order)
        if not all(isinstance(axis, str) for axis in order) or sorted(order) != sorted(AXES):
            raise DitplanError(
                f"placement {list(order)!r} is not an ordering of the axes; it must list each of {', '.join(AXES)} exactly once."
            )
        object.__setattr__(self, "order", order)

    def coordinates(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.config.world_size:
            raise DitplanError(f"rank {rank} is outside a world of {self.config.world_size} ranks.")
        coords: dict[str, int] = {}
        for axis in self.order:
            size = self.config.degree(axis)
            coords[axis] = rank % size
            rank //= size
        return coords

    def rank_of(self, coords: dict[str, int]) -> int:
        rank, stride = 0, 1
        for axis in self.order:
            rank += coords[axis] * stride
            stride *= self.config.degree(axis)
        return rank

    @property
    def strides(self) -> dict[str, int]:
        """Rank stride of each axis: the product of the degrees of the axes inside it."""
        return dict(_strides(self._degrees(), self.order))

    def groups_of(self, axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Groups of ranks that share every coordinate except those on `axes` (e.g. ("ulysses", "ring")
        for the sequence-parallel group), in increasing order of their lowest rank."""
        for axis in axes:
            self.config.degree(axis)
        return _groups(self._degrees(), self.order, tuple(axes))

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along `axis`: ranks that share all other coordinates, ordered by their coordinate on `axis`."""
        return [list(group) for group in self.groups_of((axis,))]

    def _degrees(self) -> tuple[int, ...]:
        return tuple(self.config.degree(axis) for axis in AXES)

    def group_of(self, rank: int, axis: str) -> list[int]:
        """The group along `axis` that holds `rank`."""
        for members in self.groups(axis):
            if rank in members:
                return members
        raise AssertionError("unreachable: every rank is in one group per axis")

    def table(self) -> list[dict[str, int]]:
        """The rank -> coordinates map, one dict per rank (plan files record it)."""
        return [{"rank": rank, **self.coordinates(rank)} for rank in range(self.config.world_size)]

    @classmethod
    def parse(cls, config: ParallelConfig, text: str | list[str] | tuple[str, ...]) -> "Placement":
        order = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
        return cls(config, tuple(order))


def warmup_steps(step_experts: Sequence[int], warmup: int) -> list[bool]:
    """Which steps PipeFusion runs as synchronous full-image warmup steps, given the expert of each
    step (Wan 2.2 A14B: a high-noise then a low-noise transformer; one expert: all 0).

    The first `warmup` steps of each expert's run: an expert's stale K/V come from its own layers
    only, so the first steps of the expert taking over find its buffers empty, as the first expert's
    did at step 0, and fill them the same way (with warmup=0 its first patch step starts from empty
    buffers). The executor runs these steps and the cost model prices them."""
    flags, run = [], 0
    for index, expert in enumerate(step_experts):
        run = run + 1 if index and expert == step_experts[index - 1] else 1
        flags.append(run <= warmup)
    return flags


def _strides(degrees: tuple[int, ...], order: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    by_axis = dict(zip(AXES, degrees))
    out, stride = [], 1
    for axis in order:
        out.append((axis, stride))
        stride *= by_axis[axis]
    return tuple(out)


@lru_cache(maxsize=4096)
def _groups(degrees: tuple[int, ...], order: tuple[str, ...], axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    # Arithmetic on rank strides (rank = sum of coordinate x stride) rather than a coordinate lookup
    # per rank: the planner builds these for thousands of placements of up to 1024 ranks. Members
    # vary the first of `axes` fastest.
    by_axis = dict(zip(AXES, degrees))
    strides = dict(_strides(degrees, order))
    offsets = [0]
    for axis in reversed(axes):
        offsets = [offset + c * strides[axis] for offset in offsets for c in range(by_axis[axis])]
    bases = [0]
    for axis in reversed(order):  # the other axes, innermost varying fastest: bases ascend
        if axis not in axes:
            bases = [base + c * strides[axis] for base in bases for c in range(by_axis[axis])]
    return tuple(tuple(base + offset for offset in offsets) for base in bases)
