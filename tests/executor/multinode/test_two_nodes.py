"""Multi-node runs on two network namespaces joined by a 1 Gbit/s shaped link (conftest.py).

Every job here runs one launcher per "node", each inside its namespace, with torchrun's multi-node
settings and the rendezvous on node 0's veth address; gloo crosses the shaped link. Checked: the
parallel methods give the one-process images across the nodes, a 4-process `ditplan run` (2 per
node) runs the planner's placement and gives the one-process images, and a rank killed on either
node ends the whole job on both nodes with a non-zero status and no output.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import ROOT, ditplan_run_argv, endpoint, start_job, wait_job
from two_node_worker import CONFIGS

HERE = Path(__file__).resolve().parent

LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # one 8-bit level
KILL_BOUND_S = 60.0


@pytest.fixture(scope="module")
def method_results(two_nodes, tmp_path_factory):
    """Every configuration of two_node_worker.py, one rank per node, in one torchrun job."""
    folder = tmp_path_factory.mktemp("methods")
    rendezvous = endpoint(two_nodes)
    argv = lambda node: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                         "--rdzv-backend", "static", "--rdzv-endpoint", rendezvous, "--nproc-per-node", "1",
                         "--max-restarts", "0", str(HERE / "two_node_worker.py"), str(folder)]
    results = wait_job(start_job(two_nodes, argv, env={"DITPLAN_COLLECTIVE_TIMEOUT_S": "120"}), deadline_s=480)
    for node, result in enumerate(results):
        assert result.code == 0, f"node {node} exited with {result.code}:\n{result.output[-4000:]}"
    return {rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _namespace_inode(name: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


@pytest.mark.timeout(600)
def test_each_rank_ran_on_its_own_node(method_results, two_nodes):
    for rank in (0, 1):
        where = method_results[rank]["where"]
        assert where["netns"] == _namespace_inode(two_nodes.nodes[rank].namespace), (rank, where)
        assert where["node_rank"] == str(rank) and where["local_rank"] == "0", (rank, where)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("config", [config for config, _ in CONFIGS])
def test_method_across_the_link_matches_one_process(method_results, config):
    entry = method_results[0].get(config)
    assert entry is not None, f"{config} was not run (an earlier check broke the process group?)"
    assert "error" not in entry, f"{config}: {entry['error']}\n{entry.get('trace', '')}"
    assert entry["latent_diff"] <= LATENT_TOLERANCE, f"{config} vs {entry['reference']}: latents {entry['latent_diff']:.3g} apart"
    assert entry["pixel_diff"] <= PIXEL_TOLERANCE, f"{config} vs {entry['reference']}: {entry['pixel_diff']} 8-bit levels apart"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def _two_by_two_cluster(path: Path) -> Path:
    """Two nodes of two GPUs over a 1 Gbit/s network: the shape the fixture gives 4 processes."""
    path.write_text(
        "id: two-by-two-1gbit\ndescription: two nodes of two GPUs joined by 1 Gbit/s\nhardware: l40\nnodes: 2\n"
        "node:\n  sockets: 1\n  switches_per_socket: 1\n  gpus_per_switch: 2\n  nics: 1\n  p2p: true\n"
        "  collective_launch_us: 20\n  host_op_us: 20\n  links:\n"
        "    pcie: {bandwidth_gbs: 32, efficiency: 0.8, latency_us: 5, source: PCIe Gen4 x16}\n"
        "network: {bandwidth_gbs: 0.125, efficiency: 0.9, latency_us: 50, source: 1 Gbit/s token bucket}\n")
    return path


def _workers_by_rank(network) -> dict[int, int]:
    """{global rank: node} of the executor workers running now in the two namespaces."""
    found = {}
    for node in (0, 1):
        for pid in network.pids(node):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"executor.worker" not in command:
                continue
            variables = dict(item.split(b"=", 1) for item in environment if b"=" in item)
            if b"RANK" in variables:
                found[int(variables[b"RANK"])] = node
    return found


@pytest.mark.timeout(600)
def test_four_processes_two_per_node_run_the_planners_placement(two_nodes, tmp_path):
    cluster = _two_by_two_cluster(tmp_path / "two-by-two.yaml")
    steps = 4
    common = ["--model", "tiny-pixart-alpha", "--steps", str(steps), "--height", "512", "--width", "512", "--seed", "11",
              "--prompt", "a red fox in snow"]
    rendezvous = endpoint(two_nodes)
    out = tmp_path / "auto4"
    processes = start_job(two_nodes, lambda node: ditplan_run_argv(
        node, rendezvous, *common, "--plan", "auto", "--cluster", str(cluster), "--nproc", "4", "--out", str(out)))
    placed: dict[int, int] = {}
    while any(process.poll() is None for process in processes):
        placed.update(_workers_by_rank(two_nodes))
        time.sleep(0.3)
    results = wait_job(processes, deadline_s=30)
    for node, result in enumerate(results):
        assert result.code == 0, f"node {node} exited with {result.code}:\n{result.output[-4000:]}"
    assert placed == {0: 0, 1: 0, 2: 1, 3: 1}, f"ranks by node: {placed}"
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 4
    # The planner's choice for this link: the heavy axis inside a node, only the light one across.
    ranks = {row["rank"]: row for row in record["ranks"]}
    across = [axis for axis in ("ulysses", "ring", "pipefusion", "cfg", "dp")
              if any(ranks[a][axis] != ranks[b][axis] for a, b in ((0, 2), (1, 3)))]
    inside = [axis for axis in ("ulysses", "ring", "pipefusion", "cfg", "dp") if ranks[0][axis] != ranks[1][axis]]
    assert inside and across and not set(inside) & set(across), (inside, across)
    config = dict(part.split("=") for part in record["config"].split(","))
    reference_plan = (f"pipefusion=1,patches={config['patches']},warmup={config['warmup']}"
                      if int(config["pipefusion"]) > 1 and int(config["warmup"]) < steps else "cfg=1")
    reference = subprocess.run([sys.executable, "-m", "planner", "run", *common, "--plan", reference_plan, "--nproc", "1",
                                "--out", str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True, timeout=240,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stderr[-3000:]
    for name in record["files"]:
        difference = np.abs(_pixels(out / name) - _pixels(tmp_path / "one" / name)).max()
        assert difference <= PIXEL_TOLERANCE, f"{record['config']} vs {reference_plan}: {name} {difference} levels apart"


def _kill_when_running(processes, network, node: int, rank: int, killed_at: list[float], log: list[str]) -> None:
    """Read node 0's launcher output; once the loop is running, SIGKILL `rank`'s worker on `node`."""
    for line in processes[0].stdout:
        log.append(line)
        if "denoising:" in line or "layout:" in line:
            break
    time.sleep(2.0)  # into the denoising loop
    for pid in network.pids(node):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            environment = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"executor.worker" in command and f"\0RANK={rank}\0".encode() in b"\0" + environment:
            os.kill(pid, signal.SIGKILL)
            killed_at.append(time.monotonic())
            break
    log.extend(processes[0].stdout)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("node, rank", [(1, 1), (0, 0)], ids=["rank-1-on-node-1", "rank-0-on-node-0"])
def test_a_rank_killed_on_one_node_ends_the_job_on_every_node(two_nodes, tmp_path, node, rank):
    rendezvous = endpoint(two_nodes)
    out = tmp_path / "never"
    processes = start_job(two_nodes, lambda n: ditplan_run_argv(
        n, rendezvous, "--model", "tiny-pixart-alpha", "--plan", "ulysses=2", "--nproc", "2", "--steps", "400",
        "--height", "512", "--width", "512", "--out", str(out), "--print-layout"))
    killed_at: list[float] = []
    log: list[str] = []
    killer = threading.Thread(target=_kill_when_running, args=(processes, two_nodes, node, rank, killed_at, log), daemon=True)
    killer.start()
    ended_at = {}
    deadline = time.monotonic() + 240
    while len(ended_at) < 2 and time.monotonic() < deadline:
        for index, process in enumerate(processes):
            if index not in ended_at and process.poll() is not None:
                ended_at[index] = time.monotonic()
        time.sleep(0.1)
    killer.join(timeout=10)
    other = wait_job(processes[1:], deadline_s=5)[0].output
    assert killed_at, "the worker to kill was never found running:\n" + "".join(log)[-3000:] + other[-2000:]
    for index, process in enumerate(processes):
        assert index in ended_at, f"node {index} still running 240 s after the kill"
        print(f"node {index} ended {ended_at[index] - killed_at[0]:.1f} s after the kill, status {process.returncode}")
        assert process.returncode not in (0, None), f"node {index} exited with {process.returncode}"
        assert ended_at[index] - killed_at[0] <= KILL_BOUND_S, f"node {index} ended {ended_at[index] - killed_at[0]:.0f} s after the kill"
    assert not out.exists(), "a failed run must not leave an output folder"
    assert not list(tmp_path.glob(".never*")), "the staging folder must be removed"
