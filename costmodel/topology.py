"""Hardware and cluster specs: the GPU type, the topology graph of a node, its replication over a
network, and the communication model on it.

A cluster YAML describes one node shape (CPU sockets, PCIe switches under each, GPUs under each
switch, optionally an NVLink/NVSwitch domain, NICs) and the inter-node network; `load_cluster`
builds a networkx graph of the node and replicates it `nodes` times. Every link carries its
datasheet bandwidth, the achieved fractions for bulk point-to-point and for all-to-all traffic, a
per-message latency and the source of those figures.

Communication model: a pattern (all-to-all, ring all-gather, point-to-point) over concurrent rank
groups becomes flows along routed paths; each directed link carries the sum of its flows' bytes,
and the pattern lasts latency + max over links of bytes / (bandwidth x achieved fraction). So the
slowest tier a group crosses bounds it, and groups that cross one link at the same time share it.
A measured profile (the `measured:` section) replaces this model where it has a table.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import networkx as nx

from costmodel import strict
from costmodel.errors import DitplanError
from profiles import PROFILES_DIR

HARDWARE_DIR = PROFILES_DIR / "hardware"
CLUSTERS_DIR = PROFILES_DIR / "clusters"
PATTERNS = ("all_to_all", "all_gather", "p2p")
TIERS = ("nvlink", "pcie", "bridge", "socket", "network")
# Physical ceilings on a node's shape, well above any server built (8 sockets, a few PCIe switches
# per socket, 8-16 GPUs per switch): a count past them is a typing slip, and the topology graph
# holds one vertex per GPU, so an absurd count would exhaust memory instead of failing.
MAX_SOCKETS = 16
MAX_SWITCHES_PER_SOCKET = 64
MAX_GPUS_PER_SWITCH = 64
MAX_NICS = 64
MAX_NODES = 100_000


@dataclass(frozen=True)
class HardwareSpec:
    id: str
    name: str
    source: str
    peak_tflops: float
    matmul_efficiency: float
    attention_efficiency: float
    memory_bandwidth_gbs: float
    memory_efficiency: float
    memory_gb: float
    sm_count: int
    l2_cache_mb: float
    # A profile's measured operator tables (costmodel.measured.OperationTables): where present they
    # replace the roofline of GEMMs, attention and elementwise passes.
    operations: Any = None
    # Where calibration replaced datasheet-based figures: those figures (field -> value), the starting
    # point and soft anchor of every re-calibration, so it never feeds on its own output.
    priors: tuple[tuple[str, float], ...] = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_gb * 1e9 / 2**30


@dataclass(frozen=True)
class LinkSpec:
    """One link tier; figures per direction."""

    tier: str
    bandwidth_gbs: float
    efficiency: float  # achieved fraction for bulk point-to-point / ring traffic
    alltoall_efficiency: float  # achieved fraction when the link carries an all-to-all
    latency_us: float  # per message
    source: str

    def seconds_per_byte(self, pattern: str) -> float:
        fraction = self.alltoall_efficiency if pattern == "all_to_all" else self.efficiency
        return 1.0 / (self.bandwidth_gbs * 1e9 * fraction)

    def scaled(self, factor: float) -> "LinkSpec":
        return replace(self, bandwidth_gbs=self.bandwidth_gbs * factor)


@dataclass(frozen=True)
class MeasuredTable:
    """Seconds at sample sizes, interpolated linearly in log-log space and extrapolated flat in slope."""

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]

    def __call__(self, size: float) -> float:
        xs, ys = self.sizes, self.seconds
        if len(xs) == 1:
            return ys[0] * size / xs[0]
        i = min(max(bisect.bisect_left(xs, size), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (math.log(y1) - math.log(y0)) / (math.log(x1) - math.log(x0))
        return math.exp(math.log(y0) + slope * (math.log(max(size, 1e-12)) - math.log(x0)))


@dataclass(frozen=True)
class Measured:
    """Measured tables of a profiled cluster: they take precedence over datasheet rooflines.

    compute[(block kind, hidden size)]: seconds of one block by its row count (batch x tokens);
    communication[(pattern, ranks)]: seconds of one collective by the bytes each rank contributes;
    straggle[ranks]: the fraction of a segment of compute that `ranks` synchronized processes wait
    for the slowest of them at the exchange ending it, by the segment's seconds.
    """

    source: str
    compute: dict[tuple[str, int], MeasuredTable] = field(default_factory=dict)
    communication: dict[tuple[str, int], MeasuredTable] = field(default_factory=dict)
    straggle: dict[int, MeasuredTable] = field(default_factory=dict)

    def straggle_fraction(self, ranks: int, segment_s: float) -> float:
        """The table of the most processes measured up to `ranks` (0 without one), held at its end
        values outside the measured segment lengths rather than extrapolated."""
        counts = [count for count in self.straggle if count <= ranks]
        if not counts or segment_s <= 0:
            return 0.0
        table = self.straggle[max(counts)]
        return table(min(max(segment_s, table.sizes[0]), table.sizes[-1]))


@dataclass
class Cluster:
    """`gpus` GPUs of `nodes` replicas of one node shape. GPU g lives on node g // gpus_per_node."""

    id: str
    description: str
    path: str
    hardware: HardwareSpec
    nodes: int
    gpus: int
    gpus_per_node: int
    sockets: int
    switches_per_socket: int
    gpus_per_switch: int
    nics_per_node: int
    p2p: bool
    collective_launch_us: float
    host_op_us: float
    pcie: LinkSpec
    socket_link: LinkSpec | None
    nvlink: LinkSpec | None
    network: LinkSpec | None
    measured: Measured | None
    node_graph: nx.Graph
    # A PCIe switch's uplink to its socket's root complex, where it differs from the GPU-to-switch
    # links (peer traffic between switches crosses it); None: the `pcie` figures.
    bridge: LinkSpec | None = None
    priors: tuple[tuple[str, float], ...] = ()  # datasheet-based figures calibration replaced (see HardwareSpec)
    _paths: dict = field(default_factory=dict, repr=False)
    _pattern_cache: dict = field(default_factory=dict, repr=False)
    _node_paths: dict = field(default_factory=dict, repr=False)  # (device, device) -> devices on the route
    _flow_cache: dict = field(default_factory=dict, repr=False)  # (pattern, groups) -> Cluster._flows

    def tiers(self) -> dict[str, LinkSpec]:
        out = {"pcie": self.pcie}
        for name, link in (("bridge", self.bridge), ("socket", self.socket_link), ("nvlink", self.nvlink),
                           ("network", self.network)):
            if link is not None:
                out[name] = link
        return out

    def with_link_scaled(self, tier: str, factor: float) -> "Cluster":
        """A copy with one tier's bandwidth multiplied (what-if studies and property tests)."""
        links = self.tiers()
        if tier not in links:
            raise DitplanError(f"cluster {self.id!r} has no {tier!r} tier; it has {', '.join(links)}.")
        return self.with_constants(links={tier: links[tier].scaled(factor)})

    def with_constants(self, hardware: HardwareSpec | None = None, host_op_us: float | None = None,
                       links: dict[str, LinkSpec] | None = None) -> "Cluster":
        """A copy with other GPU figures, host overhead or link figures (calibration, what-if studies);
        the topology is the same, so the graph keeps its routes with the new links on its edges."""
        links = links or {}
        fields = {"pcie": "pcie", "bridge": "bridge", "socket": "socket_link", "nvlink": "nvlink", "network": "network"}
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if not name.startswith("_")}
        values.update({fields[tier]: link for tier, link in links.items()})
        current = self.tiers()
        if any(link.bandwidth_gbs != current[tier].bandwidth_gbs for tier, link in links.items()):
            # Routes follow bandwidth: a new graph whose edge costs reflect it.
            graph = self.node_graph.copy()
            for u, v, data in graph.edges(data=True):
                if data["tier"] in links:
                    graph.add_edge(u, v, link=links[data["tier"]], cost=data["cost"] * current[data["tier"]].bandwidth_gbs
                                   / links[data["tier"]].bandwidth_gbs)
            values["node_graph"] = graph
        else:
            values["_node_paths"] = self._node_paths  # same topology and costs: share the routes
            values["_flow_cache"] = self._flow_cache
        if hardware is not None:
            values["hardware"] = hardware
        if host_op_us is not None:
            values["host_op_us"] = host_op_us
        return Cluster(**values)

    # ----- the graph -----
    def graph(self) -> nx.Graph:
        """The whole cluster as one graph: every node's devices plus the network switch."""
        whole = nx.Graph()
        tiers = self.tiers()
        for node in range(self.nodes):
            mapping = {v: f"n{node}/{v}" for v in self.node_graph.nodes}
            whole.update(nx.relabel_nodes(self.node_graph, mapping))
            if self.network is not None:
                for nic in range(self.nics_per_node):
                    whole.add_edge(f"n{node}/nic{nic}", "network", link=self.network, tier="network")
        for _, _, data in whole.edges(data=True):
            data["link"] = tiers[data["tier"]]  # this cluster's figures (copies share one node graph)
        return whole

    # ----- routing -----
    def _node_route(self, a: str, b: str) -> tuple[tuple[str, str, LinkSpec], ...]:
        """Directed edges (u, v, link) from device a to device b inside one node."""
        key = (a, b)
        if key not in self._paths:
            if key not in self._node_paths:
                self._node_paths[key] = tuple(self._shortest_node_path(a, b))
            path = self._node_paths[key]
            graph = self.node_graph
            tiers = self.tiers()  # the edges' tiers, this cluster's figures (copies share one graph)
            self._paths[key] = tuple((u, v, tiers[graph.edges[u, v]["tier"]]) for u, v in zip(path, path[1:]))
        return self._paths[key]

    def _shortest_node_path(self, a: str, b: str) -> list[str]:
        graph = self.node_graph
        if a == b:
            return [a]
        if not self.p2p and self.nvlink is None and a.startswith("gpu") and b.startswith("gpu"):
            # Without GPU peer-to-peer the bytes are staged through pinned host memory, so even
            # two GPUs under one switch talk through the CPU's root complex.
            cpu_a, cpu_b = self._socket_of(a), self._socket_of(b)
            return (nx.shortest_path(graph, a, cpu_a, weight="cost")
                    + nx.shortest_path(graph, cpu_a, cpu_b, weight="cost")[1:]
                    + nx.shortest_path(graph, cpu_b, b, weight="cost")[1:])
        return nx.shortest_path(graph, a, b, weight="cost")

    def _socket_of(self, device: str) -> str:
        return next(n for n in nx.shortest_path(self.node_graph, device, "cpu0") if n.startswith("cpu"))

    def route(self, src: int, dst: int) -> list[tuple[tuple, LinkSpec]]:
        """Directed links ((node, u, v), link) that GPU src's data crosses to reach GPU dst."""
        key = ("gpu", src, dst)
        if key in self._paths:
            return self._paths[key]
        na, la = divmod(src, self.gpus_per_node)
        nb, lb = divmod(dst, self.gpus_per_node)
        if na == nb:
            hops = [((na, u, v), link) for u, v, link in self._node_route(f"gpu{la}", f"gpu{lb}")]
        else:
            if self.network is None:
                raise DitplanError(f"cluster {self.id!r} has no network section, so GPUs on different nodes cannot talk.")
            nic_a, nic_b = self._nic_of(la), self._nic_of(lb)
            hops = [((na, u, v), link) for u, v, link in self._node_route(f"gpu{la}", nic_a)]
            hops.append(((na, nic_a, "network"), self.network))
            hops.append(((nb, "network", nic_b), self.network))
            hops += [((nb, u, v), link) for u, v, link in self._node_route(nic_b, f"gpu{lb}")]
        self._paths[key] = hops
        return hops

    def _nic_of(self, local_gpu: int) -> str:
        return f"nic{local_gpu * self.nics_per_node // self.gpus_per_node}"

    def tier_between(self, src: int, dst: int) -> str:
        """The slowest tier on the route (by bulk seconds per byte)."""
        hops = self.route(src, dst)
        if not hops:
            return "local"
        return max(hops, key=lambda hop: hop[1].seconds_per_byte("p2p"))[1].tier

    # ----- communication -----
    def pattern_cost(self, pattern: str, groups: tuple[tuple[int, ...], ...]) -> tuple[float, float, str]:
        """(seconds per byte, fixed seconds, bottleneck tier) of `pattern` run by all `groups` at once.

        Bytes are those each rank contributes: its slab for all_to_all and all_gather, its message
        for p2p (where each group is an ordered ring and every member sends to the next).
        """
        key = (pattern, groups)
        cached = self._pattern_cache.get(key)
        if cached is not None:
            return cached
        edge_loads, paths = self._flows(pattern, groups)
        links = self.tiers()
        latency = max((sum(links[tier].latency_us for tier in path) * 1e-6 * factor for path, factor in paths),
                      default=0.0)
        if not edge_loads:
            result = (0.0, 0.0, "local")
        else:
            tier, load = max(edge_loads, key=lambda edge: edge[1] * links[edge[0]].seconds_per_byte(pattern))
            result = (load * links[tier].seconds_per_byte(pattern), latency + self.collective_launch_us * 1e-6, tier)
        self._pattern_cache[key] = result
        return result

    def _flows(self, pattern: str, groups: tuple[tuple[int, ...], ...]
               ) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[tuple[str, ...], float], ...]]:
        """What `pattern_cost` needs of the topology alone, so that copies with other link figures
        (calibration tries thousands) reuse it: each crossed directed link's tier and load (bytes
        per byte a rank contributes), and each flow's path as tiers with its latency multiplier."""
        key = (pattern, groups)
        cached = self._flow_cache.get(key)
        if cached is not None:
            return cached
        loads: dict[tuple, float] = {}
        tiers: dict[tuple, str] = {}
        paths: dict[tuple[tuple[str, ...], float], None] = {}
        for group in groups:
            n = len(group)
            if n < 2:
                continue
            if pattern == "all_to_all":
                flows = [(a, b, 1.0 / n) for a in group for b in group if a != b]
                hop_latency_factor = 1.0
            elif pattern == "all_gather":
                # NCCL's ring algorithm: every rank forwards the n-1 other slabs to its neighbour.
                flows = [(group[i], group[(i + 1) % n], float(n - 1)) for i in range(n)]
                hop_latency_factor = float(n - 1)
            elif pattern == "p2p":
                flows = [(group[i], group[(i + 1) % n], 1.0) for i in range(n if n > 2 else 1)]
                hop_latency_factor = 1.0
            else:
                raise ValueError(f"unknown pattern {pattern!r}")
            for src, dst, weight in flows:
                hops = self.route(src, dst)
                paths[(tuple(link.tier for _, link in hops), hop_latency_factor)] = None
                for edge, link in hops:
                    loads[edge] = loads.get(edge, 0.0) + weight
                    tiers[edge] = link.tier
        cached = (tuple((tiers[edge], load) for edge, load in loads.items()), tuple(paths))
        self._flow_cache[key] = cached
        return cached

    def comm_time(self, pattern: str, groups: tuple[tuple[int, ...], ...], nbytes: float) -> tuple[float, str]:
        """Seconds for `pattern` over the concurrent `groups` with `nbytes` per rank, and its tier."""
        if nbytes <= 0 or not groups or max(map(len, groups)) < 2:
            return 0.0, "local"
        per_byte, fixed, tier = self.pattern_cost(pattern, groups)
        if self.measured is not None:
            table = self.measured.communication.get((pattern, max(map(len, groups))))
            if table is not None:
                return table(nbytes), "measured"
        return fixed + per_byte * nbytes, tier


