"""`ditplan simulate`, `models`, `clusters`, `validate`: output, batch, trace, and one-paragraph errors (exit 2)."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from planner.cli import main

FLUX_1024 = ["simulate", "--model", "flux-dev", "--height", "1024", "--width", "1024", "--steps", "28",
             "--cluster", "h100-sxm-nvlink-8", "--gpus", "4", "--config", "ulysses=4", "--format", "json"]


def call(argv, capsys):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(60)
def test_simulate_json_in_a_fresh_process():
    # Its wall time (target: under 3 s) is measured by benchmarks/simulate_speed.py.
    completed = subprocess.run([sys.executable, "-m", "planner", *FLUX_1024], capture_output=True, text=True, timeout=50)
    assert completed.returncode == 0, completed.stderr
    data = json.loads(completed.stdout)
    assert data["latency_s"] > 0 and data["memory_gib"] > 0 and data["feasible"] is True
    assert {"compute_s", "communication_s"} <= set(data["breakdown"])


def test_table_output_names_latency_memory_and_breakdown(capsys):
    code, out, _ = call(["simulate", "--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config",
                         "cfg=2,pipefusion=4"], capsys)
    assert code == 0
    for words in ("latency", "GiB per GPU", "warmup", "bubble", "text encoding", "l40-pcie-8: 8 x NVIDIA L40"):
        assert words in out


@pytest.mark.parametrize("argv, words", [
    (["--model", "flux-pro", "--cluster", "l40-pcie-8", "--config", "pipefusion=8"], "unknown model 'flux-pro'"),
    (["--model", "flux-dev", "--cluster", "dgx-9", "--config", "pipefusion=8"], "unknown cluster 'dgx-9'"),
    (["--model", "flux-dev", "--cluster", "l40-pcie-8", "--config", "cfg=2,pipefusion=4"], "classifier-free guidance"),
    (["--model", "flux-dev", "--cluster", "l40-pcie-8", "--gpus", "8", "--config", "ulysses=4"], "must equal the GPU count"),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "ulysses=3"], "16 attention heads"),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "pipefusion=2,warmup=40"], "warmup=40 exceeds"),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "tp=2"], "unknown key 'tp'"),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "ulysses=16"], "has 8 GPUs"),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "ring=2", "--height", "1000"], "not a multiple of 16"),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8"], "missing --config"),
])
def test_user_mistakes_exit_2_with_one_paragraph(argv, words, capsys):
    code, out, err = call(["simulate", *argv], capsys)
    assert code == 2 and out == ""
    assert words in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("ditplan simulate: error:")


def test_malformed_yaml_paths_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("id: [oops\n")
    code, _, err = call(["simulate", "--model", str(bad), "--cluster", "l40-pcie-8", "--config", "cfg=1", "--gpus", "1"], capsys)
    assert code == 2 and "malformed YAML" in err and str(bad) in err
    code, _, err = call(["simulate", "--model", "pixart-alpha", "--cluster", str(bad), "--config", "cfg=1"], capsys)
    assert code == 2 and "malformed YAML" in err


def test_batch_keeps_order_and_gives_bad_rows_a_reason(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "model,height,width,frames,steps,cluster,gpus,config\n"
        "pixart-alpha,1024,1024,1,20,l40-pcie-8,8,cfg=2;pipefusion=4\n"
        "pixart-alpha,1024,1024,1,20,l40-pcie-8,8,\"cfg=2,pipefusion=4\"\n"
        "flux-dev,1024,1024,1,28,rtx4090-pcie-8,1,cfg=1\n"
        "nope,1024,1024,1,28,l40-pcie-8,1,cfg=1\n"
    )
    code, out, _ = call(["simulate", "--batch", str(rows)], capsys)
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["model"] for r in table] == ["pixart-alpha", "pixart-alpha", "flux-dev", "nope"]
    assert "is not an integer" in table[0]["reason"] and table[0]["latency_s"] == ""
    assert float(table[1]["latency_s"]) > 0 and table[1]["feasible"] == "True"
    assert table[2]["feasible"] == "False" and "GiB" in table[2]["reason"]
    assert "unknown model 'nope'" in table[3]["reason"]
    code, out, _ = call(["simulate", "--batch", str(rows), "--format", "json"], capsys)
    assert [r["feasible"] for r in json.loads(out)] == [False, True, False, False]


def test_trace_is_chrome_json_with_a_track_per_rank(tmp_path, capsys):
    path = tmp_path / "trace.json"
    code, _, _ = call(["simulate", "--model", "sd3-medium", "--cluster", "l40-pcie-8", "--config",
                       "cfg=2,pipefusion=4,patches=8", "--trace", str(path), "--steps", "6"], capsys)
    assert code == 0
    events = json.loads(path.read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == set(range(8))
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"rank 0", "rank 7", "compute", "communication"} <= names


def test_nodes_flag_replicates(capsys):
    code, out, _ = call(["simulate", "--model", "flux-dev", "--cluster", "h100-sxm-nvlink-8", "--nodes", "2",
                         "--config", "ulysses=8,dp=2", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["gpus"] == 16


def test_models_and_clusters_listings(capsys):
    code, out, _ = call(["models"], capsys)
    assert code == 0 and "flux-dev" in out and "19 joint + 38 single" in out
    code, out, _ = call(["models", "--format", "json"], capsys)
    assert {m["id"] for m in json.loads(out)} >= {"pixart-alpha", "latte", "cogvideox-5b", "wan2.1-t2v-1.3b",
                                                  "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "hunyuan-video", "qwen-image",
                                                  "sana-1600m", "cogvideox1.5-5b", "consisid", "sd3.5-large"}
    code, out, _ = call(["clusters"], capsys)
    assert code == 0 and "l40-pcie-8x2-eth" in out and "socket" in out
    code, out, _ = call(["clusters", "--cluster", "l40-pcie-8", "--format", "json"], capsys)
    detail = json.loads(out)
    assert detail["tiers"]["socket"]["source"] and detail["sockets"] == 2


def test_validate_meets_the_bar(capsys):
    code, out, _ = call(["validate", "--format", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert len(data["rows"]) == 103
    assert data["median_abs_error_pct"] <= 15.0
    code, out, _ = call(["validate"], capsys)
    assert "median absolute error" in out and "spearman" in out
