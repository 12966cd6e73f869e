"""torch.distributed process groups for a configuration and its placement: one group per axis.

`new_group` is collective over the whole world and must be called by every rank in the same order,
so every rank creates every group of every axis (in `costmodel.config.AXES` order, each axis's
groups in `Placement.groups(axis)` order) and keeps the ones that hold it. Axes of degree 1 get no
group (None). gloo on CPU, NCCL on CUDA: there every rank binds its GPU (LOCAL_RANK) before joining,
and joins with `device_id`, so NCCL creates each group's communicator when the group is created
(in the same order on every rank) rather than lazily at its first use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from costmodel.config import AXES, ParallelConfig, Placement
from costmodel.errors import DitplanError
from executor.device import check_visible_gpus, local_device

# A collective that waits longer than this is treated as a hang and the job stops with the
# collective named; a real model's slowest phase between two collectives (text encoding or VAE
# decode on one rank) stays well under it.
DEFAULT_TIMEOUT_S = float(os.environ.get("DITPLAN_COLLECTIVE_TIMEOUT_S", "180"))


def launched_world_size() -> int:
    """World size of this job: the initialised process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Bind this rank's GPU (any CUDA run) and join torchrun's process group (env:// rendezvous)
    unless already joined or alone."""
    if torch.cuda.is_available():
        check_visible_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.cuda.set_device(local_device())
    if launched_world_size() == 1 or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise DitplanError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but no MASTER_ADDR: launch the processes with torchrun "
            "(or `ditplan run --nproc N`), which sets the rendezvous variables."
        )
    backend = backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise DitplanError("--backend nccl needs CUDA GPUs, and none is visible here; use --backend gloo.")
    # device_id binds the GPU: NCCL then creates every group's communicator eagerly, at new_group.
    device_id = local_device() if backend == "nccl" else None
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)


@dataclass
class ExecutorGroups:
    """This rank's view of the layout: its coordinate, group and group members on every axis.

    group(axis) is the torch.distributed group holding this rank on `axis` (None for degree 1);
    members(axis) lists its global ranks ordered by their coordinate on that axis.
    """

    config: ParallelConfig
    placement: Placement
    rank: int
    world_size: int
    coords: dict[str, int]
    _groups: dict[str, Any] = field(default_factory=dict)
    _members: dict[str, list[int]] = field(default_factory=dict)

    def group(self, axis: str) -> Any:
        self.config.degree(axis)
        return self._groups.get(axis)

    def members(self, axis: str) -> list[int]:
        return list(self._members[axis])

    def coordinate(self, axis: str) -> int:
        return self.coords[axis]

    @property
    def replica_leader(self) -> bool:
        """True on the one rank per data-parallel replica that decodes and reports (all other coords 0)."""
        return all(self.coords[axis] == 0 for axis in AXES if axis != "dp")

    def replica_leaders(self) -> list[int]:
        """Global rank of each replica's leader, in dp order."""
        return [self.placement.rank_of({**{a: 0 for a in AXES}, "dp": d}) for d in range(self.config.dp)]

    def layout(self) -> str:
        """A printable table: rank -> coordinates, and the groups of every axis of degree > 1."""
        lines = [f"layout: {self.config} on {self.world_size} rank(s), placement (innermost first) {','.join(self.placement.order)}"]
        header = "rank  " + "  ".join(f"{axis:>10}" for axis in AXES)
        lines.append(header)
        for row in self.placement.table():
            lines.append(f"{row['rank']:>4}  " + "  ".join(f"{row[axis]:>10}" for axis in AXES))
        for axis in AXES:
            if self.config.degree(axis) > 1:
                lines.append(f"{axis} groups: " + " ".join(str(g) for g in self.placement.groups(axis)))
        return "\n".join(lines)


def build_groups(config: ParallelConfig, placement: Placement | None = None) -> ExecutorGroups:
    """Create every axis's process groups (collective: every rank must call it) and keep this rank's."""
    placement = placement or Placement(config)
    world = launched_world_size()
    if config.world_size != world:
        raise DitplanError(
            f"configuration {config} needs {config.world_size} processes but this job has {world}; "
            f"launch it with --nproc {config.world_size}."
        )
    rank = launched_rank()
    result = ExecutorGroups(config=config, placement=placement, rank=rank, world_size=world,
                            coords=placement.coordinates(rank))
    for axis in AXES:
        result._members[axis] = placement.group_of(rank, axis)
        if config.degree(axis) == 1:
            result._groups[axis] = None
            continue
        for members in placement.groups(axis):
            group = dist.new_group(members)
            if rank in members:
                result._groups[axis] = group
    return result
