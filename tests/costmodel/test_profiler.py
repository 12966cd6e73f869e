"""The profiler's pure parts and the profile file: fits, tables, strict loading, precedence of the
measured operation tables in the cost model, foreign-machine warnings, atomic writes."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from costmodel import DitplanError, load_cluster, simulate
from costmodel.measured import ProfileMismatchWarning, installed_torch_version, machine_fingerprint
from costmodel.profiler.fit import LinearFit, binned_table, fit_latency_bandwidth, monotone_points
from costmodel.profiler.profile_file import build_profile, write_atomically

ROOT = Path(__file__).resolve().parents[2]
GEMM_RATE = 1e11  # FLOP/s of the synthetic machine below
ATTENTION_RATE = {32: 4e10, 64: 8e10}


def _machine(**changes) -> dict:
    record = {"fingerprint": machine_fingerprint(), "cpu": "test CPU", "cpus": 2,
              "torch": installed_torch_version() or "none", "taken": "2026-01-01T00:00:00Z"}
    record.update(changes)
    return record


def synthetic_profile(**machine_changes) -> dict:
    """A profile as `ditplan profile` builds it, from exact synthetic rates (no measuring)."""
    sizes = [4096 * 4**e for e in range(8)]
    return build_profile(
        profile_id="synthetic", machine=_machine(**machine_changes), memory_gb=8.0, l2_cache_mb=1.0, host_op_us=5.0,
        gemm=[[f, f / GEMM_RATE] for f in (1e6, 1e8, 1e10, 1e12)],
        attention={d: [[f, f / rate] for f in (1e6, 1e8, 1e10, 1e12)] for d, rate in ATTENTION_RATE.items()},
        elementwise=[[b, 1e-6 + b / 5e10] for b in (1e3, 1e5, 1e7, 1e9)],
        activation=[[e, e / 1e9] for e in (1e3, 1e6, 1e9)],
        communication={(p, 2): [[s, 1e-4 + s / 2e9] for s in sizes] for p in ("p2p", "all_to_all", "all_gather")},
        fits={("p2p", 2): LinearFit(1e-4, 2.0, 0.0), ("all_to_all", 2): LinearFit(1e-4, 2.0, 0.0)},
        backend="gloo", straggle={2: [(0.01, 0.2), (0.05, 0.1), (0.25, 0.05)]},
    )


def write_profile(tmp_path: Path, profile: dict, name: str = "profile.yaml") -> Path:
    return write_atomically(tmp_path / name, profile)


# ------------------------------------------------------------------ fits and tables

def test_fit_recovers_latency_and_bandwidth():
    sizes = [4096 * 4**e for e in range(8)]
    result = fit_latency_bandwidth(sizes, [50e-6 + s / 3e9 for s in sizes])
    assert result.latency_s == pytest.approx(50e-6, rel=1e-3)
    assert result.bandwidth_gbs == pytest.approx(3.0, rel=1e-3)
    assert result.residual < 1e-6
    noisy = fit_latency_bandwidth(sizes, [(50e-6 + s / 3e9) * (1.3 if i % 2 else 0.8) for i, s in enumerate(sizes)])
    assert 0.1 < noisy.residual < 0.5  # the residual reports the scatter


def test_binned_table_averages_rates_within_a_bin():
    points = binned_table([(100.0, 1.0), (100.0, 4.0), (1e6, 1.0)], factor=4)
    assert len(points) == 2
    assert points[0] == [100.0, pytest.approx(2.0)]  # geometric mean of the rates 100 and 25
    assert points[1] == [1e6, 1.0]


def test_monotone_points_cap_contention_spikes():
    assert monotone_points([(4, 1.0), (1, 9.0), (16, 2.0), (64, 8.0)]) == [[1, 1.0], [4, 1.0], [16, 2.0], [64, 8.0]]


# ------------------------------------------------------------------ loading and precedence

def test_written_profile_loads_and_its_tables_take_precedence(tmp_path):
    path = write_profile(tmp_path, synthetic_profile())
    cluster = load_cluster(str(path), gpus=2)
    ops = cluster.hardware.operations
    assert ops is not None and ops.serial_host
    assert ops.gemm_seconds(1000, 1000, 1000) == pytest.approx(2e9 / GEMM_RATE)
    # Attention by head dimension, linear in between.
    assert ops.attention_seconds(1, 1000, 1000, 32) == pytest.approx(4e6 * 32 / 4e10)
    assert ops.attention_seconds(1, 1000, 1000, 48) == pytest.approx(0.5 * 4e6 * 48 / 4e10 + 0.5 * 4e6 * 48 / 8e10)
    seconds, tier = cluster.comm_time("all_to_all", ((0, 1),), 1e6)
    assert tier == "measured" and seconds == pytest.approx(1e-4 + 1e6 / 2e9, rel=0.02)
    # The whole prediction follows the tables: twice the GEMM and attention time when rates halve.
    slow = synthetic_profile()
    for key in ("gemm", "attention"):
        entries = slow["measured"]["operations"][key]
        for entry in entries if isinstance(entries, list) else [entries]:
            entry["points"] = [[size, 2 * seconds] for size, seconds in entry["points"]]
    slow_path = write_profile(tmp_path, slow, "slow.yaml")
    fast = simulate("tiny-pixart-alpha", load_cluster(str(path), gpus=1), "cfg=1", height=256, width=256, steps=2)
    slower = simulate("tiny-pixart-alpha", load_cluster(str(slow_path), gpus=1), "cfg=1", height=256, width=256, steps=2)
    assert 1.3 < slower.latency_s / fast.latency_s < 2.0


def test_built_in_clusters_keep_the_roofline():
    assert load_cluster("l40-pcie-8").hardware.operations is None


@pytest.mark.parametrize("edit, key, rule", [
    (lambda p: p["measured"]["operations"]["gemm"].pop("points"), "operations.gemm", "missing field 'points'"),
    (lambda p: p["measured"]["operations"]["attention"][0].update(head_dim=0), "attention[0].head_dim", "must be >= 1"),
    (lambda p: p["measured"]["operations"]["elementwise"]["points"].append([1e3, -1.0]), "elementwise.points[4]",
     "positive numbers"),
    (lambda p: p["measured"]["operations"].update(tensor_cores=True), "operations", "unknown key 'tensor_cores'"),
    (lambda p: p["measured"]["machine"].pop("torch"), "machine", "missing field 'torch'"),
    (lambda p: p["hardware"].update(peak_tflops=0), "hardware.peak_tflops", "must be > 0"),
    (lambda p: p["measured"]["communication"][0].update(ranks=1), "communication[0].ranks", "must be >= 2"),
    (lambda p: p["measured"]["straggle"][0]["points"].append([1.0, 1.5]), "straggle[0].points", "exceeds 1"),
    (lambda p: p["measured"]["straggle"][0]["points"].append([1.0, float("nan")]), "straggle[0].points[3]",
     "finite positive numbers"),
    (lambda p: p["measured"]["straggle"].append(dict(p["measured"]["straggle"][0])), "straggle[1].ranks",
     "appears twice"),
])
def test_bad_profile_is_refused_with_file_key_and_rule(tmp_path, edit, key, rule):
    profile = synthetic_profile()
    edit(profile)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    with pytest.raises(DitplanError) as error:
        load_cluster(str(path))
    message = str(error.value)
    assert str(path) in message and key in message and rule in message


def test_truncated_profile_is_refused_with_the_file_and_what_is_missing(tmp_path):
    text = write_profile(tmp_path, synthetic_profile()).read_text()
    lines = text.splitlines(keepends=True)
    last_value = max(i for i, line in enumerate(lines) if line.lstrip().startswith("source:"))
    # Every cut at a line boundary, and in the middle of every line, before the final text value.
    cuts = [sum(len(line) for line in lines[:n]) for n in range(1, last_value)]
    cuts += [cut + len(lines[n]) // 2 for n, cut in enumerate(cuts) if len(lines[n]) > 4]
    for index, cut in enumerate(cuts):
        path = tmp_path / f"cut-{index}.yaml"
        path.write_text(text[:cut])
        with pytest.raises(DitplanError, match=rf"^{path}"):
            load_cluster(str(path))
    path = tmp_path / "cut.yaml"
    path.write_text(text[: text.index("  machine:")] + "  machine:\n")
    with pytest.raises(DitplanError, match=r"cut\.yaml: missing field 'hardware'; it is required"):
        load_cluster(str(path))


def test_cli_refuses_a_bad_profile_in_one_paragraph(tmp_path):
    profile = synthetic_profile()
    profile["node"]["links"]["pcie"]["bandwidth_gbs"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "planner", "simulate", "--model", "tiny-pixart-alpha", "--cluster",
                           str(path), "--config", "cfg=1"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "bandwidth_gbs" in done.stderr and str(path) in done.stderr


def test_foreign_profile_is_usable_but_says_so(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileMismatchWarning)
        load_cluster(str(write_profile(tmp_path, synthetic_profile(), "here.yaml")))
    foreign = write_profile(tmp_path, synthetic_profile(fingerprint="0123456789ab", torch="1.0.0"), "there.yaml")
    with pytest.warns(ProfileMismatchWarning, match=r"another machine.*torch 1\.0\.0"):
        cluster = load_cluster(str(foreign))
    assert cluster.hardware.operations is not None


# ------------------------------------------------------------------ atomic writing

def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text("old contents\n")

    def interrupted(temp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, synthetic_profile(), check=interrupted)
    assert path.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.yaml"]


def test_profile_that_fails_its_check_is_not_written(tmp_path):
    path = tmp_path / "profile.yaml"
    broken = synthetic_profile()
    broken["hardware"]["sm_count"] = 0
    with pytest.raises(DitplanError, match="sm_count"):
        write_atomically(path, broken, check=lambda temp: load_cluster(str(temp)))
    assert list(tmp_path.iterdir()) == []


def test_profiles_are_ordinary_readable_files(tmp_path):
    path = write_profile(tmp_path, synthetic_profile())
    assert path.stat().st_mode & 0o044  # mkstemp's private mode is widened to the umask's


def test_process_counts_are_checked():
    from costmodel.profiler.run import parse_process_counts

    assert parse_process_counts("4,2,2") == (2, 4)
    with pytest.raises(DitplanError, match="'1' is not allowed"):
        parse_process_counts("1,2")
    with pytest.raises(DitplanError, match="'x' is not allowed"):
        parse_process_counts("2,x")


def test_fit_needs_two_samples():
    with pytest.raises(ValueError):
        fit_latency_bandwidth([1.0], [1.0])
    assert math.isfinite(fit_latency_bandwidth([1.0, 2.0], [1.0, 1.0]).latency_s)


def test_profiler_modules_import_without_torch():
    code = ("import sys, costmodel.measured, costmodel.profiler.run, planner.commands.profile; "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]"