# ---------------------------------------------------------------- loading

def list_clusters() -> list[str]:
    return sorted(path.stem for path in CLUSTERS_DIR.glob("*.yaml"))


def list_hardware() -> list[str]:
    return sorted(path.stem for path in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(name: str) -> HardwareSpec:
    path = HARDWARE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise DitplanError(f"unknown hardware {name!r}; the built-in GPU types are {', '.join(list_hardware())}.")
    return _load_hardware_file(str(path))


@lru_cache(maxsize=32)
def _load_hardware_file(path_text: str) -> HardwareSpec:
    path = Path(path_text)
    return _hardware_from_mapping(strict.read_yaml(path), str(path))


def _hardware_from_mapping(data: Any, w: str) -> HardwareSpec:
    """A hardware file's fields; also the inline `hardware:` mapping of a profile the profiler wrote."""
    strict.check_keys(data, w, ("id", "name", "source", "peak_tflops", "matmul_efficiency", "attention_efficiency",
                                "memory_bandwidth_gbs", "memory_efficiency", "memory_gb", "sm_count", "l2_cache_mb"),
                      ("calibration", "notes"))
    return HardwareSpec(
        id=strict.text(data, "id", w), name=strict.text(data, "name", w), source=strict.text(data, "source", w),
        peak_tflops=strict.number(data, "peak_tflops", w),
        matmul_efficiency=strict.number(data, "matmul_efficiency", w, maximum=1.0),
        attention_efficiency=strict.number(data, "attention_efficiency", w, maximum=1.0),
        memory_bandwidth_gbs=strict.number(data, "memory_bandwidth_gbs", w),
        memory_efficiency=strict.number(data, "memory_efficiency", w, maximum=1.0),
        memory_gb=strict.number(data, "memory_gb", w),
        sm_count=strict.integer(data, "sm_count", w),
        l2_cache_mb=strict.number(data, "l2_cache_mb", w),
        priors=_priors(data, w),
    )


def _priors(data: dict[str, Any], where: str) -> tuple[tuple[str, float], ...]:
    """The `calibration:` section's `prior:` mapping, flattened to (dotted field, value) pairs."""
    if "calibration" not in data:
        return ()
    cw = f"{where}.calibration"
    section = strict.check_keys(data["calibration"], cw, ("source", "prior"), ("notes",))
    strict.text(section, "source", cw)
    pairs: list[tuple[str, float]] = []

    def walk(mapping: Any, prefix: str, mw: str) -> None:
        if not isinstance(mapping, dict):
            raise DitplanError(f"{mw}: must be a mapping of field names to datasheet-based values.")
        for key in mapping:
            if isinstance(mapping[key], dict):
                walk(mapping[key], f"{prefix}{key}.", f"{mw}.{key}")
            else:
                pairs.append((f"{prefix}{key}", strict.number(mapping, key, mw, allow_zero=True)))

    walk(section["prior"], "", f"{cw}.prior")
    return tuple(pairs)


def _link(data: Any, where: str, tier: str) -> LinkSpec:
    strict.check_keys(data, where, ("bandwidth_gbs", "efficiency", "latency_us", "source"),
                      ("alltoall_efficiency", "notes"))
    efficiency = strict.number(data, "efficiency", where, maximum=1.0)
    return LinkSpec(
        tier=tier,
        bandwidth_gbs=strict.number(data, "bandwidth_gbs", where),
        efficiency=efficiency,
        alltoall_efficiency=strict.number(data, "alltoall_efficiency", where, maximum=1.0, default=efficiency),
        latency_us=strict.number(data, "latency_us", where, allow_zero=True),
        source=strict.text(data, "source", where),
    )


def _table(entry: Any, where: str, size_key: str, value_key: str = "seconds") -> MeasuredTable:
    points = strict.sequence(entry, "points", where)
    pairs = []
    for index, point in enumerate(points):
        if (not isinstance(point, list) or len(point) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                       for v in point)):
            raise DitplanError(f"{where}.points[{index}]: {point!r} must be a pair [{size_key}, {value_key}] of "
                               "finite positive numbers.")
        pairs.append((float(point[0]), float(point[1])))
    pairs.sort()
    if len({x for x, _ in pairs}) != len(pairs):
        raise DitplanError(f"{where}.points: two points share one {size_key}; each size must appear once.")
    return MeasuredTable(tuple(x for x, _ in pairs), tuple(y for _, y in pairs))


