"""The distributed PipeFusion pipeline: stages on the ranks of a pipefusion group, patches across steps.

Stage s runs a contiguous range of units. After the synchronous warmup steps (whole image, every
stage waits for the previous one, the last stage sends the new latents back to stage 0), patch m of
step t flows stage 0 -> 1 -> ... -> last; the last stage applies guidance and the scheduler step to
the strip and sends the new strip back to stage 0, which starts patch m of step t+1 as soon as it
arrives, without waiting for the rest of the image. So stage s works on patch m while stage s-1
works on patch m+1.

Communication: every message is one contiguous tensor whose size both ends derive from the patch
layout and the configuration (StagedTransformer.carry_spec), never from the data. Sends are
asynchronous (isend); each stage keeps its next receives posted ahead (irecv) so a sender never
waits for the receiver to reach its receive call. Messages go to the next stage (the patch's carry:
image tokens, the patch's strip of the text stream of MM-DiT models, so the text crosses each
boundary once per step), to the mirror stage (HunyuanDiT's long skips, sent once from where they
are made to where they are used) and from the last stage to stage 0 (strips). With CFG
parallelism each CFG half runs its own pipeline; the last stages of the two gather the strip's
model output (one all-gather in the cfg group) and apply the same guidance and scheduler step.
"""
from __future__ import annotations

import time
from collections import deque
from math import prod
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from costmodel.errors import DitplanError
from executor.pipefusion.hybrid import SequenceInStage
from executor.pipefusion.job import PatchJob
from executor.pipefusion.layout import patch_problems
from executor.pipefusion.schedulers import PatchScheduler
from executor.pipefusion.stages import Carry, StagedTransformer
from executor.pipefusion.stale_kv import StaleKVState, install_stale_kv

Spec = dict[str, tuple[int, ...]]

# Receives kept posted ahead of the one being waited on: enough that the sender of the next patch
# never blocks, few enough that the buffers stay small.
RECEIVES_AHEAD = 2


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


def _pack(carry: Carry, spec: Spec) -> torch.Tensor:
    return torch.cat([carry[key].reshape(-1) for key in spec])


def _unpack(flat: torch.Tensor, spec: Spec) -> Carry:
    out, offset = {}, 0
    for key, shape in spec.items():
        n = prod(shape)
        out[key] = flat[offset:offset + n].view(shape)
        offset += n
    return out


class Inbox:
    """Receives from one peer in a fixed, known order, with the next ones posted ahead."""

    def __init__(self, src: int, group: Any, specs: Iterator[tuple[Spec, torch.dtype]], device: torch.device) -> None:
        self._src, self._group, self._specs, self._device = src, group, specs, device
        self._posted: deque[tuple[torch.Tensor, Spec, Any]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._posted) <= RECEIVES_AHEAD:
            item = next(self._specs, None)
            if item is None:
                return
            spec, dtype = item
            buffer = torch.empty(sum(prod(s) for s in spec.values()), dtype=dtype, device=self._device)
            self._posted.append((buffer, spec, dist.irecv(buffer, src=self._src, group=self._group)))

    def recv(self) -> Carry:
        buffer, spec, work = self._posted.popleft()
        work.wait()
        self._fill()
        return _unpack(buffer, spec)


