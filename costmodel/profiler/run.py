"""Orchestration of `ditplan profile`: compute on this process's thread, communication on groups of
spawned processes, fits, then the profile file written atomically and checked by the cost model's
own loader before it replaces anything.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from costmodel.errors import DitplanError
from costmodel.measured import cpu_model, installed_torch_version, machine_fingerprint
from costmodel.profiler import comm_bench, compute_bench, fit
from costmodel.interrupts import stop_on_signals
from costmodel.profiler.profile_file import build_profile, write_atomically

# The cost model's operator count for a PixArt block (costmodel.compute), which the host-cost
# measurement divides a real diffusers PixArt block's time by.
PIXART_BLOCK_OPERATORS = 30


@dataclass
class ProfileReport:
    path: Path | None  # None on the nodes other than node 0 of a multi-node profile
    lines: list[str] = field(default_factory=list)


def memory_gb() -> float:
    """Total RAM (GB, 10^9 bytes) from /proc/meminfo, or a page-count estimate elsewhere."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def l2_cache_mb() -> float:
    """One core's L2 cache (MB) from sysfs; 1 MB where it cannot be read (only the roofline fallback
    uses it: the measured elementwise table already includes cache effects)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip().upper()
        scale = {"K": 1024, "M": 2**20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * scale / 1e6
    except (OSError, ValueError):
        return 1.0


MAX_PROCESSES = 64


def parse_process_counts(text: str) -> tuple[int, ...]:
    """'2,4' -> (2, 4); each count an integer from 2 (communication needs two processes) to
    MAX_PROCESSES (each is a process started on this machine)."""
    counts = []
    for part in str(text).split(","):
        part = part.strip()
        count = int(part) if part.isascii() and part.isdigit() else 0
        if not 2 <= count <= MAX_PROCESSES:
            raise DitplanError(f"--nproc {text!r}: {part!r} is not allowed; give process counts from 2 to "
                               f"{MAX_PROCESSES} separated by commas, e.g. 2,4.")
        counts.append(count)
    return tuple(sorted(set(counts)))


def default_process_counts(gpus: int = 0) -> tuple[int, ...]:
    """On GPUs: 2, 4 and every GPU, as many as the node has (one process per GPU). On the CPU: 2
    and 4 where the machine has the cores for them (one thread per process)."""
    if gpus:
        return tuple(sorted({n for n in (2, 4, gpus) if 2 <= n <= gpus})) or (2,)
    cores = os.cpu_count() or 2
    return tuple(n for n in (2, 4) if n <= cores) or (2,)


def communication_backend(counts: tuple[int, ...], gpus: int) -> str:
    """NCCL between GPUs, gloo between CPU processes; refuses more processes than GPUs on a GPU
    machine rather than measuring gloo there unasked (its figures would describe the CPUs)."""
    if not gpus:
        return "gloo"
    if max(counts) > gpus:
        raise DitplanError(f"--nproc {','.join(map(str, counts))}: this machine has {gpus} GPU(s); "
                           f"profile at most {gpus} processes, one per GPU.")
    return "nccl"


def gpu_fingerprint(base: str, name: str, count: int) -> str:
    """The machine fingerprint extended by its GPU model and count, which decide a GPU profile's speed."""
    return hashlib.sha256(f"{base}|{name}|{count}".encode()).hexdigest()[:12]


def _progress(total: int, enabled: bool):
    if not enabled:
        class Silent:
            def update(self, n: int = 1) -> None: ...
            def set_description(self, text: str) -> None: ...
            def close(self) -> None: ...
        return Silent()
    from tqdm import tqdm

    return tqdm(total=total, desc="profiling", unit="measurement", leave=False)