def _measured(data: Any, where: str) -> Measured:
    strict.check_keys(data, where, ("source",), ("compute", "communication", "straggle", "operations", "machine", "notes"))
    measured = Measured(source=strict.text(data, "source", where))
    for index, entry in enumerate(data.get("compute", []) or []):
        ew = f"{where}.compute[{index}]"
        strict.check_keys(entry, ew, ("kind", "hidden_size", "points"), ("notes",))
        kind = strict.text(entry, "kind", ew, choices=("cross", "joint", "single", "temporal"))
        measured.compute[(kind, strict.integer(entry, "hidden_size", ew))] = _table(entry, ew, "rows")
    for index, entry in enumerate(data.get("communication", []) or []):
        ew = f"{where}.communication[{index}]"
        strict.check_keys(entry, ew, ("pattern", "ranks", "points"), ("notes",))
        pattern = strict.text(entry, "pattern", ew, choices=PATTERNS)
        measured.communication[(pattern, strict.integer(entry, "ranks", ew, minimum=2))] = _table(entry, ew, "bytes")
    for index, entry in enumerate(strict.sequence(data, "straggle", where, default=[])):
        ew = f"{where}.straggle[{index}]"
        strict.check_keys(entry, ew, ("ranks", "points"), ("notes",))
        ranks = strict.integer(entry, "ranks", ew, minimum=2)
        if ranks in measured.straggle:
            raise DitplanError(f"{ew}.ranks: {ranks} appears twice; give one straggle table per process count.")
        table = _table(entry, ew, "segment seconds", "fraction")
        if max(table.seconds) > 1.0:
            raise DitplanError(f"{ew}.points: a fraction of {max(table.seconds)} exceeds 1; a straggle fraction is the "
                               "share of a segment's compute the ranks wait, in (0, 1].")
        measured.straggle[ranks] = table
    return measured


