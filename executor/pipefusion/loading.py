"""Loading one PipeFusion stage of a transformer from a diffusers folder without the rest.

The transformer is built on the meta device (no memory), cut to this stage's blocks and
embedding/head, then only the kept modules get real storage and only their tensors are read from
the safetensors files. Buffers that are not saved (sin-cos position tables) are computed by the
model's own constructor: a one-block model of the same config is built on CPU and its buffers are
copied (they depend on the config, not on the block count).

The executor can hand the result to the pipeline loader:
`DiffusionPipeline.from_pretrained(folder, **load_stage_experts(folder, family, s, p))`, which
loads the stage of every transformer the folder holds (Wan 2.2 A14B's two experts: `transformer`
and `transformer_2`, cut alike).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from costmodel.errors import DitplanError

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks", "blocks")


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            names.append(f"{module_name}.{buffer}" if module_name else buffer)
    return names


def _tensor_attributes_on_meta(model: nn.Module) -> list[tuple[str, str]]:
    """(module, attribute) of plain tensor attributes left on the meta device: tables a module keeps
    outside its parameters and buffers (Qwen-Image's rotary frequencies)."""
    return [(module_name, attr) for module_name, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Tensor) and value.is_meta]


def _in_block_zero(name: str) -> str:
    """The same name in block 0 of its block list (what a block holds apart from weights is the same in every block)."""
    return re.sub(rf"^({'|'.join(_BLOCK_LISTS)})\.\d+(\.|$)", r"\1.0\2", name)


def load_stage_transformer(folder: str | Path, family: str, stage: int, stages: int, subfolder: str = "transformer") -> nn.Module:
    """The transformer of the pipeline saved in `folder`, holding only PipeFusion stage `stage` of `stages`."""
    import diffusers
    from safetensors import safe_open

    from executor.pipefusion import prepare_stage

    path = Path(folder) / subfolder
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DitplanError(f"PipeFusion: {config_file} does not exist; expected a diffusers pipeline folder with a transformer.")
    config = json.loads(config_file.read_text())
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
    prepare_stage(model, family, stage, stages)
    model.to_empty(device="cpu")

    missing_buffers = _non_persistent_buffers(model)
    missing_tables = _tensor_attributes_on_meta(model)
    if missing_buffers or missing_tables:
        from executor.families import declaration

        # The cheapest model with the same buffers: one block of each kind.
        small = cls.from_config({**config, **declaration(family).one_block_config})
        for name in missing_buffers:
            owner, _, leaf = name.rpartition(".")
            target = model.get_submodule(owner) if owner else model
            target._buffers[leaf] = small.get_buffer(_in_block_zero(name)).clone()
        for owner, leaf in missing_tables:
            setattr(model.get_submodule(owner), leaf, getattr(small.get_submodule(_in_block_zero(owner)), leaf).clone())

    wanted = set(model.state_dict().keys())
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DitplanError(f"PipeFusion: no .safetensors file in {path}; stage loading reads safetensors checkpoints only.")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted:
                    tensors[key] = handle.get_tensor(key)
    absent = sorted(wanted - tensors.keys())
    if absent:
        raise DitplanError(f"PipeFusion: the checkpoint in {path} lacks {len(absent)} tensors this stage needs, e.g. {absent[:3]}.")
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    leftover += [f"{owner}.{leaf}" for owner, leaf in _tensor_attributes_on_meta(model)]
    if leftover:
        raise RuntimeError(f"stage loading left tensors unmaterialised: {leftover[:5]}")
    return model.eval()


# The pipeline components that hold a transformer (Wan 2.2 A14B's low-noise expert is the second).
EXPERT_COMPONENTS = ("transformer", "transformer_2")


def load_stage_experts(folder: str | Path, family: str, stage: int, stages: int) -> dict[str, nn.Module]:
    """Stage `stage` of `stages` of every transformer the pipeline saved in `folder` holds, by
    component name (`from_pretrained` overrides): those its model_index.json names."""
    index_file = Path(folder) / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    names = [name for name in EXPERT_COMPONENTS if (index.get(name) or [None])[0] is not None] or ["transformer"]
    return {name: load_stage_transformer(folder, family, stage, stages, subfolder=name) for name in names}
