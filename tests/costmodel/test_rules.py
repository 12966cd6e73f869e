"""Configuration rules against model, resolution, frames, steps and GPUs: every broken rule in words."""
from __future__ import annotations

import pytest

from costmodel import DitplanError, ParallelConfig, check_config, ensure_valid_config, load_model


def problems(config: str, model: str = "pixart-alpha", height: int = 1024, width: int = 1024, frames: int = 1,
             steps: int = 20, gpus: int | None = None) -> list[str]:
    parsed = ParallelConfig.parse(config)
    return check_config(parsed, model, height, width, frames, steps, parsed.world_size if gpus is None else gpus)


def test_valid_configurations_have_no_problems():
    assert problems("cfg=2,pipefusion=4") == []
    assert problems("ulysses=4", model="flux-dev", steps=28) == []
    assert problems("ulysses=2,cfg=2", model="cogvideox-2b", height=480, width=720, frames=49) == []


@pytest.mark.parametrize("kwargs, words", [
    ({"config": "ulysses=2", "gpus": 8}, "must equal the GPU count"),
    ({"config": "cfg=2", "model": "flux-dev"}, "does not use classifier-free guidance"),
    ({"config": "ulysses=3,dp=1"}, "does not divide pixart-alpha's 16 attention heads"),
    ({"config": "pipefusion=32", "steps": 40}, "exceeds pixart-alpha's 28 transformer blocks"),
    ({"config": "pipefusion=2,warmup=30"}, "warmup=30 exceeds steps=20"),
    ({"config": "pipefusion=8", "model": "tiny-latte", "height": 256, "width": 256, "frames": 8, "steps": 4},
     "exceeds tiny-latte's 4 transformer blocks (a temporal block stays on the stage of the spatial block"),
    ({"config": "ring=8,patches=16"}, "do not split into patches x sp = 16 x 8 = 128"),
    ({"config": "ring=2", "height": 1000}, "height=1000 is not a multiple of 16"),
    ({"config": "cfg=1", "frames": 4}, "generates images"),
    ({"config": "cfg=1", "model": "cogvideox-2b", "height": 480, "width": 720, "frames": 48}, "1 + a multiple of 4"),
    ({"config": "cfg=1", "steps": 0}, "steps=0 must be an integer >= 1"),
])
def test_each_rule_is_reported_in_words(kwargs, words):
    found = problems(**kwargs)
    assert any(words in p for p in found), found


def test_every_broken_rule_is_listed_at_once():
    found = problems("cfg=2,ulysses=3,pipefusion=2,warmup=99", model="flux-dev", gpus=5)
    assert len(found) == 4  # product, cfg, heads, warmup


def test_raising_variant_names_every_rule():
    with pytest.raises(DitplanError) as error:
        ensure_valid_config("cfg=2,ulysses=5", "sd3-medium", 1024, 1024, 1, 28, 10)
    text = str(error.value)
    assert "24 attention heads" in text and "cfg=2,ulysses=5" in text
    ensure_valid_config("cfg=2,ulysses=4", load_model("sd3-medium"), 1024, 1024, 1, 28, 8)


def test_latte_stages_keep_each_temporal_block_with_its_spatial_block():
    from costmodel.pipefusion_sim import stages_of
    from costmodel.sim_setup import build_setup

    setup = build_setup("latte", "l40-pcie-8", ParallelConfig(pipefusion=4), 512, 512, 16, 50, None)
    stages = stages_of(setup)
    assert [len(stage) for stage in stages] == [14, 14, 14, 14]
    assert all(stage[0][1] == "cross" and stage[-1][1] == "temporal" for stage in stages)
