"""Measured operation tables and the machine record of a profile that `ditplan profile` wrote.

A cluster profile's `measured:` section (costmodel.topology reads it) may carry, beside the
per-collective communication tables:

    measured:
      machine:                       # where and with what the figures were taken
        fingerprint: 3f2a9c1e0b7d    # hash of CPU model, logical CPUs and architecture
        cpu: "AMD EPYC ..."
        cpus: 2
        torch: 2.13.0+cpu
        taken: 2026-11-26T05:10:00Z
      operations:                    # seconds of one eager PyTorch operator, by its size
        serial_host: true            # the device is the CPU thread itself: dispatch and work add up
        gemm: {points: [[flops, seconds], ...]}             # nn.Linear (x @ W^T + b), 2 m k n FLOPs
        attention:                                          # SDPA forward, 4 x B x heads x q x k x d FLOPs,
          - {head_dim: 32, points: [[flops, seconds], ...]} # one table per head dimension (the kernels'
          - {head_dim: 64, points: [[flops, seconds], ...]} # inner loop length sets their rate)
        elementwise: {points: [[bytes, seconds], ...]}      # one pass (a read or a write) of a tensor
        activation: {points: [[elements, seconds], ...]}    # tanh-GELU of the MLP's hidden activation
      straggle:                      # share of a segment of compute that synchronized ranks wait for
        - {ranks: 2, points: [[segment_seconds, fraction], ...]}  # the slowest (costmodel.straggle)

When the operation tables are present they replace the hardware's roofline for GEMMs, attention
and elementwise passes (interpolated in log-log space by size, as the communication tables are),
so the efficiency curve by operation size is the measured one rather than a wave-quantised peak.
The activation table adds the MLP activation's arithmetic where it is not memory bound (on CPUs
tanh-GELU costs tens of passes' worth; a GPU hides it in the memory traffic, so without a table it
costs nothing beyond its passes).

This module imports neither torch nor diffusers: the torch version is read from the installed
package's metadata.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from costmodel import strict
from costmodel.errors import DitplanError


class ProfileMismatchWarning(UserWarning):
    """A profile taken on another machine or with another torch version is being used."""


@dataclass(frozen=True)
class OperationTables:
    """Measured seconds of single operators by size; `table(size)` interpolates (log-log)."""

    gemm: Any  # costmodel.topology.MeasuredTable over FLOPs (2 m k n)
    attention: tuple[tuple[int, Any], ...]  # (head_dim, table over FLOPs 4 x batch x heads x q x k x d), by head_dim
    elementwise: Any  # over the bytes of one pass
    activation: Any  # over elements of the MLP activation (tanh-GELU), or None
    serial_host: bool  # True when operator dispatch and the operator's work run on one thread

    def gemm_seconds(self, m: int, k: int, n: int) -> float:
        return self.gemm(2.0 * m * k * n)

    def attention_seconds(self, batch_heads: float, queries: int, keys: int, head_dim: int) -> float:
        """The table of the nearest head dimensions, interpolated linearly in between."""
        flops = 4.0 * batch_heads * queries * keys * head_dim
        dims = self.attention
        if head_dim <= dims[0][0]:
            return dims[0][1](flops)
        if head_dim >= dims[-1][0]:
            return dims[-1][1](flops)
        for (d0, t0), (d1, t1) in zip(dims, dims[1:]):
            if d0 <= head_dim <= d1:
                weight = (head_dim - d0) / (d1 - d0)
                return (1 - weight) * t0(flops) + weight * t1(flops)
        raise AssertionError("head dimensions are sorted")

    def activation_seconds(self, elements: float) -> float:
        return self.activation(elements) if self.activation is not None and elements > 0 else 0.0

    def elementwise_seconds(self, nbytes: float, pass_bytes: float | None = None) -> float:
        """`nbytes` of traffic made of passes of `pass_bytes` each (default: one pass of all of it)."""
        if nbytes <= 0:
            return 0.0
        size = nbytes if pass_bytes is None or pass_bytes <= 0 else min(pass_bytes, nbytes)
        return (nbytes / size) * self.elementwise(size)


@dataclass(frozen=True)
class MachineRecord:
    fingerprint: str
    cpu: str
    cpus: int
    torch: str
    taken: str


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_fingerprint() -> str:
    """A short hash of what decides this machine's speed: CPU model, logical CPU count, architecture.

    The host name is left out on purpose: two containers on the same hardware time alike.
    """
    text = "|".join((cpu_model(), str(os.cpu_count() or 0), platform.machine(), platform.system()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def installed_torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def parse_machine(data: Any, where: str) -> MachineRecord:
    strict.check_keys(data, where, ("fingerprint", "cpu", "cpus", "torch", "taken"), ("accelerator", "notes"))
    return MachineRecord(
        fingerprint=strict.text(data, "fingerprint", where),
        cpu=strict.text(data, "cpu", where),
        cpus=strict.integer(data, "cpus", where),
        torch=strict.text(data, "torch", where),
        taken=strict.text(data, "taken", where),
    )


def parse_operations(data: Any, where: str, table: Any) -> OperationTables:
    """The `operations` mapping; `table(entry, where, size_key)` is topology's strict table reader."""
    strict.check_keys(data, where, ("gemm", "attention", "elementwise"), ("activation", "serial_host", "notes"))
    tables = {"activation": None}
    for key, size_key in (("gemm", "flops"), ("elementwise", "bytes"), ("activation", "elements")):
        if key not in data:
            continue
        entry_where = f"{where}.{key}"
        strict.check_keys(data[key], entry_where, ("points",), ("notes",))
        tables[key] = table(data[key], entry_where, size_key)
    by_dim = {}
    for index, entry in enumerate(strict.sequence(data, "attention", where)):
        entry_where = f"{where}.attention[{index}]"
        strict.check_keys(entry, entry_where, ("head_dim", "points"), ("notes",))
        head_dim = strict.integer(entry, "head_dim", entry_where)
        if head_dim in by_dim:
            raise DitplanError(f"{entry_where}.head_dim: {head_dim} appears twice; give one table per head dimension.")
        by_dim[head_dim] = table(entry, entry_where, "flops")
    return OperationTables(attention=tuple(sorted(by_dim.items())),
                           serial_host=strict.boolean(data, "serial_host", where, default=False), **tables)


def mismatch(record: MachineRecord) -> str | None:
    """Why this profile may not describe the machine running now (None when it does)."""
    reasons = []
    here = machine_fingerprint()
    if record.fingerprint != here:
        reasons.append(f"it was taken on another machine ({record.cpu}, {record.cpus} CPUs; "
                       f"fingerprint {record.fingerprint}, this machine's is {here})")
    torch_here = installed_torch_version()
    if torch_here is not None and torch_here != record.torch:
        reasons.append(f"it was taken with torch {record.torch}, this environment has torch {torch_here}")
    return "; ".join(reasons) or None


def warn_if_foreign(record: MachineRecord, path: str) -> None:
    """A usable but foreign profile says so once per load (the loader caches files)."""
    reason = mismatch(record)
    if reason is not None:
        warnings.warn(f"profile {path}: {reason}; its measured figures may not hold here "
                      "(run `ditplan profile` again on this machine).", ProfileMismatchWarning, stacklevel=2)