@lru_cache(maxsize=64)
def _read_cluster(path_text: str) -> dict[str, Any]:
    """Validate a cluster file once; returns the parsed pieces."""
    path = Path(path_text)
    data = strict.read_yaml(path)
    w = str(path)
    strict.check_keys(data, w, ("id", "description", "hardware", "node"),
                      ("nodes", "network", "measured", "source", "calibration", "notes"))
    nw = f"{w}: node"
    node = strict.check_keys(
        data["node"], nw,
        ("sockets", "switches_per_socket", "gpus_per_switch", "p2p", "collective_launch_us", "host_op_us", "links"),
        ("nics", "notes"),
    )
    lw = f"{nw}.links"
    links = strict.check_keys(node["links"], lw, ("pcie",), ("bridge", "socket", "nvlink"))
    sockets = strict.integer(node, "sockets", nw, maximum=MAX_SOCKETS)
    if sockets > 1 and "socket" not in links:
        raise DitplanError(f"{lw}: missing field 'socket'; a node with {sockets} CPU sockets needs the inter-socket link.")
    parsed = {
        "id": strict.text(data, "id", w),
        "description": strict.text(data, "description", w),
        "hardware": _cluster_hardware(data, w),
        "nodes": strict.integer(data, "nodes", w, maximum=MAX_NODES, default=1),
        "sockets": sockets,
        "switches_per_socket": strict.integer(node, "switches_per_socket", nw, maximum=MAX_SWITCHES_PER_SOCKET),
        "gpus_per_switch": strict.integer(node, "gpus_per_switch", nw, maximum=MAX_GPUS_PER_SWITCH),
        "nics": strict.integer(node, "nics", nw, minimum=0, maximum=MAX_NICS, default=0),
        "p2p": strict.boolean(node, "p2p", nw),
        "collective_launch_us": strict.number(node, "collective_launch_us", nw, allow_zero=True),
        "host_op_us": strict.number(node, "host_op_us", nw, allow_zero=True),
        "pcie": _link(links["pcie"], f"{lw}.pcie", "pcie"),
        "socket": _link(links["socket"], f"{lw}.socket", "socket") if "socket" in links else None,
        "bridge": _link(links["bridge"], f"{lw}.bridge", "bridge") if "bridge" in links else None,
        "nvlink": _link(links["nvlink"], f"{lw}.nvlink", "nvlink") if "nvlink" in links else None,
        "network": _link(data["network"], f"{w}: network", "network") if "network" in data else None,
        "measured": _measured(data["measured"], f"{w}: measured") if "measured" in data else None,
        "priors": _priors(data, w),
    }
    if "measured" in data:
        _attach_profile_figures(parsed, data["measured"], f"{w}: measured", str(path))
    if parsed["network"] is not None and parsed["nics"] < 1:
        raise DitplanError(f"{nw}.nics: a cluster with a network section needs at least one NIC per node.")
    return parsed


