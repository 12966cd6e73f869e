"""PipeFusion: an event simulation of patches x stages x steps, and its closed form.

Synchronous full-image warmup steps, then the patch pipeline with cross-step pipelining (stage 0
starts patch m of step t+1 once the last stage has sent back patch m of step t), asynchronous sends
queued per sender, the MM-DiT text stream split into strips with the patches, and HunyuanDiT's long
skips relayed to the mirror stage.

Two experts (Wan 2.2 A14B): which steps are warmup steps is `costmodel.config.warmup_steps`, the
rule the executor runs: the first `warmup` steps of each expert, since the expert taking over has
no stale K/V of its own yet. So at the boundary the pipeline drains (the warmup step waits for
every strip of the step before), runs the expert's warmup steps whole, and fills again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from costmodel.block_cost import BlockCost, sequence_cost, step_extras
from costmodel.config import warmup_steps
from costmodel.sim_setup import Setup, latent_bytes
from costmodel.straggle import block_syncs, has_straggle, step_end_sync, straggle_seconds
from costmodel.trace import event, trace_patch, trace_warmup


def full_image_steps(st: Setup) -> list[bool]:
    """Which of the setup's steps run as synchronous full-image warmup steps."""
    return warmup_steps(st.model.step_experts(st.steps), st.config.warmup)


def stages_of(st: Setup) -> list[list[tuple[int, str]]]:
    """Contiguous balanced split of the pipeline units (see ModelSpec.pipeline_units) over the stages."""
    kinds = st.model.block_sequence
    units = st.model.pipeline_units
    p = st.config.pipefusion
    base, extra = divmod(len(units), p)
    stages, start = [], 0
    for s in range(p):
        size = base + (1 if s < extra else 0)
        stages.append([(index, kinds[index]) for unit in units[start:start + size] for index in unit])
        start += size
    return stages


class Transfers:
    """Point-to-point costs between pipefusion stages (every SP/CFG/DP replica sends at once)."""

    def __init__(self, st: Setup) -> None:
        self.st = st
        self.cache: dict[tuple[int, int], tuple[float, float, str]] = {}

    def seconds(self, source: int, target: int, nbytes: float) -> float:
        key = (source, target)
        if key not in self.cache:
            pairs = tuple((g[source], g[target]) for g in self.st.groups["pipefusion"])
            self.cache[key] = self.st.cluster.pattern_cost("p2p", pairs)
        per_byte, fixed, _ = self.cache[key]
        measured = self.st.cluster.measured
        if measured is not None and ("p2p", 2) in measured.communication:
            return measured.communication[("p2p", 2)](nbytes)
        return fixed + per_byte * nbytes


@dataclass
class PipelineParts:
    """What the event simulation and its closed form both start from."""

    stages: list[list[tuple[int, str]]]
    full: list[BlockCost]  # each stage's blocks over the full image (warmup steps)
    patch: list[BlockCost]  # each stage's blocks over one patch
    host: float  # per-step host work outside the blocks
    extra_comm: float  # per-step exposed communication outside the blocks (output gathers)
    extra_tiers: dict[str, float]
    transfers: "Transfers"
    full_tokens: int
    patch_tokens: int
    relayed: list[int]  # long skips crossing each stage boundary s -> s+1
    messages: list[list[tuple[int, float]]]  # per stage: (target stage, bytes) sent per patch
    straggle: list[float]  # per stage: seconds one patch waits for the slowest rank (costmodel.straggle)
    warm_straggle: float  # the same over one warmup step


