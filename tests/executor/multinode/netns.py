"""Two "nodes" on one Linux machine: two network namespaces joined by a veth pair, shaped with tc.

Each namespace holds one end of the pair with a private /30 address; `tc tbf` on both ends limits
each direction to the link's rate, so traffic between the namespaces crosses a slow link as it
would between two machines over Ethernet, while traffic inside one namespace (loopback, or a
process's own address) stays unshaped, as inside a node. Commands run in a namespace with
`ip netns exec`; gloo is pointed at the veth end (GLOO_SOCKET_IFNAME).

Everything created carries a name unique to this run (`dpt<pid in hex>-<n>-a|b`), and `close()` removes it
(the processes started in the namespaces, then the namespaces, which takes the veth pair with
them). Namespaces left by a run that was killed (whose pid is gone) are removed on the next start.

Used by the multi-node tests (their fixture) and by benchmarks/multinode_fidelity.py.
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

PREFIX = "dpt"
_counter = itertools.count()


class Unavailable(RuntimeError):
    """This machine cannot build the network (no root, no `ip`/`tc`, namespaces not permitted)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")
    return result


def missing_requirement() -> str | None:
    """Why two shaped namespaces cannot be built here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (install iproute2)"
    return None


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (a run killed before its teardown)."""
    listing = _ip("netns", "list", check=False).stdout.split()
    for name in listing:
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        owner = name[len(PREFIX):].split("-")[0]
        try:
            os.kill(int(owner, 16), 0)
        except (ValueError, ProcessLookupError):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
        except PermissionError:
            pass


def _kill_namespace_processes(name: str) -> None:
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


@dataclass
class Node:
    namespace: str
    interface: str
    address: str


@dataclass
class TwoNodeNetwork:
    """Two namespaces joined by a veth pair shaped to `rate` (tc syntax, e.g. '1gbit'; None: unshaped)."""

    rate: str | None = "1gbit"
    nodes: tuple[Node, Node] = field(init=False)
    _processes: list[subprocess.Popen] = field(default_factory=list, init=False)
    _created: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        reason = missing_requirement()
        if reason:
            raise Unavailable(reason)
        remove_stale()
        pid, serial = f"{os.getpid():x}", next(_counter)
        subnet = f"10.213.{random.randrange(256)}"
        # /30: .0 network, .1 and .2 the two ends, .3 broadcast. Interface names stay under 16 characters.
        self.nodes = (Node(f"{PREFIX}{pid}-{serial}-a", f"{PREFIX}{pid}{serial}a", f"{subnet}.1"),
                      Node(f"{PREFIX}{pid}-{serial}-b", f"{PREFIX}{pid}{serial}b", f"{subnet}.2"))
        try:
            for node in self.nodes:
                _ip("netns", "add", node.namespace)
                self._created.append(node.namespace)
            a, b = self.nodes
            _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
            for node in self.nodes:
                _ip("link", "set", node.interface, "netns", node.namespace)
                _ip("-n", node.namespace, "addr", "add", f"{node.address}/30", "dev", node.interface)
                _ip("-n", node.namespace, "link", "set", node.interface, "up")
                _ip("-n", node.namespace, "link", "set", "lo", "up")
                if self.rate:
                    # A token bucket per direction. A small burst (32 KiB) keeps messages of a few
                    # hundred KiB from passing above the rate; a short queue (5 ms) keeps TCP's
                    # acknowledgements from waiting behind seconds of data.
                    _ip("netns", "exec", node.namespace, "tc", "qdisc", "add", "dev", node.interface, "root",
                        "tbf", "rate", self.rate, "burst", "32kb", "latency", "5ms")
        except BaseException:
            self.close()
            raise

    def popen(self, node: int, argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start `argv` inside node `node`'s namespace, gloo bound to its veth end, in its own session."""
        target = self.nodes[node]
        variables = {**os.environ, "GLOO_SOCKET_IFNAME": target.interface, "OMP_NUM_THREADS": "1", **(env or {})}
        process = subprocess.Popen(["ip", "netns", "exec", target.namespace, *argv], env=variables,
                                   start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def pids(self, node: int) -> list[int]:
        """Processes now running inside node `node`'s namespace."""
        return [int(pid) for pid in _ip("netns", "pids", self.nodes[node].namespace, check=False).stdout.split()]

    def close(self) -> None:
        """Stop what was started here and remove the namespaces (and with them the veth pair)."""
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self._created):
            _kill_namespace_processes(name)
            deadline = time.monotonic() + 10
            while _ip("netns", "del", name, check=False).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
        # Only left in the root namespace when building failed before it moved into its namespace.
        if getattr(self, "nodes", None):
            _ip("link", "del", self.nodes[0].interface, check=False)
        self._created.clear()
        self._processes.clear()

    def __enter__(self) -> "TwoNodeNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
