"""Replay the ranks' recorded communication (executor.comm_trace) under NCCL's rules.

A CPU run on gloo completes where NCCL may block: gloo buffers sends and connects every group when
it is created. This checker takes what each rank called, in order, and plays it out the way NCCL
is allowed to execute it, strictly:

* a rank's calls execute one at a time in the order it made them. NCCL runs the calls of one
  communicator in order on one stream and promises nothing about several communicators progressing
  independently, so the checker does not assume they do;
* a send or receive outside a group (`batch_isend_irecv`) blocks until the peer reaches the
  matching call (NCCL may wait for the receiver); a group completes only once every peer has
  reached a group holding the counterparts, in the same number and order;
* a communicator's first use needs all of its members at their first use of it (NCCL creates it
  there, lazily, unless it was created eagerly with a bound device); a send/recv outside a group
  uses a communicator of its two ranks only;
* creating a group (`new_group`) is collective over every rank of the job, with the same members
  in the same order;
* a collective needs every member at the same call, with equal element counts and dtypes;
* every tensor is contiguous and on the rank's one device; object collectives carry no tensor off
  the CPU (they unpickle on the receiving rank).

`check(folder)` returns the findings (empty: the run is NCCL-safe under these rules); run
`python -m executor.nccl_rules FOLDER` to print them.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodel.errors import DitplanError

WORLD = "world"


@dataclass
class _Op:
    rank: int
    index: int
    record: dict[str, Any]
    p2p: list[dict[str, Any]] = field(default_factory=list)  # the sends/receives of a p2p call or group

    @property
    def kind(self) -> str:
        return self.record["op"]

    def describe(self) -> str:
        if self.p2p:
            parts = ", ".join(f"{e['op']} {'to' if e['op'] == 'send' else 'from'} {e['peer']} ({e['numel']} {e['dtype']})"
                              for e in self.p2p)
            label = "group" if self.kind == "batch" else "ungrouped"
            return f"rank {self.rank} call {self.index}: {label} [{parts}] on {self.p2p[0]['group']}"
        size = f" ({self.record['numel']} {self.record['dtype']})" if "numel" in self.record else ""
        return f"rank {self.rank} call {self.index}: {self.kind}{size} on {self.record.get('group', WORLD)}"


def load_traces(folder: str | Path) -> dict[int, list[dict[str, Any]]]:
    """{rank: its records in call order} from the rank-<R>.jsonl files of `folder`."""
    files = sorted(Path(folder).glob("rank-*.jsonl"))
    if not files:
        raise DitplanError(f"{folder}: no rank-<R>.jsonl communication traces; record them with DITPLAN_COMM_TRACE={folder}.")
    return {int(f.stem.split("-")[1]): [json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in files}


class _Replay:
    def __init__(self, traces: dict[int, list[dict[str, Any]]]) -> None:
        self.findings: list[str] = []
        self.world = sorted(traces)
        self.members: dict[str, list[int]] = {WORLD: self.world}
        self.eager = any(r.get("op") == "init" and r.get("device_id") for trace in traces.values() for r in trace)
        self.ops: dict[int, list[_Op]] = {}
        for rank, trace in traces.items():
            ops = []
            for index, record in enumerate(trace):
                if record["op"] == "init":
                    continue
                op = _Op(rank, index, record)
                if record["op"] in ("send", "recv"):
                    op.p2p = [record]
                elif record["op"] == "batch":
                    op.p2p = record["ops"]
                ops.append(op)
                self._static_rules(op)
            self.ops[rank] = ops
        self.position = {rank: 0 for rank in traces}
        self.initialized: set[str] = set()

    def _static_rules(self, op: _Op) -> None:
        for entry in op.p2p or [op.record]:
            if entry.get("contiguous") is False:
                self.findings.append(f"{op.describe()}: a non-contiguous tensor (NCCL reads and writes contiguous buffers)")
            if len(entry.get("devices", [])) > 1:
                self.findings.append(f"{op.describe()}: tensors on several devices {entry['devices']} in one call")
        devices = [d for d in op.record.get("object_devices", []) if d != "cpu"]
        if devices:
            self.findings.append(f"{op.describe()}: an object collective carries tensors on {devices}; it unpickles them on "
                                 "another rank, which may not own that device: move them to the CPU first")

    # Which communicator a call uses, and its members.
    def _communicator(self, op: _Op) -> tuple[str, list[int]]:
        group = op.record.get("group", WORLD) if not op.p2p else op.p2p[0]["group"]
        if op.kind in ("send", "recv"):
            pair = sorted((op.rank, op.p2p[0]["peer"]))
            return f"{group}:{pair[0]}-{pair[1]}", pair
        return group, self.members.get(group, [])

    def _head(self, rank: int) -> _Op | None:
        ops = self.ops[rank]
        return ops[self.position[rank]] if self.position[rank] < len(ops) else None

    def run(self) -> list[str]:
        while any(self._head(r) is not None for r in self.world):
            if not (self._initialize() or self._collectives() or self._point_to_point()):
                self._deadlock()
                break
        return self.findings

    def _initialize(self) -> bool:
        """Create every communicator all of whose members have reached their first use of it."""
        waiting: dict[str, set[int]] = defaultdict(set)
        members_of: dict[str, list[int]] = {}
        for rank in self.world:
            head = self._head(rank)
            if head is None or head.kind == "new_group":
                continue
            name, members = self._communicator(head)
            if (name, rank) not in self.initialized and not self.eager:
                waiting[name].add(rank)
                members_of[name] = members
        done = False
        for name, ranks in waiting.items():
            if ranks >= set(members_of[name]):
                self.initialized.update((name, r) for r in ranks)
                done = True
        return done

    def _ready(self, op: _Op) -> bool:
        name, _ = self._communicator(op)
        return self.eager or op.kind == "new_group" or (name, op.rank) in self.initialized

    def _collectives(self) -> bool:
        progressed = False
        for rank in self.world:
            head = self._head(rank)
            if head is None or head.p2p or not self._ready(head):
                continue
            group = head.record.get("group", WORLD)
            members = self.members.get(group)
            if members is None:
                self.findings.append(f"{head.describe()}: a group the trace never created")
                self.position[rank] += 1
                return True
            heads = [self._head(m) for m in members]
            if not all(h is not None and not h.p2p and h.record.get("group", WORLD) == group and self._ready(h) for h in heads):
                continue
            self._compare(heads)
            if head.kind == "new_group":
                self.members[head.record["name"]] = head.record["members"]
            for m in members:
                self.position[m] += 1
            progressed = True
        return progressed

    def _compare(self, heads: list[_Op]) -> None:
        keys = ("op", "numel", "dtype", "members", "name")
        first = heads[0]
        for other in heads[1:]:
            differing = [k for k in keys if first.record.get(k) != other.record.get(k)]
            if differing:
                self.findings.append(f"collective mismatch: {first.describe()} vs {other.describe()} "
                                     f"(different {', '.join(differing)}: members must make the same call with the same sizes)")
                return

    def _point_to_point(self) -> bool:
        candidates = {r for r in self.world if (h := self._head(r)) is not None and h.p2p and self._ready(h)}
        changed = True
        while changed:
            changed = False
            for rank in sorted(candidates):
                if not all(self._matched(rank, entry, candidates) for entry in self._head(rank).p2p):
                    candidates.discard(rank)
                    changed = True
        for rank in candidates:
            self._check_sizes(rank)
        for rank in candidates:
            self.position[rank] += 1
        return bool(candidates)

    def _flows(self, op: _Op) -> Counter:
        return Counter((e["group"], e["op"], e["peer"]) for e in op.p2p)

    def _matched(self, rank: int, entry: dict[str, Any], candidates: set[int]) -> bool:
        peer = entry["peer"]
        if peer not in candidates:
            return False
        mine, theirs = self._head(rank), self._head(peer)
        counterpart = "recv" if entry["op"] == "send" else "send"
        return self._flows(mine)[(entry["group"], entry["op"], peer)] == self._flows(theirs)[(entry["group"], counterpart, rank)]

    def _check_sizes(self, rank: int) -> None:
        mine = self._head(rank)
        for peer in {e["peer"] for e in mine.p2p if e["op"] == "send"}:
            theirs = self._head(peer)
            sends = [e for e in mine.p2p if e["op"] == "send" and e["peer"] == peer]
            receives = [e for e in theirs.p2p if e["op"] == "recv" and e["peer"] == rank]
            for send, receive in zip(sends, receives):
                if (send["numel"], send["dtype"]) != (receive["numel"], receive["dtype"]):
                    self.findings.append(f"size mismatch: {mine.describe()} sends {send['numel']} {send['dtype']} where "
                                         f"{theirs.describe()} receives {receive['numel']} {receive['dtype']}")

    def _deadlock(self) -> None:
        heads = [self._head(r) for r in self.world]
        waiting = "; ".join(h.describe() + ("" if self._ready(h) else " (waiting for its communicator's other members)")
                            for h in heads if h is not None)
        self.findings.append(f"deadlock under NCCL's rules: no call can complete; each rank waits at: {waiting}")


def check(folder: str | Path) -> list[str]:
    """Findings of replaying the traces in `folder` under NCCL's rules (empty: none)."""
    return check_traces(load_traces(folder))


def check_traces(traces: dict[int, list[dict[str, Any]]]) -> list[str]:
    return _Replay(traces).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m executor.nccl_rules",
                                     description="Replay recorded communication traces (DITPLAN_COMM_TRACE) under NCCL's rules.")
    parser.add_argument("folder", help="folder of rank-<R>.jsonl traces")
    args = parser.parse_args(argv)
    try:
        findings = check(args.folder)
    except DitplanError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    for finding in findings:
        print(finding)
    print(f"{len(findings)} finding(s)" if findings else "NCCL rules: no finding")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