def profile_machine(out: str | Path, process_counts: tuple[int, ...] | None = None, progress: bool = True,
                    check: Callable[[Path], object] | None = None, nodes: int = 1,
                    network_fits: dict[str, fit.LinearFit] | None = None, gpus_per_node: int | None = None) -> ProfileReport:
    """Measure this machine and write its profile to `out`; returns the path and a summary.

    `check(temp_path)` validates the written file before it replaces `out` (the CLI loads it with
    costmodel.load_cluster). An interrupt (Ctrl-C, SIGTERM) leaves `out` as it was. With `nodes` > 1
    the profile is that many such machines joined by the link `network_fits` describes
    (profile_nodes measures it), each running `gpus_per_node` processes (default: the most measured).
    """
    import torch

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    counts = default_process_counts(gpus) if process_counts is None else tuple(process_counts)
    backend = communication_backend(counts, gpus)
    device = "cuda" if cuda else "cpu"
    dtype = compute_bench.half_dtype(torch.cuda.get_device_capability(0)[0]) if cuda else "float32"
    shapes = ((compute_bench.GPU_GEMM_SHAPES, compute_bench.GPU_ATTENTION_SHAPES, compute_bench.GPU_ELEMENTWISE_BYTES,
               compute_bench.GPU_ACTIVATION_ELEMENTS) if cuda else
              (compute_bench.GEMM_SHAPES, compute_bench.ATTENTION_SHAPES, compute_bench.BLOCK_ROWS,
               compute_bench.ACTIVATION_ELEMENTS))
    total = (sum(len(series) for series in shapes) + 1
             + comm_bench.ticks() * len(counts))
    threads = torch.get_num_threads()
    with stop_on_signals():
        bar = _progress(total, progress)
        try:
            torch.set_num_threads(1)
            bar.set_description("compute: GEMM")
            gemm = compute_bench.gemm_samples(tick=bar.update, device=device, dtype=dtype)
            bar.set_description("compute: attention")
            attention = compute_bench.attention_samples(tick=bar.update, device=device, dtype=dtype)
            bar.set_description("compute: elementwise")
            elementwise = compute_bench.elementwise_samples(tick=bar.update, device=device, dtype=dtype)
            bar.set_description("compute: activation")
            activation = compute_bench.activation_samples(tick=bar.update, device=device, dtype=dtype)
            bar.set_description("compute: operator host cost")
            host_op_s = compute_bench.host_op_seconds(PIXART_BLOCK_OPERATORS)
            bar.update()
            communication: dict[tuple[str, int], list[tuple[int, float]]] = {}
            straggle: dict[int, list[tuple[float, float]]] = {}
            for count in counts:
                bar.set_description(f"communication: {count} processes ({backend})")
                samples_by_pattern, straggle[count] = comm_bench.measure(count, backend, tick=bar.update)
                for pattern, samples in samples_by_pattern.items():
                    communication[(pattern, count)] = samples
        finally:
            torch.set_num_threads(threads)
            bar.close()
        fits = {key: fit.fit_latency_bandwidth(*zip(*sorted(samples))) for key, samples in communication.items()}
        machine = {
            "fingerprint": (gpu_fingerprint(machine_fingerprint(), torch.cuda.get_device_name(0), gpus) if cuda
                            else machine_fingerprint()),
            "cpu": cpu_model(),
            "cpus": os.cpu_count() or 1,
            "torch": installed_torch_version() or torch.__version__,
            "taken": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if cuda:
            machine["accelerator"] = torch.cuda.get_device_name(0)
        gemm_points = fit.binned_table((s.size, s.seconds) for s in gemm)
        attention_points = {d: fit.binned_table((s.size, s.seconds) for s in attention if s.shape[-1] == d)
                            for d in sorted({s.shape[-1] for s in attention})}
        activation_points = fit.monotone_points((s.size, s.seconds) for s in activation)
        elementwise_points = fit.monotone_points((s.size, s.seconds) for s in elementwise)
        profile = build_profile(
            profile_id=f"profiled-{machine['fingerprint']}", machine=machine,
            memory_gb=memory_gb() / (os.cpu_count() or 1) if not cuda else torch.cuda.get_device_properties(0).total_memory / 1e9,
            l2_cache_mb=torch.cuda.get_device_properties(0).L2_cache_size / 1e6 if cuda else l2_cache_mb(),
            host_op_us=host_op_s * 1e6, gemm=gemm_points, attention=attention_points, elementwise=elementwise_points,
            activation=activation_points,
            communication={key: fit.monotone_points(samples) for key, samples in communication.items()},
            fits=fits, backend=backend, nodes=nodes, network_fits=network_fits, gpus_per_node=gpus_per_node,
            straggle=straggle,
        )
        path = write_atomically(out, profile, check=check)
    lines = [
        fit.rate_summary(gemm_points, 1e9, "GEMM GFLOP/s by FLOPs"),
        *(fit.rate_summary(points, 1e9, f"attention (head dim {d}) GFLOP/s by FLOPs") for d, points in attention_points.items()),
        fit.rate_summary(elementwise_points, 1e9, "elementwise GB/s per pass by bytes"),
        fit.rate_summary(activation_points, 1e9, "tanh-GELU G elements/s by elements"),
        f"host cost per eager operator (diffusers block): {host_op_s * 1e6:.1f} us",
    ]
    for (pattern, count), result in sorted(fits.items(), key=lambda item: (item[0][1], item[0][0])):
        lines.append(f"{pattern} on {count} processes: {result.describe()}")
    for count, points in sorted(straggle.items()):
        waits = ", ".join(f"{fraction * 100:.1f} % of {segment * 1e3:.0f} ms" for segment, fraction in sorted(points))
        lines.append(f"waiting for the slowest of {count} processes at each exchange: {waits}")
    crowded = [count for count in counts if not cuda and count > (os.cpu_count() or 1)]
    if crowded:
        lines.append(f"note: {', '.join(map(str, crowded))} processes outnumber this machine's {os.cpu_count()} cores; "
                     "their communication tables include the time-sharing, but the compute figures assume a core each")
    return ProfileReport(path=path, lines=lines)


def profile_nodes(out: str | Path, nnodes: int, node_rank: int, endpoint: str,
                  process_counts: tuple[int, ...] | None = None, progress: bool = True,
                  check: Callable[[Path], object] | None = None, gpus_per_node: int | None = None) -> ProfileReport:
    """`ditplan profile` on node `node_rank` of `nnodes`: every node measures the link between the
    nodes (one process each, at `endpoint`, node 0's address); node 0 then measures itself and writes
    the `nnodes`-node profile to `out`, the others write nothing."""
    from costmodel.profiler import link_bench

    bar = _progress(comm_bench.ROUNDS * len(comm_bench.PATTERNS) * len(comm_bench.SIZES), progress)
    bar.set_description(f"link between {nnodes} nodes (gloo)")
    with stop_on_signals():
        try:
            samples = link_bench.measure(node_rank, nnodes, endpoint, tick=bar.update)
        finally:
            bar.close()
    fits = {pattern: fit.fit_latency_and_bulk(*zip(*fit.monotone_points(points))) for pattern, points in samples.items()}
    lines = [f"{pattern} between nodes: {result.describe()}" for pattern, result in fits.items()]
    if node_rank != 0:
        return ProfileReport(path=None, lines=lines + [f"node {node_rank}: link measured; node 0 writes the profile"])
    report = profile_machine(out, process_counts, progress=progress, check=check, nodes=nnodes, network_fits=fits,
                             gpus_per_node=gpus_per_node)
    return ProfileReport(path=report.path, lines=lines + report.lines)