class Outbox:
    def __init__(self, group: Any) -> None:
        self._group = group
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self.sent_bytes = 0

    def send(self, carry: Carry, spec: Spec, dst: int) -> None:
        for key, shape in spec.items():
            if tuple(carry[key].shape) != shape:
                raise RuntimeError(f"PipeFusion message {key!r} has shape {tuple(carry[key].shape)}, but {shape} was agreed")
        flat = _pack(carry, spec).contiguous()
        self.sent_bytes += flat.numel() * flat.element_size()
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        self._pending.append((dist.isend(flat, dst=dst, group=self._group), flat))

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []


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
        parts = [torch.empty_like(out) for _ in cfg_ranks]
        dist.all_gather(parts, out.contiguous(), group=cfg_group)
        return job.guide(torch.cat(parts), step_index, t)

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

    receives_from = sorted({src for _, src, dst in skip_routes if dst == stage and src != stage - 1} | ({stage - 1} if stage else set()))
    sends_to = sorted({dst for _, src, dst in skip_routes if src == stage and dst != stage + 1} | ({stage + 1} if not last else set()))

    def latent_spec(patch: int | None) -> Spec:
        shape = list(latents.shape)
        if patch is not None:
            strip = layout.latent_slice(patch)
            shape[-2] = strip.stop - strip.start
        return {"latents": tuple(shape)}

    def inbound(source: int) -> Iterator[tuple[Spec, torch.dtype]]:
        for i in range(steps):
            pieces: list[int | None] = [None] if i < warmup else list(range(patches))
            if not first:
                for m in pieces:
                    yield message_spec(m, source, stage), dtype
            elif count > 1 and i < steps - 1:  # the last stage's result of step i, for step i+1
                for m in pieces:
                    yield latent_spec(m), strip_dtype

    scheduler = PatchScheduler(job.scheduler, layout, tuple(latents.shape)) if last else None
    sequence = SequenceInStage(stages, units, layout, ulysses_group, ring_group) if sp > 1 else None
    layers = stages.stale_layers(units)
    if sequence:
        layers = [(module, sequence.text_position(position)) for module, position in layers]
    # Buffer rows: the image, or under Ring this rank's share of it (every patch's share, for its
    # Ulysses peers too); see hybrid.py.
    ring_degree = dist.get_world_size(ring_group) if ring_group is not None else 1
    state = StaleKVState(buffer_tokens=layout.image_tokens // ring_degree, text_buffer_tokens=text_total)
    handle = install_stale_kv(layers, state)
    try:
        sources = receives_from if not first else ([count - 1] if count > 1 else [])
        inboxes = {source: Inbox(pipe_ranks[source], pipe_group, inbound(source), latents.device) for source in sources}
        outbox = Outbox(pipe_group)
        for i, t in enumerate(job.timesteps):
            step_started = time.perf_counter()
            timestep = job.model_timestep(t, x0.shape[0])
            cond = stages.condition(x0, timestep, kwargs)
            pieces = [None] if i < warmup else list(range(patches))
            state.mode = "fill" if i < warmup else "patch"
            for m in pieces:
                index = None if m is None else layout.token_index(m)
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
                    if m is not None and i > warmup and count > 1:  # strip m of step i-1, from the last stage
                        layout.put_latent(latents, m, inboxes[count - 1].recv()["latents"])
                    carry = stages.select(stages.embed(model_input(latents, t), cond), mine, text_index)
                else:
                    carry = {}
                    for source in receives_from:
                        carry.update(inboxes[source].recv())
                for unit in units:
                    carry = stages.run_unit(unit, carry, cond, mine, text_index)
                if not last:
                    for target in sends_to:
                        outbox.send(carry, message_spec(m, stage, target), pipe_ranks[target])
                    continue
                gather = (lambda tokens: sequence.gather(tokens, m, state.text_tokens)) if sequence else None
                noise = guide(stages.head(carry, cond, layout, m, gather), i, t)
                if m is None:
                    latents = job.step(scheduler, noise, t, latents, i, None)
                    result = latents
                else:
                    with scheduler.patch(m):
                        result = job.step(scheduler, noise, t, layout.take_latent(latents, m), i, m)
                    layout.put_latent(latents, m, result)
                if count > 1 and i < steps - 1:
                    outbox.send({"latents": result}, latent_spec(m), pipe_ranks[0])
            if first and count > 1 and i < warmup and i < steps - 1:
                latents = inboxes[count - 1].recv()["latents"].clone()
            if on_step is not None:
                on_step(i, time.perf_counter() - step_started)
        outbox.flush()
        stages.stats = {"stage": stage, "units": (units.start, units.stop), "kv_buffer_bytes": state.buffer_bytes(),
                        "sent_bytes": outbox.sent_bytes}
    finally:
        handle.remove()
        if sequence:
            sequence.remove()
    if count > 1:
        dist.broadcast(latents, src=pipe_ranks[-1], group=pipe_group)
    return latents
