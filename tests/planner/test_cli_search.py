"""`ditplan search` / `plan-search` as a user runs them (subprocesses: the real entry points)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import costmodel
from costmodel.config import AXES, DEFAULT_PLACEMENT, ParallelConfig, Placement
from planner.plan import Plan

BIN = Path(sys.executable).parent
PIXART_2048 = ["--model", "pixart-alpha", "--height", "2048", "--width", "2048", "--steps", "20",
             "--cluster", "l40-pcie-8", "--gpus", "8", "--format", "json"]


def _run(program: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.timeout(300)
def test_search_json_follows_the_interface_and_every_plan_resimulates(tmp_path):
    done = _run("ditplan", "search", *PIXART_2048)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    plans, pruned = payload["plans"], payload["pruned"]
    assert plans and isinstance(pruned, list)
    for entry in plans:
        config = ParallelConfig.parse(entry["config"])
        assert config.world_size == 8
        assert sorted(entry["placement"]) == sorted(AXES)
        assert isinstance(entry["latency_s"], float) and entry["latency_s"] > 0
        assert isinstance(entry["memory_gib"], float) and entry["memory_gib"] > 0
        assert entry["scored_by"] == "simulator"
    ranked = [entry["end_to_end_s"] for entry in plans]
    assert ranked == sorted(ranked)  # best first, by the whole generation's latency
    for entry in pruned:
        assert set(entry) >= {"config", "reason"} and entry["reason"]
    assert payload["explanation"]["lines"][0].startswith("winner ")

    # Default-placement plans through `ditplan simulate --batch` (one process for all of them) ...
    rows = tmp_path / "rows.csv"
    default = [entry for entry in plans if tuple(entry["placement"]) == DEFAULT_PLACEMENT]
    with rows.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "height", "width", "frames", "steps", "cluster", "gpus", "config"])
        for entry in default:
            writer.writerow(["pixart-alpha", 2048, 2048, 1, 20, "l40-pcie-8", 8, entry["config"]])
    done = _run("ditplan", "simulate", "--batch", str(rows), "--format", "json")
    assert done.returncode == 0, done.stderr
    simulated = json.loads(done.stdout)
    assert len(simulated) == len(default)
    for entry, again in zip(default, simulated):
        assert again["feasible"] is True
        assert again["latency_s"] == pytest.approx(entry["latency_s"], rel=1e-12)
        assert again["memory_gib"] == pytest.approx(entry["memory_gib"], rel=1e-12)

    # ... the others through the same simulator with their placement, the first of them also via the CLI.
    others = [entry for entry in plans if tuple(entry["placement"]) != DEFAULT_PLACEMENT]
    model, cluster = costmodel.load_model("pixart-alpha"), costmodel.load_cluster("l40-pcie-8", gpus=8)
    for entry in others:
        config = ParallelConfig.parse(entry["config"])
        again = costmodel.simulate(model, cluster, config, height=2048, width=2048, steps=20,
                                   placement=Placement(config, tuple(entry["placement"])))
        assert again.feasible
        assert again.latency_s == pytest.approx(entry["latency_s"], rel=1e-12)
    if others:
        first = others[0]
        done = _run("ditplan", "simulate", "--model", "pixart-alpha", "--height", "2048", "--width", "2048",
                    "--steps", "20", "--cluster", "l40-pcie-8", "--gpus", "8", "--config", first["config"],
                    "--placement", ",".join(first["placement"]), "--format", "json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["latency_s"] == pytest.approx(first["latency_s"], rel=1e-12)


@pytest.mark.timeout(300)
def test_table_plan_file_and_pareto_plot_for_a_range(tmp_path):
    done = _run("plan-search", "--model", "sd3-medium", "--cluster", "l40-pcie-8", "--gpus", "1-4",
                "--top", "3", "--out", "plan.json", "--plot", "pareto.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for words in ("latency s", "speedup", "eff.", "mem GiB/GPU", "config", "placement", "best per GPU count",
                  "why the winner:", "vs runner-up", "pruned:", "plan written to plan.json"):
        assert words in text
    assert "more feasible plan(s)" in text  # --top 3 hides the rest and says so
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.model == "sd3-medium" and 1 <= plan.gpus <= 4
    assert plan.predicted["latency_s"] > 0 and plan.explanation
    assert (tmp_path / "pareto.png").stat().st_size > 1000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, fragments", [
    (["--model", "pixart-alfa", "--cluster", "l40-pcie-8", "--gpus", "8"], ["unknown model 'pixart-alfa'", "pixart-alpha", "flux-dev"]),
    (["--model", "flux-dev", "--cluster", "t4-pcie-4", "--gpus", "3"], ["ulysses=3", "ring=3", "pipefusion=3", "dp=3", "GiB"]),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "9"], ["--gpus 9", "8 GPUs"]),
    (["--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "4-2"], ["runs backwards"]),
])
def test_user_mistakes_exit_2_with_one_paragraph(args, fragments):
    done = _run("ditplan", "search", *args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("ditplan search: error: ")
    for fragment in fragments:
        assert fragment in done.stderr


@pytest.mark.timeout(120)
def test_search_imports_neither_torch_nor_diffusers_and_pandas_only_when_asked():
    code = (
        "import sys, planner\n"
        "result = planner.search('pixart-alpha', 'l40-pcie-8', 2)\n"
        "result.explanation(); result.to_dict()\n"
        "heavy = [m for m in ('torch', 'diffusers', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "result.to_frame(); planner.pareto_front(result)\n"
        "assert 'pandas' in sys.modules and 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
