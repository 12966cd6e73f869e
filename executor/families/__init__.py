"""The DiT families the executor runs: one module each, listed once in `MODULES`.

Each module (`executor/families/<module>.py`) ends with `FAMILY = Family(...)` (see
`executor.families.base.Family`); everything here is derived from those declarations:
`DECLARATIONS` (family name -> declaration), `FAMILIES` (the names), `declaration(name)` and
`pipeline_declaration(class name)` (which refuse, by name, what the executor does not run),
`adapter_for(pipe)`, `family_of_pipeline_class(name)` and `model_id_of_pipeline(pipe)`.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from costmodel.errors import DitplanError
from executor.families.base import (
    BRANCHES,
    BlockDescription,
    DenoiseJob,
    Family,
    FamilyAdapter,
    GenerationRequest,
    TinyTransformer,
)

# The one list of family modules; adding a family adds its module's name here.
MODULES: tuple[str, ...] = ("pixart", "sd3", "flux", "hunyuan", "cogvideox", "latte", "wan", "qwen_image", "hunyuan_video",
                            "sana")

DECLARATIONS: dict[str, Family] = {
    family.name: family for family in (import_module(f"{__name__}.{module}").FAMILY for module in MODULES)
}
FAMILIES: tuple[str, ...] = tuple(DECLARATIONS)

# diffusers pipeline class name -> the family that runs it.
_BY_PIPELINE: dict[str, Family] = {
    pipeline: family for family in DECLARATIONS.values() for pipeline in family.pipelines
}


def executor_families_text() -> str:
    """The families the executor runs, for messages."""
    return ", ".join(FAMILIES)


def declaration(name: str, subject: str | None = None) -> Family:
    """The declaration of family `name`; refuses a family the executor does not run, naming it and
    the families it runs (`subject`, e.g. "--model X", says whose family it is)."""
    family = DECLARATIONS.get(name)
    if family is None:
        whose = f"{subject} is of family {name!r}" if subject else f"family {name!r}"
        raise DitplanError(
            f"{whose}, which the executor does not run; it runs {executor_families_text()} "
            "(ditplan simulate and search still plan for it)."
        )
    return family


def pipeline_declaration(pipeline_class: str, subject: str | None = None) -> Family:
    """The family that runs diffusers pipeline class `pipeline_class`; refuses another class by name."""
    family = _BY_PIPELINE.get(pipeline_class)
    if family is None:
        whose = f"{subject}: pipeline {pipeline_class}" if subject else f"pipeline {pipeline_class}"
        raise DitplanError(
            f"{whose} is not one the executor runs; it runs {', '.join(sorted(_BY_PIPELINE))} "
            f"(families {executor_families_text()})."
        )
    return family


def family_of_pipeline_class(name: str) -> str | None:
    """The family of a diffusers pipeline class name (a folder's model_index.json names it), or None."""
    family = _BY_PIPELINE.get(name)
    return family.name if family is not None else None


def adapter_for(pipe: Any) -> FamilyAdapter:
    """The adapter for a loaded diffusers pipeline; refuses pipelines of other families by name."""
    return pipeline_declaration(type(pipe).__name__).adapter(pipe)


def model_id_of_pipeline(pipe: Any) -> str | None:
    """The ditplan model id of a loaded pipeline's usual checkpoint (None for another pipeline class)."""
    family = _BY_PIPELINE.get(type(pipe).__name__)
    return family.model_id_of(pipe) if family is not None else None


__all__ = ["BRANCHES", "BlockDescription", "DECLARATIONS", "DenoiseJob", "FAMILIES", "Family", "FamilyAdapter",
           "GenerationRequest", "MODULES", "TinyTransformer", "adapter_for", "declaration", "executor_families_text",
           "family_of_pipeline_class", "model_id_of_pipeline", "pipeline_declaration"]
