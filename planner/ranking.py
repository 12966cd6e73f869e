"""Plan search: enumerate the hybrid space, prune with reasons, rank by predicted latency, explain.

`search(model, cluster, gpus, ...)` is the entry point (re-exported as `planner.search`). For each
GPU count it walks the space of planner/space.py, drops every configuration that breaks a rule of
`costmodel.check_config` or does not fit in memory (each with its reason), scores every distinct
rank placement of the rest and ranks them: latency, then fewer GPUs, then memory per GPU, then
simplicity.

Scoring: where the space is small every candidate goes through the full simulator. Where it is
large (hundreds of GPUs) the cost model's closed-form `estimate` pre-screens every candidate, and
the best `rescore` of them plus the best of every pure method are re-scored by the full simulator.
Each plan says which model scored it (`scored_by`); simulator-scored plans rank first, so the best
plan is always a simulator figure.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import costmodel
from costmodel.config import AXES, ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.pipeline_stages import choose_vae
from costmodel.memory import RUNTIME_OVERHEAD_GIB
from costmodel.rules import check_generation
from planner.explain import Comparison, compare, describe_plan, warmup_note
from planner.plan import Plan
from planner.space import (
    DEFAULT_MIN_WARMUP,
    Hierarchy,
    distinct_placements,
    enumerate_configs,
    parse_gpu_counts,
    pure_axis,
    simplicity,
)

# Up to this many (configuration, placement) candidates per GPU count the full simulator scores all
# of them: an 8-GPU space is ~500 (~0.3 s here), 16 GPUs ~2000 (~1.3 s); larger spaces pre-screen.
EXHAUSTIVE_LIMIT = 2500
# How many of the estimate's best the full simulator re-scores in a large space.
DEFAULT_RESCORE = 32
# Show a progress bar only for searches with at least this many candidates (and only on a terminal).
PROGRESS_MIN_CANDIDATES = 2000  # ~1 s of scoring and more
PURE_AXES: tuple[str, ...] = ("ulysses", "ring", "pipefusion", "cfg")


@dataclass(frozen=True)
class RankedPlan:
    """One scored (configuration, placement) on `gpus` GPUs."""

    gpus: int
    config: ParallelConfig
    placement: Placement
    latency_s: float
    memory_gib: float
    breakdown: dict[str, float] = field(default_factory=dict)
    per_step_s: float | None = None
    comm_by_tier: dict[str, float] = field(default_factory=dict)
    scored_by: str = "simulator"
    end_to_end_s: float | None = None  # text encoding + loop + VAE decode + transfers (None: not priced)

    @property
    def ranked_s(self) -> float:
        """What the ranking orders by: the whole generation where priced, else the loop."""
        return self.latency_s if self.end_to_end_s is None else self.end_to_end_s

    @property
    def images(self) -> int:
        """Images one run produces: one per data-parallel replica."""
        return self.config.dp

    @property
    def gpu_seconds_per_image(self) -> float:
        return self.latency_s * self.gpus / self.images

    @property
    def fidelity(self) -> str:
        """`exact` without stale K/V, else how many warmup steps precede the patch pipeline."""
        if not self.config.uses_patches:
            return "exact"
        return f"stale-kv(warmup={self.config.warmup})"

    def sort_key(self) -> tuple:
        return (self.scored_by != "simulator", self.ranked_s, self.latency_s, self.gpus, self.memory_gib,
                simplicity(self.config, self.placement))

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus,
            "config": str(self.config),
            "placement": list(self.placement.order),
            "latency_s": self.latency_s,
            "end_to_end_s": self.end_to_end_s,
            "memory_gib": self.memory_gib,
            "per_step_s": self.per_step_s,
            "breakdown": dict(self.breakdown),
            "comm_by_tier": dict(self.comm_by_tier),
            "gpu_seconds_per_image": self.gpu_seconds_per_image,
            "fidelity": self.fidelity,
            "scored_by": self.scored_by,
        }


@dataclass(frozen=True)
class PrunedConfig:
    """A configuration left out of the ranking, with the rules or the memory figures that exclude it."""

    gpus: int
    config: str
    reasons: tuple[str, ...]  # every broken rule, or the out-of-memory figures

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "config": self.config, "reason": self.reason, "rules": list(self.reasons)}


@dataclass
class SearchResult:
    """Everything a search found. `plans` is best first; `pruned` holds every excluded configuration.

    Useful members for notebooks: `.best`, `.best_per_count`, `.explanation()`, `.to_frame()`
    (pandas), `.to_dict()` (the JSON of `ditplan search`), `.to_plan()` (a plan file's content).
    """

    model: str
    height: int
    width: int
    frames: int
    steps: int
    cluster: str
    nodes: int | None
    gpu_counts: list[int]
    plans: list[RankedPlan]
    pruned: list[PrunedConfig]
    baseline_latency_s: float
    baseline_feasible: bool

    @property
    def best(self) -> RankedPlan:
        """The winner; a DitplanError says why when no configuration survived."""
        if not self.plans:
            raise DitplanError(self.no_plan_reason())
        return self.plans[0]

    @property
    def best_per_count(self) -> dict[int, RankedPlan]:
        """The best plan for each GPU count that has one (counts with none are absent)."""
        best: dict[int, RankedPlan] = {}
        for plan in self.plans:
            best.setdefault(plan.gpus, plan)
        return dict(sorted(best.items()))

    def speedup(self, plan: RankedPlan) -> float:
        """Latency of one image on one GPU over this plan's latency."""
        return self.baseline_latency_s / plan.latency_s

    def efficiency(self, plan: RankedPlan) -> float:
        """One GPU's GPU-seconds per image over this plan's (= speedup / GPUs without data parallelism)."""
        return self.baseline_latency_s / plan.gpu_seconds_per_image

    def runner_up(self) -> RankedPlan | None:
        """The best plan with another configuration (other placements of the winner are not rivals)."""
        winner = self.best
        return next((p for p in self.plans[1:] if (p.gpus, p.config) != (winner.gpus, winner.config)), None)

    def best_pure(self) -> RankedPlan | None:
        """The fastest plan that uses a single method (Ulysses, Ring, PipeFusion or CFG alone), other than the winner."""
        winner = self.best
        for plan in self.plans:
            if plan is not winner and pure_axis(plan.config) in PURE_AXES and plan.scored_by == "simulator":
                if pure_axis(winner.config) is None or pure_axis(plan.config) != pure_axis(winner.config):
                    return plan
        return None

    def comparisons(self) -> list[Comparison]:
        winner = self.best
        found: list[Comparison] = []
        runner_up = self.runner_up()
        if runner_up is not None:
            found.append(compare("runner-up", winner, runner_up))
        pure = self.best_pure()
        if pure is not None and pure is runner_up:
            found[0] = compare(f"runner-up (also the best pure {pure_axis(pure.config)})", winner, pure)
        elif pure is not None:
            found.append(compare(f"best pure {pure_axis(pure.config)}", winner, pure))
        return found

    def explanation(self) -> list[str]:
        """One line per differing term, winner vs runner-up and vs the best pure method."""
        lines = [f"winner {describe_plan(self.best)}: {self.best.latency_s:.3f} s"]
        for comparison in self.comparisons():
            lines.extend(comparison.lines())
        note = warmup_note(self.best, self.steps, self._more_warmup(self.best))
        if note:
            lines.append(note)
        return lines

    def _more_warmup(self, plan: RankedPlan) -> RankedPlan | None:
        """The same plan with one more warmup step, where the search scored it."""
        for other in self.plans:
            if (other.gpus == plan.gpus and other.placement.order == plan.placement.order
                    and other.config == replace(plan.config, warmup=plan.config.warmup + 1)):
                return other
        return None

    def no_plan_reason(self) -> str:
        """Why no configuration survived: per axis, why that axis alone could not take the GPUs."""
        counts = ", ".join(str(n) for n in self.gpu_counts)
        return (f"no configuration of {self.model} at {self.height}x{self.width} (frames {self.frames}) fits "
                f"{counts} GPU(s) of {self.cluster}: {'; '.join(_why_no_factorisation(self.pruned, self.gpu_counts))}.")

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """The JSON of `ditplan search`: plans best first (all, or the first `top`), then every pruned one."""
        plans = self.plans if top is None else self.plans[:top]
        payload: dict[str, Any] = {
            "model": self.model, "height": self.height, "width": self.width, "frames": self.frames,
            "steps": self.steps, "cluster": self.cluster, "gpus": self.gpu_counts,
            "baseline_1gpu_latency_s": self.baseline_latency_s,
            "baseline_1gpu_fits": self.baseline_feasible,
            "plans": [
                {"rank": index + 1, **plan.to_dict(), "speedup": self.speedup(plan),
                 "efficiency": self.efficiency(plan)}
                for index, plan in enumerate(plans)
            ],
            "pruned": [entry.to_dict() for entry in self.pruned],
        }
        if self.plans:
            payload["explanation"] = {
                "lines": self.explanation(),
                "comparisons": [c.to_dict() for c in self.comparisons()],
            }
            payload["best_per_count"] = [
                {"gpus": n, "config": str(p.config), "placement": list(p.placement.order), "latency_s": p.latency_s,
                 "end_to_end_s": p.end_to_end_s}
                for n, p in self.best_per_count.items()
            ]
        return payload

    def to_plan(self, plan: RankedPlan | None = None) -> Plan:
        """The plan file for `plan` (default: the winner), with its predicted figures and explanation."""
        chosen = plan or self.best
        return Plan(
            model=self.model, height=self.height, width=self.width, frames=self.frames, steps=self.steps,
            cluster=self.cluster, gpus=chosen.gpus, config=chosen.config, placement=chosen.placement,
            predicted={
                "latency_s": chosen.latency_s, "end_to_end_s": chosen.end_to_end_s, "memory_gib": chosen.memory_gib,
                "per_step_s": chosen.per_step_s, "breakdown": dict(chosen.breakdown), "comm_by_tier": dict(chosen.comm_by_tier),
                "speedup": self.speedup(chosen), "fidelity": chosen.fidelity, "scored_by": chosen.scored_by,
            },
            explanation=self.explanation() if chosen is self.best else [], nodes=self.nodes,
        )

    def to_frame(self):
        """Every plan as a pandas DataFrame, best first (pandas is imported here, not at import time)."""
        import pandas as pd

        rows = []
        for index, plan in enumerate(self.plans):
            rows.append({
                "rank": index + 1, "gpus": plan.gpus, "config": str(plan.config),
                "placement": ",".join(plan.placement.order), "latency_s": plan.latency_s,
                "end_to_end_s": plan.end_to_end_s,
                "memory_gib": plan.memory_gib, "speedup": self.speedup(plan),
                "efficiency": self.efficiency(plan), "gpu_seconds_per_image": plan.gpu_seconds_per_image,
                "fidelity": plan.fidelity, "scored_by": plan.scored_by,
                **{f"breakdown.{k}": v for k, v in plan.breakdown.items()},
            })
        return pd.DataFrame(rows)


def _why_no_factorisation(pruned: Sequence[PrunedConfig], counts: Sequence[int]) -> list[str]:
    """For each count and axis, the reason the axis could not take that count alone; then mixed ones."""
    by_config = {(entry.gpus, entry.config): entry.reason for entry in pruned}
    reasons: list[str] = []
    for count in counts:
        if count == 1:
            reason = by_config.get((1, str(ParallelConfig())))
            if reason:
                reasons.append(f"1 GPU: {reason}")
            continue
        for axis in ("ulysses", "ring", "pipefusion", "cfg", "dp"):
            if axis == "cfg" and count != 2:
                reasons.append(f"cfg={count}: cfg is 1 or 2 (unconditional and conditional halves)")
                continue
            alone = ParallelConfig(**{axis: count})
            reason = by_config.get((count, str(alone)))
            if reason is None:  # pure pipefusion may have been tried with other patch counts only
                reason = next((r for (n, text), r in by_config.items()
                               if n == count and ParallelConfig.parse(text).degree(axis) == count), None)
            if reason:
                reasons.append(f"{axis}={count}: {reason}")
        mixed = [entry for entry in pruned if entry.gpus == count
                 and sum(ParallelConfig.parse(entry.config).degree(a) > 1 for a in ("ulysses", "ring", "pipefusion", "cfg", "dp")) > 1]
        if mixed:
            reasons.append(f"{len(mixed)} mixed factorisation(s) of {count} fail too, e.g. {mixed[0].config}: {mixed[0].reason}")
    return reasons or ["every configuration was pruned"]


def _token_rows(model: Any, height: int, width: int, frames: int) -> int:
    """Token rows of the latent (after VAE and patch embedding), which PipeFusion splits into strips."""
    return model.token_grid(height, width, frames)[1]


def cluster_hierarchy(cluster: Any) -> Hierarchy | None:
    """The blocks of interchangeable GPUs in a costmodel Cluster, innermost first (None: treat no two alike).

    Inside a node GPUs hang off PCIe switches, switches off CPU sockets; an NVLink switch makes every
    GPU of a node alike for GPU-to-GPU traffic. Traffic between nodes also goes through the NICs,
    so blocks count as alike only where each holds the same share of NICs; otherwise (a NIC on one
    switch only) every order is scored on its own.
    """
    per_switch = cluster.gpus_per_switch
    per_socket = per_switch * cluster.switches_per_socket
    per_node = cluster.gpus_per_node
    spans_nodes = cluster.gpus > per_node
    nics = cluster.nics_per_node
    switches = cluster.sockets * cluster.switches_per_socket
    if spans_nodes and (nics < switches or nics % switches):
        return None  # switches hold different numbers of NICs: they are not interchangeable
    if cluster.nvlink is not None and (not spans_nodes or nics == per_node):
        return Hierarchy((per_node,))
    blocks = {per_switch, per_socket, per_node}
    if spans_nodes and per_node % nics == 0:
        blocks.add(per_node // nics)
    return Hierarchy(tuple(sorted(blocks)))


def _from_result(gpus: int, config: ParallelConfig, placement: Placement, result: Any, scored_by: str) -> RankedPlan:
    return RankedPlan(
        gpus=gpus, config=config, placement=placement, latency_s=float(result.latency_s),
        memory_gib=float(result.memory_gib), breakdown={k: float(v) for k, v in result.breakdown.items()},
        per_step_s=None if result.per_step_s is None else float(result.per_step_s),
        comm_by_tier={k: float(v) for k, v in (result.comm_by_tier or {}).items()},
        scored_by=scored_by, end_to_end_s=float(result.end_to_end_s),
    )


class _Scorer:
    """Scores candidates on one GPU count's cluster with the simulator, or the estimate where asked."""

    def __init__(self, model: Any, cluster: Any, height: int, width: int, frames: int, steps: int) -> None:
        self.model, self.cluster = model, cluster
        self.shape = dict(height=height, width=width, frames=frames, steps=steps)
        self.spec = spec = costmodel.load_model(model)
        # What stays allocated on a decode rank besides the decoder's activations: at most the whole
        # pipeline's weights and the runtime.
        weights_gib = (spec.params + spec.encoder_params + spec.vae_params) * spec.dtype_bytes / 2**30
        self.decode_memory_gib = cluster.hardware.memory_gib - RUNTIME_OVERHEAD_GIB - weights_gib
        self.vae_choices: dict[tuple, int] = {}

    def with_vae(self, config: ParallelConfig, placement: Placement) -> tuple[ParallelConfig, Placement]:
        """The candidate with the VAE decode rank count the cost model prefers for it."""
        # The choice depends on the degrees and the placement only (not on patches or warmup).
        key = (tuple(config.degree(axis) for axis in AXES), placement.order)
        vae = self.vae_choices.get(key)
        if vae is None:
            vae = self.vae_choices[key] = choose_vae(self.spec, self.cluster, config, placement, self.shape["height"],
                                                     self.shape["width"], self.shape["frames"], self.decode_memory_gib)
        if vae == config.vae:
            return config, placement
        chosen = replace(config, vae=vae)
        return chosen, Placement(chosen, placement.order)

    def simulate(self, config: ParallelConfig, placement: Placement) -> Any:
        return costmodel.simulate(self.model, self.cluster, config, placement=placement, **self.shape)

    def estimate(self, config: ParallelConfig, placement: Placement) -> Any:
        return costmodel.estimate(self.model, self.cluster, config, placement=placement, **self.shape)


def _progress(total: int, enabled: bool | None, description: str):
    """A tqdm bar on stderr where the search is long and stderr is a terminal; otherwise nothing."""
    if enabled is None:
        enabled = total >= PROGRESS_MIN_CANDIDATES and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="cand", file=sys.stderr, leave=False)


def _collapse_equivalent(plans: list[RankedPlan]) -> list[RankedPlan]:
    """Keep one placement per configuration among those with identical figures (the simplest)."""
    kept: dict[tuple, RankedPlan] = {}
    for plan in sorted(plans, key=lambda p: simplicity(p.config, p.placement)):
        key = (plan.gpus, str(plan.config), plan.scored_by, plan.latency_s, plan.memory_gib)
        kept.setdefault(key, plan)
    return list(kept.values())


def _search_one_count(model: Any, cluster_ref: str, nodes: int | None, gpus: int,
                      height: int, width: int, frames: int, steps: int, rescore: int,
                      exhaustive: bool, progress: bool | None,
                      min_warmup: int, max_dp: int | None = None) -> tuple[list[RankedPlan], list[PrunedConfig]]:
    cluster = costmodel.load_cluster(cluster_ref, gpus=gpus, nodes=nodes)
    scorer = _Scorer(model, cluster, height, width, frames, steps)
    pruned: list[PrunedConfig] = []
    candidates: list[tuple[ParallelConfig, Placement]] = []
    hierarchy = cluster_hierarchy(cluster)
    for config in enumerate_configs(gpus, _token_rows(model, height, width, frames), steps, min_warmup):
        broken = costmodel.check_config(config, model, height, width, frames, steps, gpus)
        if config.uses_patches and config.warmup < min_warmup:
            broken.append(f"warmup={config.warmup} is below the fidelity floor min_warmup={min_warmup} "
                          "(fewer synchronous steps mean more steps on stale K/V)")
        if max_dp is not None and config.dp > max_dp:
            broken.append(f"dp={config.dp} exceeds max_dp={max_dp} (more replicas than prompts leaves some idle)")
        if broken:
            pruned.append(PrunedConfig(gpus, str(config), tuple(broken)))
            continue
        candidates.extend((config, placement) for placement in distinct_placements(config, hierarchy))

    prescreen = not exhaustive and len(candidates) > EXHAUSTIVE_LIMIT
    bar = _progress(len(candidates), progress, f"search {gpus} GPUs")
    out_of_memory: dict[str, str] = {}

    def score(items: Iterable[tuple[ParallelConfig, Placement]], how: str) -> list[RankedPlan]:
        """Score each candidate (skipping configurations already out of memory); collect the feasible."""
        scored: list[RankedPlan] = []
        for config, placement in items:
            if bar is not None:
                bar.update(1)
            config, placement = scorer.with_vae(config, placement)
            if str(config) in out_of_memory:
                continue
            result = scorer.simulate(config, placement) if how == "simulator" else scorer.estimate(config, placement)
            if not result.feasible:
                out_of_memory.setdefault(str(config), result.reason or "infeasible")
                continue
            scored.append(_from_result(gpus, config, placement, result, how))
        return scored

    if not prescreen:
        plans = score(candidates, "simulator")
    else:
        estimated = sorted(score(candidates, "estimate"), key=RankedPlan.sort_key)
        chosen = estimated[:rescore]
        for axis in PURE_AXES:  # the explanation compares with the best of each pure method
            pure = next((p for p in estimated if pure_axis(p.config) == axis), None)
            if pure is not None and pure not in chosen:
                chosen.append(pure)
        if bar is not None:
            bar.total += len(chosen)
        plans = score(((p.config, p.placement) for p in chosen), "simulator")
        rescored = {(str(p.config), p.placement.order) for p in chosen}
        plans.extend(p for p in estimated if (str(p.config), p.placement.order) not in rescored)
    if bar is not None:
        bar.close()
    # A configuration out of memory is out whatever its placement: drop any placement of it scored before.
    plans = [p for p in plans if str(p.config) not in out_of_memory]
    pruned.extend(PrunedConfig(gpus, config, (reason,)) for config, reason in out_of_memory.items())
    return _collapse_equivalent(plans), pruned


def search(model: str | os.PathLike | Any, cluster: str | os.PathLike, gpus: int | str | Sequence[int], *,
           height: int | None = None, width: int | None = None, frames: int | None = None,
           steps: int | None = None, nodes: int | None = None, rescore: int = DEFAULT_RESCORE,
           exhaustive: bool = False, progress: bool | None = None, min_warmup: int = DEFAULT_MIN_WARMUP,
           max_dp: int | None = None) -> SearchResult:
    """Rank every valid configuration of `model` on `gpus` GPUs of `cluster` by predicted latency.

    model: an id (`flux-dev`), a YAML path, or a loaded `costmodel` ModelSpec.
    cluster: a built-in cluster id or a YAML path; `nodes` replicates a node-shaped cluster.
    gpus: one count (8), a range text (`1-16`, `1,2,4,8`) or a list; a range reports the best per count.
    height/width/frames/steps: default to the model's defaults.
    rescore: in a large space, how many of the closed-form estimate's best the simulator re-scores.
    exhaustive: simulate every candidate however large the space.
    progress: show a tqdm bar on stderr (None: only on a terminal and for a long search).
    min_warmup: fidelity floor; PipeFusion plans with fewer synchronous warmup steps are pruned
        (default 1, as the papers run PipeFusion: a first step on stale K/V from nowhere costs image
        quality; 0 ranks on latency alone).
    max_dp: at most this many data-parallel replicas (the executor passes its prompt count, so no
        replica is left without a prompt); None: no limit.

    Returns a SearchResult (`.plans` best first, `.pruned` with reasons, `.best`, `.to_frame()`).
    """
    spec = costmodel.load_model(os.fspath(model) if isinstance(model, os.PathLike) else model)
    height = height if height is not None else spec.default_height
    width = width if width is not None else spec.default_width
    frames = frames if frames is not None else spec.default_frames
    steps = steps if steps is not None else spec.default_steps
    problems = check_generation(spec, height, width, frames, steps)
    if problems:
        raise DitplanError(f"{spec.id} cannot generate {width}x{height}"
                           f"{'' if frames == 1 else f'x{frames} frames'} in {steps} steps on any configuration: "
                           + "; ".join(problems) + ".")
    if rescore < 1:
        raise DitplanError(f"rescore={rescore} is not allowed; the simulator must re-score at least one plan.")
    if isinstance(min_warmup, bool) or not isinstance(min_warmup, int) or min_warmup < 0:
        raise DitplanError(f"min_warmup={min_warmup!r} is not allowed; it counts warmup steps, an integer >= 0.")
    if max_dp is not None and (isinstance(max_dp, bool) or not isinstance(max_dp, int) or max_dp < 1):
        raise DitplanError(f"max_dp={max_dp!r} is not allowed; it counts data-parallel replicas, an integer >= 1.")
    counts = parse_gpu_counts(gpus)
    cluster_ref = os.fspath(cluster)
    plans: list[RankedPlan] = []
    pruned: list[PrunedConfig] = []
    for count in counts:
        found, dropped = _search_one_count(spec, cluster_ref, nodes, count, height, width, frames, steps,
                                           rescore, exhaustive, progress, min_warmup, max_dp)
        plans.extend(found)
        pruned.extend(dropped)
    plans.sort(key=RankedPlan.sort_key)
    baseline_cluster = costmodel.load_cluster(cluster_ref, gpus=1, nodes=nodes)
    baseline = costmodel.simulate(spec, baseline_cluster, ParallelConfig(), height=height, width=width,
                                  frames=frames, steps=steps)
    return SearchResult(
        model=spec.id, height=height, width=width, frames=frames, steps=steps, cluster=cluster_ref, nodes=nodes,
        gpu_counts=counts, plans=plans, pruned=pruned, baseline_latency_s=float(baseline.latency_s),
        baseline_feasible=bool(baseline.feasible),
    )
