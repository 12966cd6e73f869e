"""Each PipeFusion stage keeps only its own blocks (plus the embedding on the first stage and the
output head on the last); everything else is released so its memory returns."""
from __future__ import annotations

from torch import nn

from executor.pipefusion.stages import StagedTransformer


def keep_stage_only(stages: StagedTransformer, units: range, first: bool, last: bool) -> None:
    """Drop, in place, every block outside `units` and the embedding / head this stage does not run.

    The conditioning modules (timestep, pooled-text and caption embeddings) stay on every stage: each
    stage computes its own conditioning, and they are a few percent of the parameters.
    """
    transformer = stages.transformer
    for unit in range(stages.unit_count()):
        if unit not in units:
            for blocks, position in stages.unit_modules(unit):
                blocks[position] = nn.Identity()  # keeps the indices of the kept blocks unchanged
    dropped = ([] if first else list(stages.first_stage_attrs)) + ([] if last else list(stages.last_stage_attrs))
    for name in dropped:
        setattr(transformer, name, None)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
