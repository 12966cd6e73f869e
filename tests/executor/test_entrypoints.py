"""`ditplan run` / `python -m executor` end to end: outputs, refusals, and a rank failing mid-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def ditplan_run(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "planner", "run", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return result, time.monotonic() - started


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.timeout(300)
def test_cfg2_run_writes_images_and_run_json_like_the_serial_run(tmp_path):
    common = ["--model", "tiny-pixart-alpha", "--steps", "3", "--seed", "7", "--prompt", "a cat", "a red car"]
    parallel, _ = ditplan_run(*common, "--plan", "cfg=2", "--nproc", "2", "--out", str(tmp_path / "cfg2"), "--print-layout")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "cfg groups: [0, 1]" in parallel.stdout
    assert "denoising loop" in parallel.stdout and "end to end" in parallel.stdout
    record = json.loads((tmp_path / "cfg2" / "run.json").read_text())
    assert record["world_size"] == 2 and record["config"].startswith("cfg=2")
    assert record["prompts"] == ["a cat", "a red car"] and record["seed"] == 7
    assert len(record["latency"]["step_s"]) == 3 and record["latency"]["loop_s"] > 0
    assert record["files"] == ["image-000.png", "image-001.png"]
    serial, _ = ditplan_run(*common, "--plan", "cfg=1", "--nproc", "1", "--out", str(tmp_path / "serial"))
    assert serial.returncode == 0, serial.stderr[-3000:]
    for name in record["files"]:
        difference = np.abs(pixels(tmp_path / "cfg2" / name) - pixels(tmp_path / "serial" / name)).max()
        assert difference <= 1, f"{name}: {difference} levels apart"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan", ["cfg=2", "pipefusion=2,patches=2,warmup=0"])  # the serial loop; the patch pipeline
def test_a_rank_failing_mid_run_ends_every_rank_with_its_error_once(tmp_path, plan):
    out = tmp_path / "never"
    result, seconds = ditplan_run("--model", "tiny-pixart-alpha", "--plan", plan, "--nproc", "2", "--steps", "4",
                                  "--out", str(out), env={"DITPLAN_FAIL_AT": "1:2"})
    assert result.returncode not in (0, None)
    output = result.stdout + result.stderr
    assert output.count("injected failure at step 2") == 1, output[-3000:]
    assert "rank 1 failed" in output
    assert seconds < 90  # process start (~10 s each, 2 cores) + the 60 s bound on the failure itself
    assert not out.exists(), "a failed run must not leave an output folder"
    assert not list(tmp_path.glob(".never*")), "the staging folder must be removed"


@pytest.mark.timeout(120)
def test_gpu_count_mismatch_is_refused_before_anything_starts(tmp_path):
    result, seconds = ditplan_run("--model", "tiny-pixart-alpha", "--plan", "cfg=2", "--nproc", "1", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "--nproc is 1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
def test_plan_the_model_profile_rules_out_is_refused_before_anything_starts(tmp_path):
    result, _ = ditplan_run("--model", "tiny-flux-dev", "--plan", "cfg=2", "--nproc", "2", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "classifier-free guidance" in result.stderr and result.stderr.count("error:") == 1


@pytest.mark.timeout(300)
def test_workers_refuse_alike_what_only_the_loaded_model_shows(tmp_path):
    # A pipeline folder has no profile, so only the workers (after loading it) can see that its
    # 4 heads do not split over ulysses=3: every rank refuses, rank 0 prints it once, exit 2.
    from executor.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("tiny-flux-dev", tmp_path / "model")
    result, seconds = ditplan_run("--model", str(folder), "--plan", "ulysses=3", "--nproc", "3", "--out", str(tmp_path / "x"),
                                  "--height", "256", "--width", "256")
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("does not divide the transformer's 4 attention heads") == 1, output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(60)
def test_help_names_every_flag():
    result = subprocess.run([sys.executable, "-m", "executor", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--model", "--plan", "--nproc", "--out", "--prompt", "--negative-prompt", "--height", "--width", "--frames",
                 "--steps", "--guidance-scale", "--guidance-scale-2", "--seed", "--cluster"):
        assert flag in result.stdout


@pytest.mark.parametrize("prompts", [["a cat"], ["a cat", "a dog"]])
def test_auto_plan_has_no_more_replicas_than_prompts(tmp_path, prompts):
    # With one prompt the planner's best per-image plan for tiny-pixart-alpha on 2 L40s is dp=2,
    # which would leave a replica idle; the launcher caps dp at the prompt count.
    from executor.launch import build_parser, preflight

    args = build_parser().parse_args(["--model", "tiny-pixart-alpha", "--plan", "auto", "--cluster", "l40-pcie-8", "--nproc", "2",
                                      "--out", str(tmp_path / "x"), "--prompt", *prompts])
    config, _, plan_file = preflight(args)
    assert config.world_size == 2 and config.dp <= len(prompts)
    assert json.loads(Path(plan_file).read_text())["config"] == str(config)
    Path(plan_file).unlink()


@pytest.mark.timeout(120)
def test_a_pipefusion_rank_loads_only_its_stage_from_a_pipeline_folder(tmp_path, monkeypatch):
    from executor.pipefusion.partition import parameter_count
    from executor.tiny import save_tiny_pipeline
    from executor.worker import load_pipeline

    folder = str(save_tiny_pipeline("tiny-pixart-alpha", tmp_path / "model"))
    whole = parameter_count(load_pipeline(folder, "cfg=1").transformer)
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        counts.append(parameter_count(load_pipeline(folder, "pipefusion=2,patches=2,warmup=0").transformer))
    assert all(count < 0.75 * whole for count in counts), (counts, whole)
    assert sum(counts) >= whole  # every block once, plus the conditioning both stages keep


@pytest.mark.timeout(120)
def test_a_profile_yaml_without_a_recipe_is_refused_before_anything_starts(tmp_path, capsys):
    # A cost-model profile names no weights: the workers could only fail to load it.
    from executor.launch import main

    code = main(["--model", str(ROOT / "profiles" / "models" / "pixart-alpha.yaml"), "--plan", "cfg=1", "--nproc", "1",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "without a build: recipe" in err, err
    assert not (tmp_path / "x").exists()
