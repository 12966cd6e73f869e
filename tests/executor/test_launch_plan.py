"""`ditplan run --plan FILE`: the plan file is the contract (model, sizes, steps, configuration)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from costmodel.errors import DitplanError
from executor.launch import build_parser, preflight
from planner.cli import main as ditplan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_plan(tmp_path) -> Path:
    """A plan searched for tiny-pixart-alpha at 128x64 (width x height) in 2 steps, on one GPU."""
    path = tmp_path / "plan.json"
    assert ditplan(["search", "--model", "tiny-pixart-alpha", "--height", "64", "--width", "128", "--steps", "2",
                    "--cluster", "l40-pcie-8", "--gpus", "1", "--out", str(path)]) == 0
    return path


def launcher_args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_the_plan_files_model_sizes_and_steps_are_what_runs(tmp_path, small_plan):
    args = launcher_args("--plan", str(small_plan), "--out", str(tmp_path / "out"))
    config, _, plan = preflight(args)
    assert (args.model, args.height, args.width, args.frames, args.steps) == ("tiny-pixart-alpha", 64, 128, 1, 2)
    assert plan == str(small_plan) and config.world_size == 1


@pytest.mark.parametrize("flag, value, planned", [("--steps", "20", "2"), ("--height", "256", "64"), ("--width", "64", "128")])
def test_a_flag_that_contradicts_the_plan_is_refused_naming_both_values(tmp_path, small_plan, flag, value, planned):
    args = launcher_args("--plan", str(small_plan), "--out", str(tmp_path / "out"), flag, value)
    with pytest.raises(DitplanError, match=f"{flag} {value} contradicts the plan's {flag[2:]} {planned}"):
        preflight(args)


def test_a_flag_repeating_the_plan_is_accepted(tmp_path, small_plan):
    args = launcher_args("--plan", str(small_plan), "--out", str(tmp_path / "out"), "--steps", "2", "--model",
                         "tiny-pixart-alpha")
    preflight(args)


def test_a_plan_for_another_model_is_refused_up_front(tmp_path):
    plan = tmp_path / "flux.json"
    assert ditplan(["search", "--model", "flux-dev", "--cluster", "l40-pcie-8", "--gpus", "2", "--out", str(plan)]) == 0
    args = launcher_args("--model", "tiny-pixart-alpha", "--plan", str(plan), "--nproc", "2", "--out", str(tmp_path / "o"))
    with pytest.raises(DitplanError, match="made for model 'flux-dev', not 'tiny-pixart-alpha'"):
        preflight(args)


def test_without_a_plan_file_the_models_default_sizes_run(tmp_path):
    args = launcher_args("--model", "tiny-pixart-alpha", "--plan", "cfg=1", "--out", str(tmp_path / "out"))
    preflight(args)
    assert (args.height, args.width, args.steps) == (256, 256, 4)  # tiny-pixart-alpha's profile defaults


@pytest.mark.timeout(240)
def test_run_records_the_plans_sizes_and_leaves_no_progress_bar_in_a_log(tmp_path, small_plan):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "planner", "run", "--plan", str(small_plan), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "run.json").read_text())
    assert (record["height"], record["width"], record["steps"]) == (64, 128, 2)
    assert "denoising" not in result.stderr


def test_nproc_defaults_to_the_plans_gpu_count(tmp_path):
    args = launcher_args("--model", "tiny-pixart-alpha", "--plan", "cfg=2", "--out", str(tmp_path / "out"))
    preflight(args)
    assert args.nproc == 2
    args = launcher_args("--model", "tiny-pixart-alpha", "--plan", "cfg=2", "--nproc", "4", "--out", str(tmp_path / "out"))
    with pytest.raises(DitplanError, match="uses 2 GPUs but --nproc is 4"):
        preflight(args)
