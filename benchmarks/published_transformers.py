"""The real catalogue models' transformers, built from their published diffusers configs.

The configs are the fields that shape each transformer, copied into tests/fixtures/published/ (see
its README). `build` makes the module (on the meta device for counting, or materialised with random
weights for timing), `inputs` the arguments the pipeline passes it for one step and `counted` its
operators per block. The meta-device conformance test and benchmarks/gpu_check.py both use them;
`python benchmarks/published_transformers.py` prints the counts the catalogue profiles carry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from costmodel.specs import load_model
from costmodel.profiler.module_count import count_block_operations, forward_inputs

PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "published"

# Two generations per model, (height, width, frames): the first is the one gpu_check times.
SIZES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "cogvideox-2b": ((480, 720, 49), (480, 720, 25)),
    "cogvideox-5b": ((480, 720, 49), (480, 720, 25)),
    "cogvideox1.5-5b": ((768, 1360, 81), (480, 720, 49)),
    "consisid": ((480, 720, 49), (480, 720, 25)),  # learned position embeddings fix the resolution
    # Video at reduced sizes keeps the meta-device run short; the counts scale the same way.
    "wan2.1-t2v-1.3b": ((480, 832, 33), (320, 512, 33)),
    "wan2.1-t2v-14b": ((480, 832, 33), (480, 832, 17)),
    "wan2.2-t2v-a14b": ((480, 832, 33), (320, 512, 33)),
    "hunyuan-video": ((320, 512, 33), (320, 512, 61)),
    # Latte's temporal position embedding is fixed at its 16 training frames: two resolutions instead.
    "latte": ((512, 512, 16), (256, 384, 16)),
}
IMAGE_SIZES = ((1024, 1024, 1), (512, 768, 1))


def two_sizes(model_id: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return SIZES.get(model_id, IMAGE_SIZES)


def published_config(model_id: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, constructor keywords) of the model's transformer."""
    config = json.loads((PUBLISHED_DIR / model_id / "transformer" / "config.json").read_text())
    return config.pop("_class_name"), config


def published_models() -> list[str]:
    return sorted(path.name for path in PUBLISHED_DIR.iterdir() if path.is_dir())


def build(model_id: str) -> Any:
    """The transformer module, built under whatever `torch.device(...)` context is active."""
    import diffusers

    class_name, config = published_config(model_id)
    return getattr(diffusers, class_name)(**config)


def inputs(model_id: str, batch: int, height: int, width: int, frames: int,
           tensor: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The forward arguments of the model's transformer for one step (see costmodel.profiler.module_count)."""
    return forward_inputs(load_model(model_id), published_config(model_id)[1], batch, height, width, frames, tensor)


def counted(model_id: str, height: int, width: int, frames: int) -> dict[str, tuple[float, float]]:
    """Per block kind, (kernels, passes) of the model's transformer at that size (see costmodel.profiler.module_count)."""
    import torch

    with torch.device("meta"):
        module = build(model_id).eval()
    return count_block_operations(module, load_model(model_id), height, width, frames)


if __name__ == "__main__":
    # The counted figures of every real catalogue model, as its profile's block entries carry them.
    for model_id in published_models():
        height, width, frames = two_sizes(model_id)[0]
        for kind, (kernels, passes) in counted(model_id, height, width, frames).items():
            print(f"{model_id}: {{kind: {kind}, kernels: {kernels:.1f}, passes: {passes:.1f}}}", flush=True)
