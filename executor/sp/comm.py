"""Communication primitives of sequence parallelism, on torch.distributed (gloo on CPU, NCCL on CUDA).

Every function takes the process group it works in (None or a group of one rank means "no
communication": the input comes back unchanged), so the same code serves Ulysses, Ring, USP and the
PipeFusion hybrids that reuse them. Tensors use the attention layout [batch, heads, tokens, head_dim]
unless a docstring says otherwise.

Collectives need every rank to pass tensors of the same size: gloo aborts the whole process on a
size mismatch and NCCL hangs, so callers check shapes once per forward with `agree_shapes` before the
first collective of a layer stack, and each function here derives its buffer sizes from that shape.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from costmodel.errors import DitplanError


def group_size(group: ProcessGroup | None) -> int:
    """Ranks in `group`; None stands for a degree-1 axis."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This rank's index inside `group` (0 for a degree-1 axis)."""
    return 0 if group is None else dist.get_rank(group)


def agree_shapes(shapes: dict[str, Sequence[int]], group: ProcessGroup | None, what: str) -> None:
    """Check that every rank of `group` holds tensors of the same shapes, before any collective uses them.

    `shapes` names each tensor (same names, same order on every rank). Two small all-gathers (lengths,
    then shapes); every rank sees all of them, so on a mismatch every rank raises the same DitplanError
    naming the tensors that differ, instead of gloo aborting or NCCL blocking in a later collective.
    """
    size = group_size(group)
    if size == 1:
        return
    encoded: list[int] = []
    for shape in shapes.values():
        encoded.extend([len(shape), *shape])
    device = _collective_device(group)
    mine = torch.tensor(encoded, dtype=torch.int64, device=device)
    length = torch.tensor([mine.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(n.item() for n in lengths))
    padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded[: mine.numel()] = mine
    everyone = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(everyone, padded, group=group)
    rows = [row[: int(n.item())].tolist() for row, n in zip(everyone, lengths)]  # .tolist() copies to the host
    if all(row == rows[0] for row in rows):
        return
    differing = []
    decoded = [_decode_shapes(row, list(shapes)) for row in rows]
    for name in shapes:
        per_rank = [d.get(name) for d in decoded]
        if any(s != per_rank[0] for s in per_rank):
            differing.append(f"{name}: " + ", ".join(f"rank {i} {list(s) if s is not None else '?'}" for i, s in enumerate(per_rank)))
    raise DitplanError(
        f"sequence parallelism: the ranks of one group pass {what} of different shapes "
        f"({'; '.join(differing) or 'different numbers of tensors'}); every rank of a sequence-parallel group must make "
        "the same call with the same input sizes."
    )


def _collective_device(group: ProcessGroup) -> torch.device:
    """Where this group's small bookkeeping tensors must live: NCCL only moves CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _decode_shapes(row: list[int], names: list[str]) -> dict[str, tuple[int, ...]]:
    decoded: dict[str, tuple[int, ...]] = {}
    position = 0
    for name in names:
        if position >= len(row):
            break
        ndim = row[position]
        decoded[name] = tuple(row[position + 1 : position + 1 + ndim])
        position += 1 + ndim
    return decoded


def ulysses_scatter_heads(tensors: Sequence[torch.Tensor], group: ProcessGroup | None) -> list[torch.Tensor]:
    """All-to-all each tensor from [B, H, S/u, D] (all heads, my tokens) to [B, H/u, S, D] (my heads, all tokens).

    Rank j of the group receives head block j; the gathered tokens are ordered by source rank, so the
    group's ranks must hold consecutive token chunks in rank order. The tensors (same shape: Q, K and
    V) travel in one call, one message per peer; each is copied once, straight into the send buffer.
    """
    u = group_size(group)
    if u == 1:
        return list(tensors)
    b, h, s, d = tensors[0].shape
    if h % u:
        raise DitplanError(f"Ulysses: {h} attention heads do not divide over ulysses={u} ranks; heads % ulysses must be 0.")
    # Send buffer [u, N, B, H/u, S, D]: the block for rank j is one contiguous slab.
    send = torch.empty((u, len(tensors), b, h // u, s, d), dtype=tensors[0].dtype, device=tensors[0].device)
    for index, tensor in enumerate(tensors):
        send[:, index].copy_(tensor.unflatten(1, (u, h // u)).transpose(0, 1))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[j] holds source rank j's tokens for my heads: put the source index next to the tokens.
    gathered = received.permute(1, 2, 3, 0, 4, 5).reshape(len(tensors), b, h // u, u * s, d)
    return list(gathered.unbind(0))


def ulysses_gather_heads(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """The inverse all-to-all: [B, H/u, S, D] (my heads, all tokens) back to [B, H, S/u, D]."""
    u = group_size(group)
    if u == 1:
        return tensor
    b, h_local, s, d = tensor.shape
    if s % u:
        raise DitplanError(f"Ulysses: {s} tokens do not divide over ulysses={u} ranks; tokens % ulysses must be 0.")
    # Send buffer [u, B, H/u, S/u, D]: token block j goes back to rank j (one copy, from any strides).
    send = torch.empty((u, b, h_local, s // u, d), dtype=tensor.dtype, device=tensor.device)
    send.copy_(tensor.unflatten(2, (u, s // u)).permute(2, 0, 1, 3, 4))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[j] holds my tokens for source rank j's heads, and rank j held head block j.
    return received.permute(1, 0, 2, 3, 4).reshape(b, u * h_local, s // u, d)


def local_heads(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's head block of a [B, H, T, D] tensor every rank holds whole (joint-attention text)."""
    u = group_size(group)
    if u == 1:
        return tensor
    per_rank = tensor.shape[1] // u
    start = group_rank(group) * per_rank
    return tensor[:, start : start + per_rank]


def all_gather_along(tensor: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in group-rank order (same shape on every rank)."""
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


class RingExchange:
    """Pass a buffer to the next rank of a ring and take the previous rank's, without blocking.

    `start(buffer)` posts the send to rank+1 and the receive from rank-1 (group order, wrapping) and
    returns at once, so the caller computes on the block it holds while the next one travels;
    `wait()` returns the received buffer. After k exchanges a rank holds the block that started on
    rank-k.
    """

    def __init__(self, group: ProcessGroup) -> None:
        self._group = group
        ranks = dist.get_process_group_ranks(group)
        me = dist.get_rank(group)
        self._next = ranks[(me + 1) % len(ranks)]
        self._previous = ranks[(me - 1) % len(ranks)]
        self._pending: list[dist.Work] = []
        self._incoming: torch.Tensor | None = None
        self._outgoing: torch.Tensor | None = None  # kept alive until the send has completed

    def start(self, buffer: torch.Tensor) -> None:
        if self._pending:
            raise RuntimeError("RingExchange.start called while an exchange is still in flight; call wait() first")
        self._outgoing = buffer.contiguous()
        self._incoming = torch.empty_like(self._outgoing)
        operations = [
            dist.P2POp(dist.isend, self._outgoing, self._next, self._group),
            dist.P2POp(dist.irecv, self._incoming, self._previous, self._group),
        ]
        self._pending = dist.batch_isend_irecv(operations)

    def wait(self) -> torch.Tensor:
        for work in self._pending:
            work.wait()
        self._pending, self._outgoing = [], None
        incoming, self._incoming = self._incoming, None
        assert incoming is not None, "wait() without start()"
        return incoming
