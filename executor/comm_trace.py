"""Record every torch.distributed call a rank makes, in order, for the NCCL rule checker.

Gloo buffers sends and connects every group at creation, so a CPU run completes even where NCCL
would block. To find out, each rank writes the communication calls it makes (operation,
communicator, peer, element count, dtype, device, contiguity, grouped or not) to
`<dir>/rank-<R>.jsonl`, and `executor.nccl_rules` replays the ranks' traces under NCCL's rules.

Enabled by the environment variable DITPLAN_COMM_TRACE=<dir> (set before the first import of
`executor`; child processes inherit it), or by calling `install(dir)`. Recording wraps the
functions of `torch.distributed` the executor and the profiler call, so it sees exactly what they
pass; it changes nothing else.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

TRACE_ENV = "DITPLAN_COMM_TRACE"
WORLD = "world"

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "all_to_all", "broadcast",
               "reduce_scatter_tensor", "barrier", "gather", "scatter", "reduce")
OBJECT_COLLECTIVES = ("gather_object", "all_gather_object", "broadcast_object_list", "scatter_object_list")
POINT_TO_POINT = {"send": "send", "isend": "send", "recv": "recv", "irecv": "recv"}


class _Recorder:
    """One rank's trace: group names by creation order, the open file (none when only a timeline
    listens), the timeline timing each call (executor.timeline), the call in progress."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.names: dict[int, str] = {}
        self.created = 0
        self.file: Any = None
        self.timeline: Any = None
        self.local = threading.local()

    def call(self, name: str, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """`original(*args, **kwargs)`, timed on the timeline if one listens; calls it makes
        underneath (object collectives, a group's sends) are not recorded again."""
        self.local.inside = True
        try:
            if self.timeline is not None:
                return self.timeline.communication(name, lambda: original(*args, **kwargs))
            return original(*args, **kwargs)
        finally:
            self.local.inside = False

    def group_name(self, group: Any) -> str:
        if group is None or group is dist.GroupMember.WORLD:
            return WORLD
        return self.names.get(id(group), "unknown")

    def write(self, record: dict[str, Any]) -> None:
        if self.folder is None:
            return
        if self.file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Line-buffered: the executor's workers leave with os._exit, which skips flushing.
            self.file = open(self.folder / f"rank-{dist.get_rank()}.jsonl", "a", buffering=1)
        self.file.write(json.dumps(record) + "\n")


_recorder: _Recorder | None = None


def _tensor_fields(tensor: torch.Tensor) -> dict[str, Any]:
    return {"numel": tensor.numel(), "dtype": str(tensor.dtype).removeprefix("torch."), "device": tensor.device.type,
            "contiguous": tensor.is_contiguous()}


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


# The argument holding the tensor (or object) whose size every member must agree on.
_PAYLOAD = {"all_gather": "tensor", "all_gather_into_tensor": "input_tensor", "all_to_all_single": "input",
            "all_to_all": "input_tensor_list", "reduce_scatter_tensor": "input", "scatter": "tensor",
            "gather_object": "obj", "all_gather_object": "obj", "broadcast_object_list": "object_list",
            "scatter_object_list": "scatter_object_input_list"}


def _collective_record(name: str, call: inspect.BoundArguments) -> dict[str, Any]:
    """The fields of a collective call that every member must agree on."""
    arguments = call.arguments
    record: dict[str, Any] = {"op": name, "group": arguments.get("group")}
    if name == "barrier":
        return record
    payload = arguments.get(_PAYLOAD.get(name, "tensor"))
    if name in OBJECT_COLLECTIVES:
        record["object_devices"] = sorted({t.device.type for t in _tensors_in(payload)})
        return record
    tensors = [t for value in arguments.values() for t in _tensors_in(value)]
    record.update(_tensor_fields(_tensors_in(payload)[0]))
    record["contiguous"] = all(t.is_contiguous() for t in tensors)
    record["devices"] = sorted({t.device.type for t in tensors})
    return record


def _p2p_record(kind: str, tensor: torch.Tensor, peer: int | None, group: str) -> dict[str, Any]:
    return {"op": kind, "peer": peer, "group": group, **_tensor_fields(tensor)}


def _peer(call: inspect.BoundArguments) -> int | None:
    """The peer's global rank of a send/recv call."""
    arguments = call.arguments
    for key in ("dst", "src"):
        if arguments.get(key) is not None:
            return int(arguments[key])
    for key in ("group_dst", "group_src"):
        if arguments.get(key) is not None:
            return dist.get_global_rank(arguments.get("group"), int(arguments[key]))
    return None


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        recorder = _recorder
        if recorder is None or getattr(recorder.local, "inside", False):
            return original(*args, **kwargs)
        if name == "init_process_group":
            result = original(*args, **kwargs)
            recorder.write({"op": "init", "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                            "device_id": str(kwargs.get("device_id")) if kwargs.get("device_id") is not None else None})
            return result
        if name == "new_group":
            ranks = args[0] if args else kwargs.get("ranks")
            group = original(*args, **kwargs)
            recorder.created += 1
            group_name = f"g{recorder.created}"
            if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
                recorder.names[id(group)] = group_name
            members = sorted(int(r) for r in ranks) if ranks is not None else list(range(dist.get_world_size()))
            recorder.write({"op": "new_group", "group": WORLD, "name": group_name, "members": members})
            return group
        if name == "batch_isend_irecv":
            operations = args[0] if args else kwargs["p2p_op_list"]
            entries = []
            for p2p in operations:
                kind = "send" if p2p.op in (c10d.isend, dist.isend) else "recv"
                entry = _p2p_record(kind, p2p.tensor, p2p.peer, recorder.group_name(p2p.group))
                entries.append(entry)
            recorder.write({"op": "batch", "ops": entries})
            return recorder.call(name, original, args, kwargs)
        call = signature.bind(*args, **kwargs)
        if name in POINT_TO_POINT:
            group = call.arguments.get("group")
            record = _p2p_record(POINT_TO_POINT[name], call.arguments["tensor"], _peer(call), recorder.group_name(group))
            record["blocking"] = name in ("send", "recv")
        else:
            record = _collective_record(name, call)
            record["group"] = recorder.group_name(record["group"])
        recorder.write(record)
        return recorder.call(name, original, args, kwargs)

    recorded.__ditplan_recorded__ = True  # type: ignore[attr-defined]
    return recorded


_WRAPPED = ("init_process_group", "new_group", "batch_isend_irecv", *POINT_TO_POINT, *COLLECTIVES, *OBJECT_COLLECTIVES)


def install(folder: str | Path | None) -> None:
    """Start recording this process's torch.distributed calls into `folder` (None: wrap them for a
    timeline only; idempotent, a later folder replaces None)."""
    global _recorder
    if _recorder is not None:
        if folder is not None and _recorder.folder is None:
            _recorder.folder = Path(folder)
        return
    _recorder = _Recorder(Path(folder) if folder is not None else None)
    for name in _WRAPPED:
        original = getattr(c10d, name)
        if getattr(original, "__ditplan_recorded__", False):
            continue
        wrapped = _wrap(name, original)
        # Both namespaces: P2POp and batch_isend_irecv compare against distributed_c10d's isend/irecv.
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def listen(timeline: Any) -> None:
    """Time every torch.distributed call on `timeline` (its `communication(name, call)`); None stops."""
    install(None)
    assert _recorder is not None
    _recorder.timeline = timeline


def install_from_environment() -> None:
    """Record when DITPLAN_COMM_TRACE names a folder."""
    folder = os.environ.get(TRACE_ENV)
    if folder:
        install(folder)
