"""The multi-node flags of `ditplan run` and `ditplan profile`: torchrun's settings, refused
early and by name when they cannot work (no namespaces needed)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from executor.launch import torchrun_arguments
from jobs import ROOT


def ditplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_one_node_stays_standalone_and_several_use_static_rendezvous():
    one = argparse.Namespace(nproc=2, nnodes=1, node_rank=0, rdzv_endpoint=None, rdzv_id="ditplan")
    assert torchrun_arguments(one)[:1] == ["--standalone"]
    two = argparse.Namespace(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500", rdzv_id="job7")
    flags = torchrun_arguments(two)
    assert flags[flags.index("--nproc-per-node") + 1] == "2"  # --nproc counts every node's processes
    # static rendezvous: the node rank fixes which global ranks each node holds (the plan's placement)
    assert "--standalone" not in flags
    assert flags[flags.index("--rdzv-backend") + 1] == "static"
    assert flags[flags.index("--node-rank") + 1] == "1" and flags[flags.index("--rdzv-endpoint") + 1] == "10.0.0.1:29500"
    assert flags[flags.index("--rdzv-id") + 1] == "job7" and flags[flags.index("--nnodes") + 1] == "2"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags, named", [
    (["--nproc", "2", "--nnodes", "2"], "--rdzv-endpoint None"),
    (["--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1"], "HOST:PORT"),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "10.0.0.1:29500"], "--node-rank 2"),
    (["--nproc", "3", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29500", "--plan", "ring=3"], "multiple of --nnodes"),
], ids=["no-endpoint", "no-port", "node-rank-out-of-range", "uneven"])
def test_run_refuses_bad_node_settings_before_starting(tmp_path, flags, named):
    plan = [] if "--plan" in flags else ["--plan", "cfg=2"]
    result = ditplan("run", "--model", "tiny-pixart-alpha", *plan, "--out", str(tmp_path / "x"), *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr and result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
def test_profile_refuses_several_nodes_without_an_endpoint(tmp_path):
    result = ditplan("profile", "--nnodes", "2", "--node-rank", "1", "--out", str(tmp_path / "p.yaml"), "--no-progress")
    assert result.returncode == 2 and "--rdzv-endpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.yaml").exists()
