"""`ditplan models import`: profiles from published diffusers folders agree with the catalogue's entries."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from costmodel.errors import DitplanError  # noqa: E402
from costmodel.specs import load_model  # noqa: E402
from planner.model_import import IMPORTERS, import_model, write_yaml  # noqa: E402

PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "published"
# Catalogue entries of the families the importer reads (PixArt, HunyuanDiT and Latte have no reader).
IMPORTABLE = sorted(path.name for path in PUBLISHED_DIR.iterdir() if path.is_dir()
                    and json.loads((path / "transformer" / "config.json").read_text())["_class_name"] in IMPORTERS)
STRUCTURE = ("family", "hidden_size", "num_heads", "head_dim", "patch_size", "temporal_patch_size", "in_channels",
             "attention", "experts", "expert_boundary_ratio", "face_attention")


def test_every_new_family_is_importable() -> None:
    assert {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "hunyuan-video", "qwen-image", "sana-1600m",
            "sd3.5-large", "cogvideox1.5-5b", "consisid"} <= set(IMPORTABLE)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_id", IMPORTABLE)
def test_import_reproduces_the_catalogue_entry(model_id: str, tmp_path: Path) -> None:
    out = tmp_path / f"{model_id}.yaml"
    write_yaml(import_model(PUBLISHED_DIR / model_id, model_id), out)
    imported, catalogue = load_model(str(out)), load_model(model_id)
    for field in STRUCTURE:
        assert getattr(imported, field) == getattr(catalogue, field), f"{model_id}.{field}"
    # Operators per block: the import counts them at the model's default size, the catalogue at the
    # conformance test's first size; per row they do not depend on the size.
    assert [(g.kind, g.count) for g in imported.blocks] == [(g.kind, g.count) for g in catalogue.blocks]
    for mine, theirs in zip(imported.blocks, catalogue.blocks):
        assert mine.kernels == pytest.approx(theirs.kernels, abs=0.1), f"{model_id} {mine.kind}: kernels"
        assert mine.passes == pytest.approx(theirs.passes, rel=0.02), f"{model_id} {mine.kind}: passes"
    assert imported.mlp_ratio == pytest.approx(catalogue.mlp_ratio, rel=1e-3)
    assert imported.params == pytest.approx(catalogue.params, rel=0.01)
    if catalogue.text_joins_attention is False:
        assert imported.cross_attention_dim == catalogue.cross_attention_dim


def test_unknown_family_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    known = "UNet2DConditionModel.*WanTransformer3DModel \\(wan\\).*SanaTransformer2DModel"
    with pytest.raises(DitplanError, match=known):
        import_model(config)


@pytest.mark.timeout(120)
def test_cli_writes_a_profile_that_simulate_takes(tmp_path: Path) -> None:
    out = tmp_path / "wan.yaml"
    done = subprocess.run([sys.executable, "-m", "planner", "models", "import", str(PUBLISHED_DIR / "wan2.1-t2v-1.3b"),
                           "--out", str(out)], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    assert "per cross block" in done.stdout
    done = subprocess.run([sys.executable, "-m", "planner", "simulate", "--model", str(out), "--cluster",
                           "h100-sxm-nvlink-8", "--config", "ulysses=2", "--format", "json"],
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["feasible"]
