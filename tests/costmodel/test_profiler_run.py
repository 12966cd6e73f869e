"""The profiler end to end at reduced sizes (real torch measurements, two gloo processes), the
`ditplan profile` command's refusals, and the prediction side of benchmarks/gpu_check.py."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from costmodel import DitplanError, load_cluster, simulate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_profile_machine_writes_a_profile_the_cost_model_uses(tmp_path, monkeypatch):
    from costmodel.profiler import comm_bench, compute_bench
    from costmodel.profiler.run import profile_machine

    # A coarse sweep: the same code paths as the full profile in a fraction of its time.
    monkeypatch.setattr(compute_bench, "GEMM_SHAPES", ((64, 64, 256), (256, 256, 1024)))
    monkeypatch.setattr(compute_bench, "ATTENTION_SHAPES", ((64, 256, 32), (256, 256, 32), (64, 256, 64)))
    monkeypatch.setattr(compute_bench, "BLOCK_ROWS", (16, 256))
    monkeypatch.setattr(compute_bench, "ACTIVATION_ELEMENTS", (2**10, 2**16))
    monkeypatch.setattr(comm_bench, "SIZES", (4096, 65536, 2**20))
    monkeypatch.setattr(comm_bench, "STRAGGLE_SEGMENTS_S", (0.005, 0.02))
    monkeypatch.setattr(comm_bench, "STRAGGLE_SECONDS", 0.2)
    out = tmp_path / "machine.yaml"
    report = profile_machine(out, (2,), progress=False, check=lambda temp: load_cluster(str(temp)))
    assert report.path == out and out.is_file()
    assert any(line.startswith("all_to_all on 2 processes: fit:") for line in report.lines)
    cluster = load_cluster(str(out), gpus=2)
    assert cluster.hardware.operations is not None and [d for d, _ in cluster.hardware.operations.attention] == [32, 64]
    assert {key for key in cluster.measured.communication} == {("p2p", 2), ("all_to_all", 2), ("all_gather", 2)}
    straggle = cluster.measured.straggle[2]
    assert len(straggle.sizes) == 2 and all(0 < fraction <= 1 for fraction in straggle.seconds)
    assert any(line.startswith("waiting for the slowest of 2 processes") for line in report.lines)
    result = simulate("tiny-pixart-alpha", cluster, "ulysses=2", steps=2)
    assert result.latency_s > 0 and result.comm_by_tier.get("measured", 0) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["machine.yaml"]


@pytest.mark.timeout(60)
def test_profile_command_refuses_bad_arguments_before_measuring(tmp_path):
    for argv, expected in ((["--nproc", "1"], "'1' is not allowed"), (["--out", str(tmp_path)], "it is a folder")):
        done = subprocess.run([sys.executable, "-m", "planner", "profile", *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(120)
def test_sigterm_during_profiling_leaves_the_old_profile_and_no_temporary(tmp_path):
    import signal
    import time

    out = tmp_path / "machine.yaml"
    out.write_text("an earlier profile\n")
    process = subprocess.Popen([sys.executable, "-m", "planner", "profile", "--out", str(out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The progress bar appears once measuring has begun (torch imported, the SIGTERM handler set).
    seen = b""
    deadline = time.monotonic() + 90
    while b"compute:" not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += os.read(process.stderr.fileno(), 4096)
    assert b"compute:" in seen, seen
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and b"stopped by SIGTERM" in stderr
    assert b"Traceback" not in stderr
    assert out.read_text() == "an earlier profile\n"
    assert [p.name for p in tmp_path.iterdir()] == ["machine.yaml"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_gpu_check_prediction_side():
    gpu_check = _gpu_check()
    assert gpu_check.cluster_for_device("NVIDIA H100 80GB HBM3") == "h100-sxm-nvlink-8"
    assert gpu_check.cluster_for_device("NVIDIA H200") == "h200-sxm-nvlink-8"
    with pytest.raises(DitplanError, match="'Tesla T4'"):
        gpu_check.cluster_for_device("Tesla T4")
    seconds = {case.name: gpu_check.predicted_seconds(case, "h100-sxm-nvlink-8") for case in gpu_check.CASES}
    small, large = seconds["PixArt-alpha block 1024x1024"], seconds["PixArt-alpha block 2048x2048"]
    assert 0 < small < large and large > 4 * small  # 4x the tokens: the attention grows 16x
    assert seconds["Flux double block 1024x1024"] > small  # hidden 3072 vs 1152
    assert gpu_check.CASES[2].tokens() == (4096, 512)


def test_gpu_check_says_plainly_when_only_one_gpu_is_there(monkeypatch, capsys):
    import torch

    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu_check.main(["--ranks-only"]) == 0
    assert "2-rank NCCL check: not run; this machine has 1 visible GPU(s) and the check needs two" in capsys.readouterr().out


@pytest.mark.timeout(400)
def test_gpu_check_two_rank_part_runs_on_two_cpu_processes():
    """--smoke runs the 2-rank check over gloo: every plan matches the one-process loop and the
    recorded calls replay under NCCL's rules."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--ranks-only"],
                            capture_output=True, text=True, timeout=380, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    plans = [line for line in lines if line.split() and line.split()[0] in ("cfg=2", "dp=2", "ulysses=2", "ring=2",
                                                                             "pipefusion=2,patches=2,warmup=1")]
    assert len(plans) == 5 and all(line.endswith("ok") for line in plans), result.stdout
    assert "NCCL rules on the recorded calls: no finding" in result.stdout


def test_gpu_check_reprices_a_recorded_report(capsys):
    """--reprice predicts the whole-transformer steps an H100 report measured with today's profiles."""
    results = ROOT / "benchmarks" / "results"
    report = results / "gpu_check-nvidia-h100-80gb-hbm3-20261126.txt"
    assert _gpu_check().main(["--reprice", str(report), "--op-tables", str(report.with_suffix(".profile.yaml"))]) == 0
    out = capsys.readouterr().out
    assert "against today's h100-sxm-nvlink-8 profile" in out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in {
        "pixart-alpha", "flux-dev", "wan2.1-t2v-14b", "hunyuan-video", "qwen-image"}]
    assert len(rows) == 5 and all(line.count("%") == 4 for line in rows), out
    assert out.splitlines()[-1].startswith("median |error|: builtin ")
