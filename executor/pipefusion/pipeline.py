"""The distributed PipeFusion pipeline: stages on the ranks of a pipefusion group, patches across steps.

Stage s runs a contiguous range of units. After the synchronous warmup steps (whole image, every
stage waits for the previous one, the last stage sends the new latents back to stage 0), patch m of
step t flows stage 0 -> 1 -> ... -> last; the last stage applies guidance and the scheduler step to
the strip and sends the new strip back to stage 0, which starts patch m of step t+1 as soon as it
arrives, without waiting for the rest of the image. So stage s works on patch m while stage s-1
works on patch m+1.

Communication: every message is one contiguous tensor of one dtype whose size both ends derive
from the patch layout and the configuration (StagedTransformer.carry_spec), never from the data.
Messages go to the next stage (the patch's carry: image tokens, the patch's strip of the text
stream of MM-DiT models, so the text crosses each boundary once per step), to the mirror stage
(HunyuanDiT's long skips, sent once from where they are made to where they are used) and from the
last stage to stage 0 (strips). Every rank derives the same `PipelineSchedule`: the tick at which
each stage computes each patch and at which each message travels; at every tick a rank posts the
sends and receives of that tick as one group (`batch_isend_irecv`), and its peers post the
counterparts in their group of the same tick. So no receive is posted ahead of an unmatched send
and no point-to-point call waits on a peer that waits on it (NCCL's rules; executor.nccl_rules
checks them on recorded runs). With CFG parallelism each CFG half runs its own pipeline; the last
stages of the two gather the strip's model output (one all-gather in the cfg group) and apply the
same guidance and scheduler step.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from costmodel.config import warmup_steps
from costmodel.errors import DitplanError
from executor.pipefusion.hybrid import SequenceInStage
from executor.pipefusion.job import PatchJob
from executor.pipefusion.layout import patch_problems
from executor.pipefusion.schedulers import PatchScheduler
from executor.pipefusion.stages import Carry, StagedTransformer, expert_stages
from executor.pipefusion.stale_kv import StaleKVState, install_stale_kv
from executor.steps import StepProgram, gather_cfg_halves, run_steps
from executor.timeline import active as active_timeline

Spec = dict[str, tuple[int, ...]]


def stage_units(weights: list[int], stages: int, stage: int) -> range:
    """The contiguous range of units `stage` runs, cut so each stage holds about 1/stages of the weight.

    Weights are parameter counts (compute per token follows them): Flux's double-stream blocks are
    about twice its single-stream ones, so an equal unit count would not balance. Every stage gets
    at least one unit.
    """
    units = len(weights)
    if not 1 <= stages <= units:
        raise ValueError(f"cannot cut {units} blocks into {stages} pipeline stages")
    cumulative = [0]
    for w in weights:
        cumulative.append(cumulative[-1] + w)
    cuts = [0]
    for k in range(1, stages):
        target = cumulative[-1] * k / stages
        candidates = range(cuts[-1] + 1, units - (stages - k) + 1)
        cuts.append(min(candidates, key=lambda j: abs(cumulative[j] - target)))
    cuts.append(units)
    return range(cuts[stage], cuts[stage + 1])


def _pack(carry: Carry, spec: Spec, dtype: torch.dtype) -> torch.Tensor:
    for key, shape in spec.items():
        if tuple(carry[key].shape) != shape:
            raise RuntimeError(f"PipeFusion message {key!r} has shape {tuple(carry[key].shape)}, but {shape} was agreed")
    return torch.cat([carry[key].reshape(-1).to(dtype) for key in spec])


def _unpack(flat: torch.Tensor, spec: Spec) -> Carry:
    out, offset = {}, 0
    for key, shape in spec.items():
        n = prod(shape)
        out[key] = flat[offset:offset + n].view(shape)
        offset += n
    return out


@dataclass(frozen=True)
class Item:
    """One piece of work of every stage: a patch of a step, or the whole image (patch None: warmup)."""

    step: int
    patch: int | None


def pipeline_items(steps: int, warmup: int, patches: int, step_experts: Sequence[int] = ()) -> list[Item]:
    """Every item in order: the warmup steps (`costmodel.config.warmup_steps`: the first `warmup`
    steps of each expert) whole, the other steps patch by patch."""
    full_image = warmup_steps(step_experts or [0] * steps, warmup)
    return [Item(i, m) for i in range(steps) for m in ([None] if full_image[i] else range(patches))]


@dataclass(frozen=True)
class Message:
    """What stage `source` sends to stage `target` after computing item number `item`."""

    item: int
    source: int
    target: int


class PipelineSchedule:
    """At which tick each stage computes each item and each message travels (the same on every rank).

    A stage computes an item one tick after its previous item and after the stage before it
    computed the same item; stage 0 also after the last stage computed the result it starts from
    (the strip of the step before, the whole latents after a warmup step, or every strip of the
    step before a warmup step that follows patch steps: an expert's first). A message made at
    tick P travels at tick P + 1, in one group on each end.
    """

    def __init__(self, items: list[Item], stages: int, targets: list[list[int]]) -> None:
        self.items, self.stages = items, stages
        last = stages - 1
        positions = {item: j for j, item in enumerate(items)}
        # The last stage's results, and the item of stage 0 that starts from each.
        self.returns: dict[int, int] = {}
        if stages > 1:
            for j, item in enumerate(items):
                if item.step < items[-1].step:
                    nxt = items[j + 1] if item.patch is None else Item(item.step + 1, item.patch)
                    if nxt not in positions:  # a warmup step next (an expert's first) starts from every strip
                        nxt = Item(item.step + 1, None)
                    self.returns[j] = positions[nxt]
        self.starts_from: dict[int, list[int]] = {}
        for j, consumer in self.returns.items():
            self.starts_from.setdefault(consumer, []).append(j)
        self.tick = [[0] * len(items) for _ in range(stages)]
        for j in range(len(items)):
            for s in range(stages):
                earliest = [self.tick[s][j - 1] + 1] if j else [0]
                earliest += [self.tick[s - 1][j] + 1] if s else [self.tick[last][d] + 1 for d in self.starts_from.get(j, [])]
                self.tick[s][j] = max(earliest)
        self.messages = [Message(j, s, t) for j in range(len(items)) for s in range(stages) for t in targets[s]]
        self.messages += [Message(j, last, 0) for j in self.returns]

    def travels(self, message: Message) -> int:
        return self.tick[message.source][message.item] + 1

    def timeline(self, stage: int) -> list[tuple[int, list[Message], list[Message], int | None]]:
        """(tick, messages this stage sends, messages it receives, the item it computes or None) in tick order."""
        ticks: dict[int, tuple[list[Message], list[Message], list[int]]] = {}
        for message in self.messages:
            for end, role in ((message.source, 0), (message.target, 1)):
                if end == stage:
                    ticks.setdefault(self.travels(message), ([], [], []))[role].append(message)
        for j in range(len(self.items)):
            ticks.setdefault(self.tick[stage][j], ([], [], []))[2].append(j)
        return [(tick, sends, receives, computes[0] if computes else None)
                for tick, (sends, receives, computes) in sorted(ticks.items())]


class _PostedGroup:
    """The works of one posted group and the send buffers they must keep alive; waited once
    (gloo blocks on a second wait of a finished receive)."""

    def __init__(self, works: list[Any], buffers: list[torch.Tensor]) -> None:
        self.works, self.buffers, self.done = works, buffers, False

    def finished(self) -> bool:
        if not self.done and all(work.is_completed() for work in self.works):
            self.done, self.buffers = True, []
        return self.done

    def wait(self) -> None:
        if not self.done:
            for work in self.works:
                work.wait()
            self.done, self.buffers = True, []


class TickExchange:
    """Posts each tick's sends and receives as one group and hands out the received messages."""

    def __init__(self, ranks: list[int], group: Any) -> None:
        self._ranks, self._group = ranks, group
        self._outgoing: dict[Message, torch.Tensor] = {}
        self._incoming: dict[Message, tuple[torch.Tensor, Spec, _PostedGroup]] = {}
        self._posted: list[_PostedGroup] = []
        self.sent_bytes = 0

    def stage(self, message: Message, carry: Carry, spec: Spec, dtype: torch.dtype) -> None:
        """Pack a message now; it leaves at its tick."""
        flat = _pack(carry, spec, dtype)
        self.sent_bytes += flat.numel() * flat.element_size()
        self._outgoing[message] = flat

    def post(self, sends: list[Message], receives: list[tuple[Message, Spec, torch.dtype]], device: torch.device) -> None:
        if not sends and not receives:
            return
        operations, buffers = [], []
        for message in sends:
            flat = self._outgoing.pop(message)
            operations.append(dist.P2POp(dist.isend, flat, self._ranks[message.target], self._group))
            buffers.append(flat)
        arriving = []
        for message, spec, dtype in receives:
            buffer = torch.empty(sum(prod(s) for s in spec.values()), dtype=dtype, device=device)
            operations.append(dist.P2POp(dist.irecv, buffer, self._ranks[message.source], self._group))
            arriving.append((message, buffer, spec))
        posted = _PostedGroup(dist.batch_isend_irecv(operations), buffers)
        for message, buffer, spec in arriving:
            self._incoming[message] = (buffer, spec, posted)
        self._posted = [group for group in self._posted if not group.finished()]
        self._posted.append(posted)

    def receive(self, message: Message) -> Carry:
        buffer, spec, posted = self._incoming.pop(message)
        timeline = active_timeline()
        if timeline is None:
            posted.wait()
        else:
            timeline.waiting(f"wait for stage {message.source}", posted.wait)
        return _unpack(buffer, spec)

    def flush(self) -> None:
        for posted in self._posted:
            posted.wait()
        self._posted = []


@torch.no_grad()
def denoise_pipelined(job: PatchJob, stages: StagedTransformer, pipe_ranks: list[int], pipe_group: Any,
                      patches: int, warmup: int, cfg_ranks: list[int] | None = None, cfg_group: Any = None,
                      ulysses_group: Any = None, ring_group: Any = None,
                      on_step: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """Final latents (on every rank of the pipeline) of PipeFusion over `pipe_ranks` (global ranks, stage order).

    `cfg_ranks`/`cfg_group`: this rank's CFG group (2 ranks, [uncond, cond] order) or None.
    `ulysses_group`/`ring_group`: the sequence-parallel groups splitting each stage's tokens (None:
    degree 1); an SP rank exchanges with the rank of the same SP coordinates in the other stages.
    `on_step(step_index, seconds)`: called when this rank has done its part of each step.
    """
    program = pipeline_steps(job, stages, pipe_ranks, pipe_group, patches, warmup, cfg_ranks, cfg_group, ulysses_group, ring_group)
    return run_steps(program, len(job.timesteps), job.latents.device, on_step, dist.get_rank())


def pipeline_steps(job: PatchJob, stages: StagedTransformer | Sequence[StagedTransformer], pipe_ranks: list[int],
                   pipe_group: Any, patches: int, warmup: int, cfg_ranks: list[int] | None = None, cfg_group: Any = None,
                   ulysses_group: Any = None, ring_group: Any = None) -> StepProgram:
    """The step program (executor.steps) of PipeFusion on this rank; see `denoise_pipelined`.

    `stages`: this rank's stage of the transformer, or of each expert (`PatchJob.step_experts`
    says which runs each step; the experts have one shape, so the first gives the layout)."""
    experts = expert_stages(stages)
    stages = experts[0]
    rank = dist.get_rank()
    stage, count = pipe_ranks.index(rank), len(pipe_ranks)
    first, last = stage == 0, stage == count - 1
    units = stage_units(stages.unit_weights, count, stage)
    steps = len(job.timesteps)

    kwargs, half = job.model_kwargs, None
    if cfg_ranks is not None and len(cfg_ranks) > 1:
        half = cfg_ranks.index(rank)
        kwargs = job.cfg_half(half)

    def model_input(x: torch.Tensor, t: Any) -> torch.Tensor:
        full = job.model_input(x, t)
        return full if half is None else full.chunk(2)[half]

    def guide(out: torch.Tensor, step_index: int, t: Any) -> torch.Tensor:
        if half is None:
            return job.guide(out, step_index, t)
        return job.guide(torch.cat(gather_cfg_halves(out, cfg_group)), step_index, t)

    latents = job.latents.clone()
    x0 = model_input(latents, job.timesteps[0])
    layout = stages.layout(x0, kwargs, patches)
    # Conditioning depends on the latents' shape, never their values, so x0 serves every step.
    cond0 = stages.condition(x0, job.model_timestep(job.timesteps[0], x0.shape[0]), kwargs)
    carry_batch = stages.carry_batch(cond0, x0.shape[0])
    dtype = next(p.dtype for p in stages.transformer.parameters() if p.is_floating_point())
    strip_dtype = latents.dtype
    sp = prod(dist.get_world_size(g) if g is not None else 1 for g in (ulysses_group, ring_group))

    text_total = stages.text_tokens(cond0)

    def tokens_of(patch: int | None) -> int:
        return layout.image_tokens if patch is None else layout.patch_tokens(patch)

    def text_of(patch: int | None) -> int:
        strip = layout.text_slice(patch, text_total)
        return strip.stop - strip.start

    problems = patch_problems(layout, sp)
    if problems:
        raise DitplanError(f"PipeFusion x sequence parallelism: {problems[0]}.")

    # HunyuanDiT's long skips go straight from the producing stage to the consuming (mirror) stage;
    # those between neighbours ride with the boundary message.
    shares = [stage_units(stages.unit_weights, count, s) for s in range(count)]
    stage_of = {unit: s for s, share in enumerate(shares) for unit in share}
    skip_routes = [(key, stage_of[src], stage_of[dst]) for src, dst, key in stages.skip_pairs() if stage_of[src] != stage_of[dst]]

    def message_spec(patch: int | None, source: int, target: int) -> Spec:
        tokens = tokens_of(patch) // sp
        spec = stages.carry_spec(cond0, carry_batch, tokens, text_of(patch)) if target == source + 1 else {}
        for key, src, dst in skip_routes:
            if (src, dst) == (source, target):
                spec[key] = (carry_batch, tokens, stages.hidden_size())
        return spec

    targets = [sorted({dst for _, src, dst in skip_routes if src == s} | ({s + 1} if s < count - 1 else set()))
               for s in range(count)]
    sources = [s for s in range(count) if stage in targets[s]]

    def latent_spec(patch: int | None) -> Spec:
        shape = list(latents.shape)
        if patch is not None:
            strip = layout.latent_slice(patch)
            shape[-2] = strip.stop - strip.start
        return {"latents": tuple(shape)}

    step_experts = job.experts_of_steps()
    items = pipeline_items(steps, warmup, patches, step_experts)
    schedule = PipelineSchedule(items, count, targets)

    def incoming(message: Message) -> tuple[Message, Spec, torch.dtype]:
        patch = items[message.item].patch
        if message.target == 0:  # the last stage's result, for stage 0's next step
            return message, latent_spec(patch), strip_dtype
        return message, message_spec(patch, message.source, message.target), dtype

    scheduler = PatchScheduler(job.scheduler, layout, tuple(latents.shape)) if last else None
    sequences = [SequenceInStage(expert, units, layout, ulysses_group, ring_group, latents.device)
                 for expert in experts] if sp > 1 else []
    # Buffer rows: the image, or under Ring this rank's share of it (every patch's share, for its
    # Ulysses peers too); see hybrid.py.
    ring_degree = dist.get_world_size(ring_group) if ring_group is not None else 1
    state = StaleKVState(buffer_tokens=layout.image_tokens // ring_degree, text_buffer_tokens=text_total)
    handles = []
    for e, expert in enumerate(experts):  # each expert's layers keep their own buffers
        layers = expert.stale_layers(units)
        if sequences:
            layers = [(module, sequences[e].text_position(position)) for module, position in layers]
        handles.append(install_stale_kv(layers, state))
    try:
        exchange = TickExchange(pipe_ranks, pipe_group)
        cond, expert_now = cond0, step_experts[0]
        for _, sends, receives, j in schedule.timeline(stage):
            exchange.post(sends, [incoming(message) for message in receives], latents.device)
            if j is None:
                continue
            i, m = items[j].step, items[j].patch
            t = job.timesteps[i]
            if step_experts[i] != expert_now:  # the last expert's items are all done here
                handles[expert_now].release_buffers()
                expert_now = step_experts[i]
            current = experts[expert_now]
            sequence = sequences[expert_now] if sequences else None
            if m is None or m == 0:  # this step's first item
                cond = current.condition(x0, job.model_timestep(t, x0.shape[0]), kwargs)
            state.mode = "fill" if m is None else "patch"
            index = None if m is None else layout.token_index(m, latents.device)
            state.index = index  # the buffer rows: the whole patch (after the all-to-all)
            # The patch's text strip (None: the whole text), held whole by every SP rank.
            text_index = None if m is None else layout.text_slice(m, text_total)
            state.text_index, state.text_tokens = text_index, text_of(m)
            mine = index  # the image tokens this rank computes
            if sequence:
                mine = sequence.share(m, state.text_tokens)
                if sequence.r > 1 and m is not None:
                    state.ring_index = sequence.ring_rows(m)
            if first:
                for done in schedule.starts_from.get(j, []):  # the last stage's result of the step before
                    result = exchange.receive(Message(done, count - 1, 0))["latents"]
                    if items[done].patch is None:
                        latents = result.clone()
                    else:
                        layout.put_latent(latents, items[done].patch, result)
                carry = current.select(current.embed(model_input(latents, t), cond), mine, text_index)
            else:
                carry = {}
                for source in sources:
                    carry.update(exchange.receive(Message(j, source, stage)))
            for unit in units:
                carry = current.run_unit(unit, carry, cond, mine, text_index)
            if not last:
                for target in targets[stage]:
                    exchange.stage(Message(j, stage, target), carry, message_spec(m, stage, target), dtype)
            else:
                gather = (lambda tokens: sequence.gather(tokens, m, state.text_tokens)) if sequence else None
                noise = guide(current.head(carry, cond, layout, m, gather), i, t)
                if m is None:
                    latents = job.step(scheduler, noise, t, latents, i, None)
                    result = latents
                else:
                    with scheduler.patch(m):
                        result = job.step(scheduler, noise, t, layout.take_latent(latents, m), i, m)
                    layout.put_latent(latents, m, result)
                if j in schedule.returns:
                    exchange.stage(Message(j, stage, 0), {"latents": result}, latent_spec(m), strip_dtype)
            if j + 1 == len(items) or items[j + 1].step != i:
                yield  # this rank's part of step i is done
        exchange.flush()
        stages.stats = {"stage": stage, "units": (units.start, units.stop), "kv_buffer_bytes": state.buffer_bytes(),
                        "sent_bytes": exchange.sent_bytes}
    finally:
        for handle in handles:
            handle.remove()
        for sequence in sequences:
            sequence.remove()
    if count > 1:
        dist.broadcast(latents, src=pipe_ranks[-1], group=pipe_group)
    return latents