def pipeline_parts(st: Setup) -> PipelineParts:
    config, model = st.config, st.model
    p, M, sp = config.pipefusion, config.patches, config.sp
    b, h = model.dtype_bytes, model.hidden_size
    stages = stages_of(st)
    host, extra_comm, extra_tiers = step_extras(st)
    full_tokens = st.tokens // sp
    patch_tokens = max(1, st.tokens // (M * sp))
    # Stage durations: full image (warmup) and per patch. The MM-DiT text stream is split into strips
    # like the image, so each patch carries T/M text tokens and the text runs once per step in total.
    patch_text = -(-st.text // M)
    full = [sequence_cost(st, blocks, full_tokens, st.text) for blocks in stages]
    patch = [sequence_cost(st, blocks, patch_tokens, patch_text, stale_kv=True) for blocks in stages]
    # Messages each stage sends per patch: the hidden states (with the patch's text strip) to the next
    # stage and the latent strip from the last stage back to stage 0. HunyuanDiT's long skips (block
    # i's output feeds block L-1-i) ride along: stages only talk to their neighbour, so a skip is
    # relayed across every boundary between its source stage and its target stage.
    stage_of = {index: s for s, blocks in enumerate(stages) for index, _ in blocks}
    slab = st.batch * patch_tokens * h * b
    patch_text_slab = st.batch * patch_text * h * b
    relayed = [0] * p
    if model.skip_connections:
        L = model.num_blocks
        for index in range(L // 2 - 1):  # blocks 0 .. L/2-2 keep their output for block L-1-index
            for boundary in range(stage_of[index], stage_of[L - 1 - index]):
                relayed[boundary] += 1
    messages: list[list[tuple[int, float]]] = []
    for s in range(p):
        out: list[tuple[int, float]] = []
        if s < p - 1:
            out.append((s + 1, slab * (1 + relayed[s]) + patch_text_slab))
        elif p > 1:
            out.append((0, latent_bytes(st, patch_tokens)))
        messages.append(out)
    # A patch's compute ends in the hand-over to the next stage, which runs concurrently (the ranks
    # wait for each other there); the last stage's share of the step-end all-gather is 1/M per patch.
    # A warmup step runs the stages in turn, so only the exchanges inside each stage wait.
    straggle, warm_straggle = [], 0.0
    for s, blocks in enumerate(stages):
        last = s == p - 1
        straggle.append(straggle_seconds(st, patch[s].compute + (host / M if last else 0.0),
                                         block_syncs(st, blocks) + (p > 1) + (step_end_sync(st) / M if last else 0)))
        warm_straggle += straggle_seconds(st, full[s].compute + (host if last else 0.0),
                                          block_syncs(st, blocks) + (step_end_sync(st) if last else 0))
    return PipelineParts(stages, full, patch, host, extra_comm, extra_tiers, Transfers(st), full_tokens, patch_tokens,
                         relayed, messages, straggle, warm_straggle)


def _warm_step(st: Setup, parts: PipelineParts) -> float:
    """One synchronous full-image step through the stages in turn."""
    p = st.config.pipefusion
    b, h = st.model.dtype_bytes, st.model.hidden_size
    step = sum(cost.compute + cost.comm for cost in parts.full) + parts.host + parts.extra_comm + parts.warm_straggle
    if p > 1:
        text_slab = st.batch * st.text * h * b
        step += sum(parts.transfers.seconds(s, s + 1, st.batch * parts.full_tokens * h * b * (1 + parts.relayed[s])
                                            + text_slab) for s in range(p - 1))
        step += parts.transfers.seconds(p - 1, 0, latent_bytes(st, parts.full_tokens))
    return step


def simulate_pipeline(st: Setup, trace: list | None) -> dict[str, Any]:
    config = st.config
    p, M = config.pipefusion, config.patches
    parts = pipeline_parts(st)
    stages, full, patch, transfers, messages = parts.stages, parts.full, parts.patch, parts.transfers, parts.messages
    extra_comm, extra_tiers = parts.extra_comm, parts.extra_tiers
    per_patch_extra = (parts.host + extra_comm) / M
    durations = [[patch[s].compute + patch[s].comm + parts.straggle[s] + (per_patch_extra if s == p - 1 else 0.0)
                  for _ in range(M)] for s in range(p)]

    # Warmup steps run the full image through the stages in turn, once every strip of the step
    # before is back (at the start, and where an expert takes over); the others, patch by patch.
    warm_step = _warm_step(st, parts)
    full_image = full_image_steps(st)
    stage_free = [0.0] * p
    send_free = [0.0] * p
    busy = [0.0] * p
    back = [0.0] * M
    end = 0.0
    ranks_of = [[g[s] for g in st.groups["pipefusion"]] for s in range(p)]
    sends = [[(target, transfers.seconds(s, target, nbytes)) for target, nbytes in messages[s]] for s in range(p)]
    previous: list[float] | None = None
    t = 0
    while t < st.steps:
        if full_image[t]:
            start = max([end, *back])
            if trace is not None:
                trace_warmup(st, trace, full, t, start)
            end = start + warm_step
            stage_free, send_free, back = [end] * p, [end] * p, [end] * M
            previous = None
            t += 1
            continue
        for m in range(M):
            need = [0.0] * p
            need[0] = back[m]
            for s in range(p):
                start = stage_free[s] if stage_free[s] > need[s] else need[s]
                finish = start + durations[s][m]
                if trace is not None:
                    trace_patch(trace, ranks_of[s], stage_free[s], start, finish, t, m, s)
                stage_free[s] = finish
                busy[s] += durations[s][m]
                for target, seconds in sends[s]:
                    send_start = finish if finish > send_free[s] else send_free[s]
                    arrival = send_start + seconds
                    send_free[s] = arrival
                    if trace is not None:
                        for rank in ranks_of[s]:
                            trace.append(event(f"send to stage {target}", "communication", rank, 1, send_start, arrival))
                    if target == 0:
                        back[m] = arrival
                    else:
                        need[target] = arrival
                if p == 1:
                    back[m] = finish  # one process: the next step's patch m waits only for this one
                end = max(end, finish)
        t += 1
        if trace is None:
            # The recursion only takes sums and maxima of the state, so once a step moves every
            # state time by the same amount, every later patch step does too: the steps up to the
            # next warmup step (an expert's first) or the end are that shift.
            state = stage_free + send_free + back + [end]
            shift = _uniform_shift(previous, state)
            if shift is not None:
                upto = next((u for u in range(t, st.steps) if full_image[u]), st.steps)
                left = upto - t
                stage_free, send_free, back = ([x + left * shift for x in xs] for xs in (stage_free, send_free, back))
                end += left * shift
                step_busy = [sum(durations[s]) for s in range(p)]
                busy = [busy[s] + left * step_busy[s] for s in range(p)]
                t, state = upto, None
            previous = state
    warmup_s = sum(full_image) * warm_step
    pipelined = st.steps - sum(full_image)
    pipeline_s = end - warmup_s
    bottleneck = max(range(p), key=lambda s: busy[s])
    bottleneck_comm = (patch[bottleneck].comm + (extra_comm / M if bottleneck == p - 1 else 0.0)) * M * pipelined
    bottleneck_straggle = parts.straggle[bottleneck] * M * pipelined
    tiers: dict[str, float] = {}
    for tier, seconds in patch[bottleneck].tiers.items():
        tiers[tier] = tiers.get(tier, 0.0) + seconds * M * pipelined
    if bottleneck == p - 1:
        for tier, seconds in extra_tiers.items():
            tiers[tier] = tiers.get(tier, 0.0) + seconds * pipelined
    breakdown = {
        "warmup_s": warmup_s,
        "compute_s": busy[bottleneck] - bottleneck_comm - bottleneck_straggle,
        "communication_s": bottleneck_comm,
        "bubble_s": max(0.0, pipeline_s - busy[bottleneck]),
    }
    if has_straggle(st):
        breakdown["straggle_s"] = bottleneck_straggle
    per_step = pipeline_s / pipelined if pipelined else warm_step
    return {"latency": warmup_s + pipeline_s, "breakdown": breakdown, "per_step": per_step, "tiers": tiers,
            "stages": stages}


def _uniform_shift(previous: list[float] | None, state: list[float]) -> float | None:
    """The amount by which every entry of `state` moved since `previous`, if they all moved alike."""
    if previous is None:
        return None
    shift = state[-1] - previous[-1]
    tolerance = 1e-12 * max(abs(state[-1]), 1.0)
    if all(abs((now - before) - shift) <= tolerance for now, before in zip(state, previous)):
        return shift
    return None


def estimate_pipeline(st: Setup) -> dict[str, Any]:
    """Closed form of `simulate_pipeline`: fill plus steady state, from the same parts."""
    config, model = st.config, st.model
    p, M = config.pipefusion, config.patches
    parts = pipeline_parts(st)
    slab = st.batch * parts.patch_tokens * model.hidden_size * model.dtype_bytes
    hop = max((parts.transfers.seconds(s, s + 1, slab) for s in range(p - 1)), default=0.0)
    per_patch = [c.compute + c.comm + wait for c, wait in zip(parts.patch, parts.straggle)]
    per_patch[-1] += (parts.host + parts.extra_comm) / M
    cycle = sum(per_patch) + p * hop  # one patch around the stage ring
    per_step = max(M * max(per_patch), cycle)
    warm_step = _warm_step(st, parts)
    full_image = full_image_steps(st)
    warm = sum(full_image)
    pipelined = st.steps - warm
    # Each run of patch steps between warmup steps fills the pipeline once.
    runs = sum(1 for t in range(st.steps) if not full_image[t] and (t == 0 or full_image[t - 1]))
    pipeline_s = runs * (cycle - max(per_patch)) + per_step * pipelined
    busy = max(per_patch) * M * pipelined
    breakdown = {"warmup_s": warm * warm_step, "compute_s": min(busy, pipeline_s),
                 "communication_s": 0.0, "bubble_s": max(0.0, pipeline_s - busy)}
    if has_straggle(st):
        slowest = max(range(p), key=lambda s: per_patch[s])
        breakdown["straggle_s"] = min(parts.straggle[slowest] * M * pipelined, breakdown["compute_s"])
        breakdown["compute_s"] -= breakdown["straggle_s"]
    return {
        "latency": warm * warm_step + pipeline_s,
        "breakdown": breakdown,
        "per_step": per_step if pipelined else warm_step, "tiers": {}, "stages": parts.stages,
    }
