"""The simulator: predicted latency, memory and timeline of one configuration on one cluster.

Its parts, one file each: the set-up every prediction shares (`costmodel.sim_setup`), one block on
one rank with Ulysses/Ring/USP (`costmodel.block_cost`), the PipeFusion event simulation and its
closed form (`costmodel.pipefusion_sim`), memory (`costmodel.memory`) and the timeline
(`costmodel.trace`). CFG: each half of the guidance batch on its own ranks, one all-gather of the
noise prediction per step. DP: replicas on other prompts; no communication, but their groups share
links with ours. On a profiled machine whose ranks' speed jitters, each exchange also waits for the
slowest rank (`costmodel.straggle`; `straggle_s` in the breakdown). `latency_s` is the denoising
loop; `end_to_end_s` adds text encoding, the VAE decode and the transfers between them
(`costmodel.pipeline_stages`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from costmodel.block_cost import sequence_cost, step_extras
from costmodel.flops import Flops, step_flops
from costmodel.memory import memory_gib
from costmodel.pipefusion_sim import estimate_pipeline, simulate_pipeline
from costmodel.pipeline_stages import memory_note, price_stages
from costmodel.sim_setup import Setup, build_setup, text_split
from costmodel.straggle import block_syncs, has_straggle, step_end_sync, straggle_seconds
from costmodel.trace import name_tracks, trace_steps


@dataclass
class SimResult:
    model: str
    cluster: str
    gpus: int
    config: str
    placement: list[str]
    height: int
    width: int
    frames: int
    steps: int
    latency_s: float
    per_step_s: float
    memory_gib: float
    memory_capacity_gib: float
    feasible: bool
    reason: str
    breakdown: dict[str, float]
    comm_by_tier: dict[str, float]
    memory: dict[str, float]
    text_encode_s: float
    vae_decode_s: float
    flops: Flops = field(default_factory=Flops)  # one step of the whole transformer, whole batch
    trace: list[dict[str, Any]] | None = None
    end_to_end_s: float = 0.0  # text encoding + loop + VAE decode + the transfers between them
    stages: dict[str, float] = field(default_factory=dict)  # pipeline_stages.StagePrices.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `ditplan simulate`."""
        return {
            "model": self.model, "cluster": self.cluster, "gpus": self.gpus, "config": self.config,
            "placement": list(self.placement), "height": self.height, "width": self.width, "frames": self.frames,
            "steps": self.steps, "latency_s": self.latency_s, "per_step_s": self.per_step_s,
            "memory_gib": self.memory_gib, "memory_capacity_gib": self.memory_capacity_gib,
            "feasible": self.feasible, "reason": self.reason,
            "breakdown": {**self.breakdown, **{f"{key}_per_step": value for key, value in self.flops.as_dict().items()}},
            "flops_per_step": self.flops.total, "end_to_end_s": self.end_to_end_s,
            "comm_by_tier": dict(self.comm_by_tier), "memory": dict(self.memory),
            "text_encode_s": self.text_encode_s, "vae_decode_s": self.vae_decode_s, "stages": dict(self.stages),
        }


def _non_pipeline(st: Setup, trace: list | None) -> dict[str, Any]:
    blocks = list(enumerate(st.model.block_sequence))
    split = text_split(st)
    cost = sequence_cost(st, blocks, st.tokens // st.config.sp, st.text // st.config.sp if split else st.text, split)
    host, extra_comm, extra_tiers = step_extras(st)
    step_compute = cost.compute + host
    step_comm = cost.comm + extra_comm
    straggle = straggle_seconds(st, step_compute, block_syncs(st, blocks) + step_end_sync(st))
    per_step = step_compute + step_comm + straggle
    tiers = {tier: seconds * st.steps for tier, seconds in cost.tiers.items()}
    for tier, seconds in extra_tiers.items():
        tiers[tier] = tiers.get(tier, 0.0) + seconds * st.steps
    if trace is not None:
        trace_steps(trace, st.config.world_size, st.steps, step_compute, step_comm, straggle)
    breakdown = {"compute_s": step_compute * st.steps, "communication_s": step_comm * st.steps}
    if has_straggle(st):
        breakdown["straggle_s"] = straggle * st.steps
    return {
        "latency": per_step * st.steps,
        "breakdown": breakdown,
        "per_step": per_step, "tiers": tiers, "stages": None,
    }


def _result(st: Setup, core: dict[str, Any], trace: list | None) -> SimResult:
    memory = memory_gib(st, core["stages"])
    stages = price_stages(st.model, st.cluster, st.config, st.placement, st.height, st.width, st.frames)
    # The decode runs after the loop: its activations add only what exceeds the loop's.
    memory["decode_extra_gib"] = max(0.0, stages.decode_activations_gib - memory["activations_gib"] - memory["kv_buffers_gib"])
    total = sum(memory.values())
    capacity = st.cluster.hardware.memory_gib
    feasible = total <= capacity
    reason = ""
    if not feasible:
        parts = ", ".join(f"{key[:-4].replace('_', ' ')} {value:.1f}" for key, value in memory.items())
        reason = (f"needs {total:.1f} GiB per GPU ({parts}) but a {st.cluster.hardware.name} has {capacity:.1f} GiB"
                  + memory_note(memory, capacity))
    return SimResult(
        model=st.model.id, cluster=st.cluster.id, gpus=st.cluster.gpus, config=str(st.config),
        placement=list(st.placement.order), height=st.height, width=st.width, frames=st.frames, steps=st.steps,
        latency_s=core["latency"], per_step_s=core["per_step"], memory_gib=total, memory_capacity_gib=capacity,
        feasible=feasible, reason=reason, breakdown=core["breakdown"], comm_by_tier=core["tiers"], memory=memory,
        text_encode_s=stages.text_encode_s, vae_decode_s=stages.vae_decode_s,
        flops=step_flops(st.model, st.height, st.width, st.frames), trace=trace,
        end_to_end_s=stages.end_to_end_s(core["latency"]), stages=stages.to_dict(),
    )


def simulate(model: Any, cluster: Any, config: Any, height: int | None = None, width: int | None = None,
             frames: int | None = None, steps: int | None = None, placement: Any = None,
             trace: bool = False) -> SimResult:
    """Predict one configuration; a configuration that breaks a rule raises DitplanError naming each rule."""
    st = build_setup(model, cluster, config, height, width, frames, steps, placement)
    events: list | None = [] if trace else None
    if st.config.pipelines:
        core = simulate_pipeline(st, events)
    else:
        core = _non_pipeline(st, events)
    if events is not None:
        name_tracks(events, st.config.world_size)
    return _result(st, core, events)


def estimate(model: Any, cluster: Any, config: Any, height: int | None = None, width: int | None = None,
             frames: int | None = None, steps: int | None = None, placement: Any = None,
             trace: bool = False) -> SimResult:
    """Closed form of `simulate`: PipeFusion as fill + steady state instead of an event simulation.

    Cheap for any GPU count; within a few percent of `simulate` where the pipeline is balanced.
    """
    st = build_setup(model, cluster, config, height, width, frames, steps, placement)
    core = estimate_pipeline(st) if st.config.pipelines else _non_pipeline(st, None)
    return _result(st, core, None)
