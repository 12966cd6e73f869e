"""Loading one PipeFusion stage of a transformer from a diffusers folder without the rest.

The transformer is built on the meta device (no memory), cut to this stage's blocks and
embedding/head, then only the kept modules get real storage and only their tensors are read from
the safetensors files. Buffers that are not saved (sin-cos position tables) are computed by the
model's own constructor: a one-block model of the same config is built on CPU and its buffers are
copied (they depend on the config, not on the block count).

The executor can hand the result to the pipeline loader:
`DiffusionPipeline.from_pretrained(folder, transformer=load_stage_transformer(folder, family, s, p))`.
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
    if missing_buffers:
        from executor.families import declaration

        # The cheapest model with the same buffers: one block of each kind.
        small = cls.from_config({**config, **declaration(family).one_block_config})
        for name in missing_buffers:
            # Buffers inside a block are the same in every block: take block 0's.
            source = re.sub(rf"^({'|'.join(_BLOCK_LISTS)})\.\d+\.", r"\1.0.", name)
            owner, _, leaf = name.rpartition(".")
            target = model.get_submodule(owner) if owner else model
            target._buffers[leaf] = small.get_buffer(source).clone()

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
    if leftover:
        raise RuntimeError(f"stage loading left tensors unmaterialised: {leftover[:5]}")
    return model.eval()
