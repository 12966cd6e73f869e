"""Waiting for the slowest rank: what synchronized ranks lose where their speed jitters.

Every exchange between ranks (an all-to-all, a ring hop, a stage handing a patch on, the step's
all-gather) ends when the slowest of them arrives. Where every rank computes at a steady rate (a
GPU's kernels) that costs nothing beyond the exchange. Where the ranks' speed jitters (processes
on CPU cores that other work shares), each segment of compute between two exchanges takes, in
expectation, the slowest rank's time rather than the mean one, and the gap is larger in proportion
for short segments. `ditplan profile` measures that gap as a fraction of the segment by its length
(costmodel.topology.Measured.straggle); a cluster without such a table waits nothing.

The segments are the compute between the exchanges a rank waits on, taken as equal: with `syncs`
exchanges in `compute_s` seconds, each segment is compute_s / syncs long.
"""
from __future__ import annotations

from costmodel.flops import GLU_CONV_FAMILIES
from costmodel.sim_setup import Setup


def block_syncs(st: Setup, blocks: list[tuple[int, str]]) -> int:
    """Exchanges a rank waits on in one pass over `blocks`: per attention block, two for Ulysses (the
    q/k/v all-to-alls, back to back, and the output's), r-1 ring hops, and the halo all-gather of a
    convolutional MLP under sequence parallelism; temporal blocks exchange nothing."""
    config = st.config
    per_block = 0
    if config.ulysses > 1:
        per_block += 2
    if config.ring > 1:
        per_block += config.ring - 1
    if st.model.family in GLU_CONV_FAMILIES and config.sp > 1:
        per_block += 1
    return per_block * sum(1 for _, kind in blocks if kind != "temporal")


def step_end_sync(st: Setup) -> int:
    """1 where the step ends in an all-gather of the noise prediction (over the CFG or SP ranks)."""
    return 1 if st.config.cfg > 1 or st.config.sp > 1 else 0


def straggle_seconds(st: Setup, compute_s: float, syncs: float) -> float:
    """Expected seconds the ranks wait for the slowest over `syncs` exchanges ending `compute_s`
    seconds of compute."""
    measured = st.cluster.measured
    if measured is None or not measured.straggle or syncs <= 0 or compute_s <= 0:
        return 0.0
    return compute_s * measured.straggle_fraction(st.config.world_size, compute_s / syncs)


def has_straggle(st: Setup) -> bool:
    """Whether predictions on this cluster price the wait (its breakdown then has `straggle_s`)."""
    return st.cluster.measured is not None and bool(st.cluster.measured.straggle)
