"""Why the winner wins: term-by-term differences between two ranked plans.

The simulator's breakdown splits each latency into terms that add up to it (compute, exposed
communication, pipeline bubbles, warmup, ...), and `comm_by_tier` splits the exposed communication
by link tier. A comparison lists, one line each, the terms that differ by more than a small
fraction of the winner's latency, largest difference first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from costmodel.config import DEFAULT_PLACEMENT
from planner.space import nontrivial_axes, short_config

if TYPE_CHECKING:
    from planner.ranking import RankedPlan

# A term counts as different when it moves by at least 0.5 % of the winner's latency or 1 ms:
# below that it is inside the cost model's own rounding (per-message latencies are ~us, steps ~ms).
RELATIVE_THRESHOLD = 0.005
ABSOLUTE_THRESHOLD_S = 1e-3


def term_label(key: str) -> str:
    """`communication_s` -> `communication`; `bubble_s` -> `bubble`."""
    label = key[:-2] if key.endswith("_s") else key
    return label.replace("_", " ")


def _is_communication(key: str) -> bool:
    return "comm" in key


def plan_terms(plan: "RankedPlan") -> dict[str, float]:
    """The plan's latency terms, with exposed communication split by link tier where known."""
    terms: dict[str, float] = {}
    split_comm = bool(plan.comm_by_tier)
    for key, value in plan.breakdown.items():
        if split_comm and _is_communication(key):
            continue
        terms[term_label(key)] = float(value)
    if split_comm:
        # The tier split replaces the communication total; what the tiers do not account for stays
        # as "other communication" so the terms still add up to the latency.
        comm_total = sum(float(v) for k, v in plan.breakdown.items() if _is_communication(k))
        tiers_total = 0.0
        for tier, value in plan.comm_by_tier.items():
            terms[f"exposed communication on {tier}"] = float(value)
            tiers_total += float(value)
        rest = comm_total - tiers_total
        if abs(rest) > 1e-12:
            terms["other communication"] = rest
    return terms


def describe_plan(plan: "RankedPlan") -> str:
    """`cfg=2,pipefusion=4,warmup=1 on 8 GPU(s), default placement` (or the order, innermost first)."""
    if plan.placement.order == DEFAULT_PLACEMENT:
        placement = "default placement"
    else:
        inner = [axis for axis in plan.placement.order if axis in nontrivial_axes(plan.config)]
        placement = f"placement {'>'.join(inner)} (inner>outer)"
    return f"{short_config(plan.config)} on {plan.gpus} GPU(s), {placement}"


@dataclass(frozen=True)
class TermDifference:
    term: str
    winner_s: float
    other_s: float

    @property
    def delta_s(self) -> float:
        return self.winner_s - self.other_s

    def line(self) -> str:
        return f"{self.term}: {self.winner_s:.3f} s vs {self.other_s:.3f} s ({self.delta_s:+.3f} s)"

    def to_dict(self) -> dict[str, Any]:
        return {"term": self.term, "winner_s": self.winner_s, "other_s": self.other_s,
                "delta_s": self.delta_s, "line": self.line()}


@dataclass(frozen=True)
class Comparison:
    """The winner against one other plan (`role`: runner-up, best pure method, ...)."""

    role: str
    winner: "RankedPlan"
    other: "RankedPlan"
    differences: tuple[TermDifference, ...]

    def headline(self) -> str:
        delta = self.winner.latency_s - self.other.latency_s
        return (f"vs {self.role} {describe_plan(self.other)}: {self.winner.latency_s:.3f} s vs "
                f"{self.other.latency_s:.3f} s ({delta:+.3f} s)")

    def lines(self) -> list[str]:
        body = [d.line() for d in self.differences] or ["no term differs by more than 0.5 % of the latency"]
        return [self.headline(), *(f"  {line}" for line in body)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "config": str(self.other.config),
            "placement": list(self.other.placement.order),
            "gpus": self.other.gpus,
            "latency_s": self.other.latency_s,
            "delta_s": self.winner.latency_s - self.other.latency_s,
            "headline": self.headline(),
            "terms": [d.to_dict() for d in self.differences],
        }


def compare(role: str, winner: "RankedPlan", other: "RankedPlan") -> Comparison:
    """The terms in which `winner` and `other` differ noticeably, largest difference first."""
    mine, theirs = plan_terms(winner), plan_terms(other)
    threshold = max(ABSOLUTE_THRESHOLD_S, RELATIVE_THRESHOLD * winner.latency_s)
    differences = [
        TermDifference(term, mine.get(term, 0.0), theirs.get(term, 0.0))
        for term in dict.fromkeys([*mine, *theirs])
        if abs(mine.get(term, 0.0) - theirs.get(term, 0.0)) >= threshold
    ]
    differences.sort(key=lambda d: -abs(d.delta_s))
    return Comparison(role, winner, other, tuple(differences))


def warmup_note(winner: "RankedPlan", steps: int, more_warmup: "RankedPlan | None" = None) -> str | None:
    """The fidelity side of the winner's warmup choice, where its patch pipeline uses stale K/V.

    `more_warmup` is the same plan with one more warmup step, if scored: its extra cost is quoted.
    """
    config = winner.config
    if not config.uses_patches:
        return None
    stale = max(steps - config.warmup, 0)
    cost = ""
    if more_warmup is not None:
        cost = f"; warmup={more_warmup.config.warmup} would cost {more_warmup.latency_s - winner.latency_s:+.3f} s"
    if config.warmup == 0:
        # Only reachable below the search's default floor (--min-warmup 0).
        return (f"fidelity: warmup=0 (allowed by --min-warmup 0): all {steps} steps run the patch pipeline, and the "
                f"first attends to K/V no step has computed yet, so the image departs furthest from the serial "
                f"result here; this project has no measured quality figure for it yet: compare the images of "
                f"`ditplan run` with this plan and with warmup=1 before using it{cost}")
    return (f"fidelity: warmup={config.warmup} of {steps} steps runs synchronously; the other {stale} step(s) "
            f"attend to the previous step's K/V for patches not yet computed (more warmup is closer to "
            f"the serial result and slower{cost})")
