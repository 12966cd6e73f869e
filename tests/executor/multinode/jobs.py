"""Starting one job across the two namespaces of netns.TwoNodeNetwork: one command per node, at once."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from netns import TwoNodeNetwork

ROOT = Path(__file__).resolve().parents[3]
# Fresh namespaces hold nothing else, but a port just closed lingers in TIME_WAIT: one per job.
_ports = itertools.count(29400 + os.getpid() % 500)
QUIET = {"TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}  # no reverse-DNS warnings from c10d


@dataclass
class NodeResult:
    code: int | None
    output: str
    seconds: float


def endpoint(network: TwoNodeNetwork) -> str:
    """A rendezvous endpoint on node 0's veth address, fresh for each job."""
    return f"{network.nodes[0].address}:{next(_ports)}"


def start_job(network: TwoNodeNetwork, argv_for_node, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `argv_for_node(node)` in each node's namespace at once (output captured)."""
    return [network.popen(node, argv_for_node(node), env={**QUIET, **(env or {})}, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) for node in (0, 1)]


def wait_job(processes: list[subprocess.Popen], deadline_s: float) -> list[NodeResult]:
    """Each node's exit status (None if it outlived the deadline and was killed), output and seconds."""
    started = time.monotonic()
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(started + deadline_s - time.monotonic(), 0.1))
            results.append(NodeResult(process.returncode, output, time.monotonic() - started))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            results.append(NodeResult(None, output, time.monotonic() - started))
    return results


def ditplan_run_argv(node: int, endpoint_text: str, *args: str) -> list[str]:
    """`ditplan run ARGS` as node `node` of a two-node job with its rendezvous at `endpoint_text`."""
    return [sys.executable, "-m", "planner", "run", *args, "--nnodes", "2", "--node-rank", str(node),
            "--rdzv-endpoint", endpoint_text]
