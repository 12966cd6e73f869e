"""Family adapters: one per DiT family, chosen from the loaded pipeline's class.

`adapter_for(pipe)` returns the adapter; `FAMILIES` lists the family names (the cost model's
`family:` values).
"""
from __future__ import annotations

from typing import Any

from costmodel.errors import DitplanError
from executor.families.base import BRANCHES, DenoiseJob, FamilyAdapter, GenerationRequest
from executor.families.cogvideox import CogVideoXAdapter
from executor.families.flux import FluxAdapter
from executor.families.hunyuan import HunyuanAdapter
from executor.families.latte import LatteAdapter
from executor.families.pixart import PixArtAdapter
from executor.families.sd3 import SD3Adapter
from executor.families.wan import WanAdapter

# diffusers pipeline class name -> adapter.
_BY_PIPELINE: dict[str, type[FamilyAdapter]] = {
    "PixArtAlphaPipeline": PixArtAdapter,
    "PixArtSigmaPipeline": PixArtAdapter,
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
    "HunyuanDiTPipeline": HunyuanAdapter,
    "CogVideoXPipeline": CogVideoXAdapter,
    "LattePipeline": LatteAdapter,
    "WanPipeline": WanAdapter,
}
FAMILIES: tuple[str, ...] = ("pixart", "sd3", "flux", "hunyuan", "cogvideox", "latte", "wan")


def family_of_pipeline_class(name: str) -> str | None:
    """The family of a diffusers pipeline class name (a folder's model_index.json names it), or None."""
    adapter = _BY_PIPELINE.get(name)
    return adapter.family if adapter is not None else None


def adapter_for(pipe: Any) -> FamilyAdapter:
    """The adapter for a loaded diffusers pipeline; refuses pipelines of other families by name."""
    name = type(pipe).__name__
    adapter = _BY_PIPELINE.get(name)
    if adapter is None:
        raise DitplanError(
            f"pipeline {name} is not supported; the executor runs {', '.join(sorted(_BY_PIPELINE))}."
        )
    return adapter(pipe)


__all__ = ["BRANCHES", "DenoiseJob", "FAMILIES", "FamilyAdapter", "GenerationRequest", "adapter_for", "family_of_pipeline_class"]
