"""The profile file: assembling the cluster YAML from measurements, and writing it atomically.

The file has the schema of profiles/clusters/*.yaml (costmodel.topology) with the hardware given
inline (this machine's "GPU" is one process with one thread, not a built-in GPU type) and a
`measured:` section (costmodel.measured) that takes precedence over the roofline figures.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from costmodel import files
from costmodel.profiler.fit import LinearFit


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def build_profile(*, profile_id: str, machine: dict[str, Any], memory_gb: float, l2_cache_mb: float, host_op_us: float,
                  gemm: list[list[float]], attention: dict[int, list[list[float]]], elementwise: list[list[float]],
                  activation: list[list[float]],
                  communication: dict[tuple[str, int], list[list[float]]], fits: dict[tuple[str, int], LinearFit],
                  backend: str, nodes: int = 1, network_fits: dict[str, LinearFit] | None = None,
                  gpus_per_node: int | None = None,
                  straggle: dict[int, list[tuple[float, float]]] | None = None) -> dict[str, Any]:
    """The profile as a mapping, ready for YAML. Tables are [size, seconds] points; `straggle` tables
    (by process count) are [segment seconds, fraction] points (comm_bench's straggle measurement).

    With `nodes` > 1, `network_fits` ({pattern: fit} measured between the nodes, one process each)
    become the `network` tier, and the per-rank-count communication tables are left out: the cost
    model applies such a table to every group of that size, also to groups that cross the network,
    so the tiers (pcie inside a node, network between nodes) price every route instead.
    `gpus_per_node` (default: the largest process count measured) is how many processes each node
    will run."""
    gemm_peak = max(size / seconds for size, seconds in gemm)
    attention_peak = max(size / seconds for points in attention.values() for size, seconds in points)
    # The streaming rate of passes that stay in the cache hierarchy up to DRAM (1-16 MiB); bigger
    # temporaries get fresh pages from the kernel, which the elementwise table itself captures.
    streaming = [size / seconds for size, seconds in elementwise if 2**20 <= size <= 2**24] or \
        [size / seconds for size, seconds in elementwise]
    ranks = sorted({count for _, count in communication})
    p2p_fit = fits.get(("p2p", ranks[0]))
    a2a_fit = fits.get(("all_to_all", ranks[0]))
    link_bandwidth = p2p_fit.bandwidth_gbs if p2p_fit else 1.0
    a2a_fraction = min(1.0, a2a_fit.bandwidth_gbs / link_bandwidth) if (a2a_fit and p2p_fit) else 1.0
    # gpu -> switch -> gpu: the fitted point-to-point latency splits over the route's two hops.
    hop_latency_us = (p2p_fit.latency_s * 1e6 / 2) if p2p_fit else 50.0
    comm_entries = []
    for (pattern, count), points in sorted(communication.items(), key=lambda item: (item[0][1], item[0][0])):
        entry: dict[str, Any] = {"pattern": pattern, "ranks": count, "points": points}
        if (pattern, count) in fits:
            entry["notes"] = fits[(pattern, count)].describe()
        comm_entries.append(entry)
    straggle_entries = [
        {"ranks": count, "points": [[_round(segment), _round(fraction)] for segment, fraction in sorted(points)],
         "notes": "fraction of a segment of compute that synchronized ranks wait for the slowest, by its seconds"}
        for count, points in sorted((straggle or {}).items())]
    taken = machine["taken"]
    # Key order matters for truncation: every section after `measured` ends in required fields and
    # the file's last lines are the required link figures, so a file cut anywhere at a line boundary
    # (or inside a table) lacks a required key or is malformed YAML, and the loader refuses it.
    hardware = {
        "id": f"cpu-thread-{machine['fingerprint']}" if "accelerator" not in machine else f"measured-{machine['fingerprint']}",
        "name": f"{machine['cpu']} (one thread)" if "accelerator" not in machine else machine["accelerator"],
        "source": "measured by ditplan profile: peak = the best GEMM rate it saw, so the efficiencies are "
                  "relative to that; memory = RAM / logical CPUs (CPU) or the device's memory (GPU)",
        "peak_tflops": _round(gemm_peak / 1e12),
        "matmul_efficiency": 1.0,
        "attention_efficiency": _round(min(1.0, attention_peak / gemm_peak)),
        "memory_bandwidth_gbs": _round(sorted(streaming)[len(streaming) // 2] / 1e9),
        "memory_efficiency": 1.0,
        "memory_gb": _round(memory_gb),
        "sm_count": 1,
        "l2_cache_mb": _round(l2_cache_mb),
    }
    profile = {
        "id": profile_id,
        "description": (f"this machine ({machine.get('accelerator') or machine['cpu']}, {machine['cpus']} CPUs) as "
                        f"`ditplan profile` measured it on {taken}: each GPU is one process"
                        f"{'' if 'accelerator' in machine else ' with one thread'}, {backend} between processes"),
        "source": f"ditplan profile, {taken}, torch {machine['torch']}",
        "measured": {
            "source": f"ditplan profile, {taken}",
            "machine": machine,
            "operations": {
                "serial_host": "accelerator" not in machine,
                "gemm": {"points": gemm, "notes": "nn.Linear (x @ W^T + b) at DiT block shapes, by FLOPs (2 m k n)"},
                "attention": [{"head_dim": head_dim, "points": points,
                               "notes": "SDPA forward, by FLOPs (4 x batch x heads x q x k x d)"}
                              for head_dim, points in sorted(attention.items())],
                "elementwise": {"points": elementwise, "notes": "seconds of one pass (read or write) by its bytes, "
                                + ("of x * 1.5" if "accelerator" in machine else
                                   "of a PixArt block's operators other than matmuls, attention and GELU")},
                "activation": {"points": activation, "notes": "tanh-GELU by elements"},
            },
            "communication": comm_entries,
            **({"straggle": straggle_entries} if straggle_entries else {}),
        },
        "hardware": hardware,
        "node": {
            "sockets": 1,
            "switches_per_socket": 1,
            "gpus_per_switch": gpus_per_node or max(ranks),
            "p2p": True,
            "collective_launch_us": 0,
            "host_op_us": _round(host_op_us),
            "links": {
                "pcie": {
                    "bandwidth_gbs": _round(link_bandwidth),
                    "efficiency": 1.0,
                    "alltoall_efficiency": _round(a2a_fraction),
                    "latency_us": _round(hop_latency_us),
                    "source": f"{backend} between processes, fitted by ditplan profile (point-to-point on "
                              f"{ranks[0]} processes); used only where no measured table applies",
                },
            },
        },
    }
    if nodes > 1:
        profile = _with_network(profile, nodes, network_fits or {}, hop_latency_us, backend)
    return profile


def network_link(fits: dict[str, LinearFit], pcie_latency_us: float, backend: str) -> dict[str, Any]:
    """The `network` tier from fits between nodes (one process per node, so per NIC and direction).

    The cost model prices a cross-node message over gpu-switch-NIC (2 pcie hops), NIC-network-NIC
    (2 network hops) and NIC-switch-gpu (2 pcie hops), and a 2-rank all-to-all as half of each
    rank's bytes crossing; the figures are solved from the fits under those same rules.
    """
    p2p = fits["p2p"]
    bandwidth = p2p.bandwidth_gbs
    alltoall = fits.get("all_to_all")
    alltoall_fraction = min(1.0, 0.5 * alltoall.bandwidth_gbs / bandwidth) if alltoall else 1.0
    latency_us = max(0.0, (p2p.latency_s * 1e6 - 4 * pcie_latency_us) / 2)
    return {
        "bandwidth_gbs": _round(bandwidth),
        "efficiency": 1.0,
        "alltoall_efficiency": _round(alltoall_fraction),
        "latency_us": _round(latency_us),
        "source": f"{backend} between nodes, one process each, fitted by ditplan profile: point-to-point "
                  f"{p2p.describe()}" + (f"; all-to-all {alltoall.describe()}" if alltoall else ""),
    }


def _with_network(profile: dict[str, Any], nodes: int, fits: dict[str, LinearFit], pcie_latency_us: float,
                  backend: str) -> dict[str, Any]:
    """`profile` as `nodes` nodes of this machine joined by the measured link."""
    measured = {key: value for key, value in profile["measured"].items() if key != "communication"}
    head = {key: value for key, value in profile.items() if key not in ("measured", "hardware", "node")}
    head["description"] = profile["description"].replace("this machine", f"{nodes} nodes like this machine", 1) + \
        "; nodes joined by the measured link (network tier)"
    node = {**{key: value for key, value in profile["node"].items() if key != "links"}, "nics": 1,
            "links": profile["node"]["links"]}
    # Required fields close the file (see build_profile), so a cut file fails to load.
    return {**head, "nodes": nodes, "measured": measured, "hardware": profile["hardware"], "node": node,
            "network": network_link(fits, pcie_latency_us, backend)}


class _ProfileDumper(yaml.SafeDumper):
    """Block style throughout, except a list of numbers: one [size, seconds] point per line."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)


def write_atomically(path: str | Path, profile: dict[str, Any], check=None) -> Path:
    """Write `profile` next to `path` under a temporary name, check it (`check(temp_path)` may raise),
    then rename it into place: readers see the old file or the whole new one, never a part."""
    path = files.check_output(path, "--out")
    mode = files.replacement_mode(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.yaml", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write("# Written by `ditplan profile`; schema: profiles/clusters/*.yaml + costmodel/measured.py\n")
            yaml.dump(profile, stream, Dumper=_ProfileDumper, sort_keys=False, width=120, default_flow_style=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, mode)  # mkstemp makes the file private; a profile is ordinary data
        if check is not None:
            check(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path
