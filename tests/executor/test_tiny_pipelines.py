"""Tiny pipelines: offline, seeded, loaded with from_pretrained, cheap; their YAML figures are true."""
from __future__ import annotations


import pytest
import torch
import yaml

from costmodel.specs import load_model
from executor.families import FAMILIES, declaration
from executor.tiny import MODELS_DIR, build_tiny_pipeline, derive_spec, load_tiny_spec, measured_figures, spec_path, tiny_ids, tiny_model_per_family, write_model_yaml

# Every tiny recipe shipped, the benchmark's heavier variants included.
RECIPES = sorted(path.stem for path in MODELS_DIR.glob("tiny-*.yaml"))


def test_every_family_has_its_tiny_models():
    assert set(tiny_model_per_family()) == set(FAMILIES)
    # Heavier variants made by derive_spec are recipes but not the families' tiny models.
    assert set(tiny_ids()) < set(RECIPES) and not any(model_id.endswith("-heavy") for model_id in tiny_ids())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_id", RECIPES)
def test_yaml_figures_match_the_built_modules(model_id):
    torch.set_num_threads(1)
    spec = load_tiny_spec(model_id)
    pipe = build_tiny_pipeline(model_id)
    measured = measured_figures(spec, pipe)
    assert spec["transformer"] == measured["transformer"]
    assert spec["text"] == measured["text"]
    assert spec["vae"] == measured["vae"]
    transformer = spec["transformer"]
    assert sum(block["count"] for block in transformer["blocks"]) >= 4
    assert transformer["num_heads"] % 4 == 0, "Ulysses 4 needs heads divisible by 4"
    assert measured["token_grid"][1] % 16 == 0, "PipeFusion up to 16 patches needs token rows divisible by 16"
    # The tiny VAE compresses as the real model's does (8x; SANA's deep-compression VAE 32x).
    real = load_model(declaration(spec["family"]).pipelines[spec["build"]["pipeline"]])
    assert spec["vae"]["spatial_factor"] == real.vae_spatial_factor and spec["dtype_bytes"] == 4
    assert next(pipe.transformer.parameters()).dtype == torch.float32


@pytest.mark.timeout(120)
def test_same_seed_same_weights_other_seed_other_weights():
    first = build_tiny_pipeline("tiny-pixart-alpha", seed=3).transformer.state_dict()
    again = build_tiny_pipeline("tiny-pixart-alpha", seed=3).transformer.state_dict()
    other = build_tiny_pipeline("tiny-pixart-alpha", seed=4).transformer.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.timeout(120)
def test_heavier_variant_gets_its_own_yaml(tmp_path):
    spec = derive_spec("tiny-pixart-alpha", "tiny-pixart-alpha-heavy",
                       transformer={"num_layers": 6, "attention_head_dim": 32, "cross_attention_dim": 128},
                       defaults={"default_height": 512, "default_width": 512})
    path = write_model_yaml(spec, tmp_path / "tiny-pixart-alpha-heavy.yaml")
    written = yaml.safe_load(path.read_text())
    assert written["transformer"]["hidden_size"] == 128
    [blocks] = written["transformer"]["blocks"]  # with the operators counted from the built module
    assert (blocks["kind"], blocks["count"]) == ("cross", 6) and blocks["kernels"] > 0 and blocks["passes"] > 0
    assert written["default_height"] == 512
    built = build_tiny_pipeline(str(path))
    assert built.transformer.config.num_layers == 6
    assert written["transformer"]["params"] == sum(p.numel() for p in built.transformer.parameters())
    assert spec_path("tiny-latte").is_file()