def _cluster_hardware(data: dict[str, Any], w: str) -> HardwareSpec:
    """`hardware:` names a built-in GPU type, or (in a profile of a machine that has none, such as
    CPU processes) gives its figures inline in the hardware file schema."""
    if isinstance(data.get("hardware"), dict):
        return _hardware_from_mapping(data["hardware"], f"{w}: hardware")
    return load_hardware(strict.text(data, "hardware", w))


def _attach_profile_figures(parsed: dict[str, Any], data: dict[str, Any], where: str, path: str) -> None:
    """The profiler's additions to `measured:` (costmodel.measured): operator tables go onto the
    hardware (the compute model reads them there); a foreign machine or torch version is warned about."""
    from dataclasses import replace

    from costmodel import measured

    if "operations" in data:
        tables = measured.parse_operations(data["operations"], f"{where}.operations", _table)
        parsed["hardware"] = replace(parsed["hardware"], operations=tables)
    if "machine" in data:
        measured.warn_if_foreign(measured.parse_machine(data["machine"], f"{where}.machine"), path)


def _node_graph(p: dict[str, Any]) -> nx.Graph:
    """One node: gpuN - swK (PCIe switch) - cpuS (socket root complex) [- cpuT over the socket link],
    nicI under a switch, and an NVSwitch hub where the node has NVLink."""
    graph = nx.Graph()
    gpu = 0
    switches = p["sockets"] * p["switches_per_socket"]
    for socket in range(p["sockets"]):
        graph.add_node(f"cpu{socket}", kind="socket")
        for k in range(p["switches_per_socket"]):
            sw = f"sw{socket * p['switches_per_socket'] + k}"
            graph.add_node(sw, kind="pcie_switch")
            uplink = p["bridge"] or p["pcie"]
            graph.add_edge(sw, f"cpu{socket}", link=uplink, tier=uplink.tier, cost=1.0 / uplink.bandwidth_gbs)
            for _ in range(p["gpus_per_switch"]):
                graph.add_node(f"gpu{gpu}", kind="gpu")
                graph.add_edge(f"gpu{gpu}", sw, link=p["pcie"], tier="pcie", cost=1.0 / p["pcie"].bandwidth_gbs)
                gpu += 1
    for a in range(p["sockets"]):
        for b in range(a + 1, p["sockets"]):
            link = p["socket"]
            graph.add_edge(f"cpu{a}", f"cpu{b}", link=link, tier="socket", cost=1.0 / link.bandwidth_gbs)
    for nic in range(p["nics"]):
        sw = f"sw{nic * switches // p['nics']}"
        graph.add_node(f"nic{nic}", kind="nic")
        graph.add_edge(f"nic{nic}", sw, link=p["pcie"], tier="pcie", cost=1.0 / p["pcie"].bandwidth_gbs)
    if p["nvlink"] is not None:
        graph.add_node("nvswitch", kind="nvswitch")
        # NVLink is preferred over any PCIe route: tiny cost per hop.
        for g in range(gpu):
            graph.add_edge(f"gpu{g}", "nvswitch", link=p["nvlink"], tier="nvlink", cost=1e-6 / p["nvlink"].bandwidth_gbs)
    return graph


