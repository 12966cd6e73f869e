"""A PipeFusion stage loads from a saved pipeline folder without materialising the other stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from executor.pipefusion.loading import load_stage_transformer
from executor.pipefusion.partition import parameter_count
from executor.tiny import tiny_model_per_family

MODELS = {model_id: family for family, model_id in tiny_model_per_family().items()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_id", list(MODELS))
def test_stage_holds_exactly_its_tensors_from_the_checkpoint(model_id: str, tmp_path: Path) -> None:
    import diffusers

    from executor.tiny import save_tiny_pipeline

    save_tiny_pipeline(model_id, tmp_path)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    full = getattr(diffusers, config["_class_name"]).from_pretrained(tmp_path / "transformer")
    full_tensors = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    kept = 0
    for stage in range(2):
        model = load_stage_transformer(tmp_path, MODELS[model_id], stage, 2)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        assert tensors and all(not t.is_meta for t in tensors.values())
        for owner, module in model.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor):  # a table kept outside the state dict (Qwen-Image's rotary frequencies)
                    assert torch.equal(value, vars(full.get_submodule(owner))[name]), f"{owner}.{name}"
        for name, tensor in tensors.items():
            assert torch.equal(tensor, full_tensors[name]), name
        assert parameter_count(model) < parameter_count(full)
        kept += parameter_count(model)
    # Together the two stages hold every parameter once, plus the conditioning both keep.
    assert kept >= parameter_count(full)


@pytest.mark.timeout(120)
def test_a_stage_of_a_two_expert_pipeline_loads_its_blocks_of_each_expert(tmp_path: Path, monkeypatch) -> None:
    import diffusers

    from executor.pipefusion.loading import load_stage_experts
    from executor.tiny import save_tiny_pipeline
    from executor.worker import load_pipeline

    save_tiny_pipeline("tiny-wan2.2", tmp_path)
    for stage in range(2):
        loaded = load_stage_experts(tmp_path, "wan", stage, 2)
        assert set(loaded) == {"transformer", "transformer_2"}
        monkeypatch.setenv("RANK", str(stage))  # a worker of `ditplan run` loads the same stages
        pipe = load_pipeline(str(tmp_path), "pipefusion=2,patches=2,warmup=1")
        for name, model in loaded.items():
            assert parameter_count(getattr(pipe, name)) == parameter_count(model), name
        for name, model in loaded.items():
            full = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / name)
            full_tensors = dict(full.named_parameters())
            assert parameter_count(model) < parameter_count(full)
            for key, tensor in model.named_parameters():
                assert torch.equal(tensor, full_tensors[key]), f"{name}: {key}"
            assert ("blocks.0.attn1.to_q.weight" in full_tensors) and (
                ("blocks.0.attn1.to_q.weight" in dict(model.named_parameters())) == (stage == 0))
    first, second = (diffusers.WanTransformer3DModel.from_pretrained(tmp_path / name) for name in ("transformer", "transformer_2"))
    assert not torch.equal(first.blocks[0].attn1.to_q.weight, second.blocks[0].attn1.to_q.weight)
