"""What every prediction of one configuration starts from: the model, cluster, configuration and
placement resolved and checked, the token counts, and the rank groups of each parallel method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.rules import ensure_valid_config
from costmodel.specs import ModelSpec, load_model
from costmodel.topology import Cluster, load_cluster

# Families whose joint text the executor splits over the SP ranks (executor/families/flux.py) when
# the text token count divides by sp and there is no PipeFusion; the others keep it whole per rank.
TEXT_SPLIT_FAMILIES = ("flux",)


@dataclass
class Setup:
    """One configuration of one generation on one cluster, resolved."""

    model: ModelSpec
    cluster: Cluster
    config: ParallelConfig
    placement: Placement
    height: int
    width: int
    frames: int
    steps: int
    tokens: int  # image tokens per sample
    text: int  # text tokens that join the attention (0 for cross-attended text)
    batch: int  # samples per rank (the CFG halves a rank carries)
    frames_tokens: int
    groups: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)


def build_setup(model: Any, cluster: Any, config: Any, height: int | None, width: int | None, frames: int | None,
           steps: int | None, placement: Any) -> Setup:
    model = load_model(model)
    config = config if isinstance(config, ParallelConfig) else ParallelConfig.parse(str(config))
    if not isinstance(cluster, Cluster):
        cluster = load_cluster(str(cluster), gpus=config.world_size)
    height = model.default_height if height is None else height
    width = model.default_width if width is None else width
    frames = model.default_frames if frames is None else frames
    steps = model.default_steps if steps is None else steps
    ensure_valid_config(config, model, height, width, frames, steps, cluster.gpus)
    if placement is None:
        placement = Placement(config)
    elif not isinstance(placement, Placement):
        placement = Placement.parse(config, placement)
    elif placement.config != config:
        raise DitplanError(f"placement was built for configuration {placement.config}, not {config}.")
    total_batch = 2 if model.uses_cfg else 1
    setup = Setup(
        model=model, cluster=cluster, config=config, placement=placement, height=height, width=width,
        frames=frames, steps=steps, tokens=model.image_tokens(height, width, frames),
        text=model.text_tokens if model.text_joins_attention else 0,
        batch=max(1, total_batch // config.cfg), frames_tokens=model.token_grid(height, width, frames)[0],
    )
    for name, axes in (("ulysses", ("ulysses",)), ("ring", ("ring",)), ("sp", ("ulysses", "ring")),
                       ("cfg", ("cfg",)), ("pipefusion", ("pipefusion",))):
        setup.groups[name] = placement.groups_of(axes)
    return setup


def text_split(st: Setup) -> bool:
    """Whether the executor splits the joint text over the SP ranks in this configuration."""
    config = st.config
    return (st.model.family in TEXT_SPLIT_FAMILIES and st.text > 0 and config.sp > 1 and st.text % config.sp == 0
            and not config.pipelines)




def latent_bytes(st: Setup, image_tokens: int) -> float:
    """Bytes of the latent (noise prediction) that `image_tokens` tokens cover, per rank's batch."""
    m = st.model
    return st.batch * image_tokens * m.patch_size**2 * m.temporal_patch_size * m.vae_latent_channels * m.dtype_bytes