def load_cluster(name_or_path: str, gpus: int | None = None, nodes: int | None = None) -> Cluster:
    """A cluster id or YAML path -> Cluster of `nodes` nodes (default: the file's) using its first `gpus` GPUs."""
    path = strict.profile_path(str(name_or_path), CLUSTERS_DIR, "cluster", list_clusters).resolve()
    p = _read_cluster(str(path))
    node_count = p["nodes"] if nodes is None else nodes
    if isinstance(node_count, bool) or not isinstance(node_count, int) or node_count < 1:
        raise DitplanError(f"--nodes {node_count!r}: the node count must be an integer >= 1.")
    if node_count > 1 and p["network"] is None:
        raise DitplanError(f"--nodes {node_count}: cluster {p['id']!r} has no network section to join nodes over.")
    per_node = p["sockets"] * p["switches_per_socket"] * p["gpus_per_switch"]
    total = per_node * node_count
    used = total if gpus is None else gpus
    if isinstance(used, bool) or not isinstance(used, int) or used < 1:
        raise DitplanError(f"--gpus {used!r}: the GPU count must be an integer >= 1.")
    if used > total:
        raise DitplanError(
            f"--gpus {used}: cluster {p['id']!r} has {total} GPUs ({node_count} node(s) x {per_node}); "
            "use fewer GPUs or more --nodes."
        )
    return Cluster(
        id=p["id"], description=p["description"], path=str(path), hardware=p["hardware"], nodes=node_count,
        gpus=used, gpus_per_node=per_node, sockets=p["sockets"], switches_per_socket=p["switches_per_socket"],
        gpus_per_switch=p["gpus_per_switch"], nics_per_node=p["nics"], p2p=p["p2p"],
        collective_launch_us=p["collective_launch_us"], host_op_us=p["host_op_us"], pcie=p["pcie"], socket_link=p["socket"],
        nvlink=p["nvlink"], network=p["network"], measured=p["measured"], node_graph=_node_graph(p), priors=p["priors"],
        bridge=p["bridge"],
    )
