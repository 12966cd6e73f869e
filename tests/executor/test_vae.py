"""Patch-parallel VAE decode: strips over 2 and 4 ranks equal the one-process decode, for both VAE
families the tiny pipelines use (AutoencoderKL; CogVideoX's causal 3D VAE), and `ditplan run` with
vae=2 writes the same PNG as without it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from executor_spawn import run_ranks  # noqa: E402
from test_entrypoints import ditplan_run  # noqa: E402

from costmodel.errors import DitplanError  # noqa: E402
from executor.vae import strip_rows  # noqa: E402

WORKER = Path(__file__).resolve().parent / "vae_worker.py"


def test_strip_rows_are_near_equal_and_cover_the_latent():
    assert strip_rows(30, 4) == [8, 8, 7, 7]
    assert strip_rows(32, 2) == [16, 16]
    with pytest.raises(DitplanError, match="at most 3 ranks"):
        strip_rows(3, 4)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("model, rows, cols", [("tiny-pixart-alpha", 30, 24), ("tiny-cogvideox-2b", 14, 10)])
@pytest.mark.parametrize("ranks", [2, 4])
def test_strips_decode_like_one_process(tmp_path, model, rows, cols, ranks):
    # 30 latent rows over 4 ranks: uneven strips (8, 8, 7, 7); the pixart VAE's mid-block attention spans them all.
    out = tmp_path / "result.json"
    results = run_ranks(WORKER, ranks, [model, str(rows), str(cols), str(out)], deadline_s=360)
    assert all(code == 0 for code, _ in results), "\n".join(output[-2000:] for _, output in results)
    result = json.loads(out.read_text())
    assert result["shape_split"] == result["shape_alone"]
    assert result["max_levels"] <= 1.0, result
    assert result["max_abs"] < 1e-3 * result["spread"], result


@pytest.mark.timeout(400)
@pytest.mark.parametrize("plan", ["cfg=2", "pipefusion=2,patches=2,warmup=0"])  # latents on every rank; on the leader only
def test_ditplan_run_with_vae_2_writes_the_same_png(tmp_path, plan):
    common = ["--model", "tiny-pixart-alpha", "--steps", "2", "--seed", "3", "--prompt", "a red car", "--nproc", "2"]
    images = {}
    for run_plan in (plan, plan + ",vae=2"):
        out = tmp_path / run_plan.replace(",", "_").replace("=", "")
        result, _ = ditplan_run(*common, "--plan", run_plan, "--out", str(out), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((out / "run.json").read_text())
        assert record["config"].endswith(",vae=2") == ("vae=2" in run_plan)
        images[run_plan] = np.asarray(Image.open(out / "image-000.png")).astype(int)
    alone, strips = images.values()
    assert np.abs(strips - alone).max() <= 1
