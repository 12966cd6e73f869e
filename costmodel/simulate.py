"""The simulator: predicted latency, memory and timeline of one configuration on one cluster.

Method models (MECHANICS.md):
- CFG: each half of the guidance batch on its own ranks; one all-gather of the noise prediction per step.
- DP: replicas on other prompts; no communication, but their groups share links with ours.
- Ulysses: four all-to-alls per attention layer (q, k, v in; output back), not overlapped; text
  tokens of joint attention stay on every rank (each rank projects all of them), except Flux's
  without PipeFusion, which the executor splits over the SP ranks like the image when they divide.
- Ring: r-1 point-to-point hops of the local K/V per attention layer, each hidden behind the
  attention of the previous block only (plus the exact log-sum-exp merge, elementwise in fp32).
- USP: Ulysses inside groups of u, ring across groups of r.
- PipeFusion: an event simulation of patches x stages x steps: synchronous full-image warmup steps,
  then the patch pipeline with cross-step pipelining (stage 0 starts patch m of step t+1 once the last
  stage has sent back patch m of step t), asynchronous sends queued per sender, the MM-DiT text
  stream split into strips with the patches, and HunyuanDiT's long skips relayed to the mirror stage.
`latency_s` is the denoising loop; `end_to_end_s` adds text encoding, the VAE decode and the transfers
between them (costmodel.pipeline_stages).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from costmodel import compute
from costmodel.compute import BlockWork
from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from costmodel.pipeline_stages import memory_note, price_stages
from costmodel.rules import ensure_valid_config
from costmodel.specs import ModelSpec, load_model
from costmodel.topology import Cluster, load_cluster

GIB = 2**30
# CUDA context, cuBLAS workspaces, NCCL buffers and the caching allocator's fragmentation: about
# 1.5 GiB per process (nvidia-smi shows ~0.5 GiB for an idle context, NCCL ~0.3 GiB per communicator).
RUNTIME_OVERHEAD_GIB = 1.5
# Peak live slabs of one block beyond its input: q, k, v, attention output and the residual/norm
# copies (7), plus the MLP activation (mlp_ratio slabs).
ACTIVATION_SLABS = 7.0
# Operators per step outside the blocks: time embedding, patch embedding, final norm/projection,
# unpatchify, guidance combine and the scheduler's update (counted from diffusers' pipelines).
STEP_KERNELS = 60
# Ulysses reshapes q, k, v and the output into contiguous [rank, heads/u, tokens, d] blocks before
# each all-to-all and back after it: 4 tensors x 2 copies x 2 passes (read + write) of the local slab.
ULYSSES_LAYOUT_PASSES = 16.0
# Host operators Ulysses adds per attention layer: 4 tensors x (reshape/transpose/contiguous before,
# reshape after) = 16, plus slicing the text q/k/v by heads and concatenating them for joint attention (6).
ULYSSES_OPS = 16
ULYSSES_TEXT_OPS = 6
# Host operators ring attention adds per block it attends (yunchang-style loop): the flash-attention
# call with its LSE, the fp32 merge (upcast, transpose, sigmoid, sub, mul, sub, logsigmoid: ~8) and
# the batched isend/irecv + wait (~3); joint attention appends the text K/V once (~4).
RING_OPS_PER_BLOCK = 12
RING_TEXT_OPS = 4
# The exact fp32 log-sum-exp merge after each block (ring-flash-attention's update_out_and_lse), in
# passes of the fp32 running output: upcast the block's output 1.5, (out - block_out) 3,
# sigmoid(lse diff) x (...) 2, out - (...) 3, and the final downcast 0.5.
RING_MERGE_PASSES = 10.0
# Families whose joint text the executor splits over the SP ranks (executor/sp, `_install_flux`) when
# the text token count divides by sp and there is no PipeFusion; the others keep it whole per rank.
TEXT_SPLIT_FAMILIES = ("flux",)


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
            "feasible": self.feasible, "reason": self.reason, "breakdown": dict(self.breakdown),
            "comm_by_tier": dict(self.comm_by_tier), "memory": dict(self.memory),
            "text_encode_s": self.text_encode_s, "vae_decode_s": self.vae_decode_s,
            "end_to_end_s": self.end_to_end_s, "stages": dict(self.stages),
        }


@dataclass
class _Setup:
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


def _groups(placement: Placement, axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Groups of ranks that share every coordinate except `axes` (ordered by rank)."""
    config = placement.config  # the groups depend on the degrees only: cache without patches/warmup
    degrees = ParallelConfig(cfg=config.cfg, ulysses=config.ulysses, ring=config.ring,
                             pipefusion=config.pipefusion, dp=config.dp)
    return _groups_cached(degrees, placement.order, axes)


@lru_cache(maxsize=4096)
def _groups_cached(config: ParallelConfig, order: tuple[str, ...], axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    # Arithmetic on rank strides (rank = sum of coordinate x stride) rather than a coordinate lookup
    # per rank: the planner builds these for thousands of placements of up to 1024 ranks. Groups come
    # in increasing order of their lowest rank; members ordered by the last axis's coordinate first.
    strides: dict[str, int] = {}
    world = 1
    for axis in order:
        strides[axis] = world
        world *= config.degree(axis)
    offsets = [0]
    for axis in reversed(axes):
        offsets = [offset + c * strides[axis] for offset in offsets for c in range(config.degree(axis))]
    bases = [0]
    for axis in reversed(order):  # the other axes, innermost varying fastest: bases ascend
        if axis not in axes:
            bases = [base + c * strides[axis] for base in bases for c in range(config.degree(axis))]
    return tuple(tuple(base + offset for offset in offsets) for base in bases)


def _setup(model: Any, cluster: Any, config: Any, height: int | None, width: int | None, frames: int | None,
           steps: int | None, placement: Any) -> _Setup:
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
    setup = _Setup(
        model=model, cluster=cluster, config=config, placement=placement, height=height, width=width,
        frames=frames, steps=steps, tokens=model.image_tokens(height, width, frames),
        text=model.text_tokens if model.text_joins_attention else 0,
        batch=max(1, total_batch // config.cfg), frames_tokens=model.token_grid(height, width, frames)[0],
    )
    for name, axes in (("ulysses", ("ulysses",)), ("ring", ("ring",)), ("sp", ("ulysses", "ring")),
                       ("cfg", ("cfg",)), ("pipefusion", ("pipefusion",))):
        setup.groups[name] = _groups(placement, axes)
    return setup


# ------------------------------------------------------------------ one block on one rank

@dataclass
class _BlockCost:
    compute: float  # seconds the GPU computes (includes ring hops hidden behind attention)
    comm: float  # exposed communication seconds
    tiers: dict[str, float]


def _block_cost(st: _Setup, kind: str, image_tokens: int, text_tokens: int, skip_linear: bool,
                text_split: bool = False) -> _BlockCost:
    """One block for `image_tokens` local image tokens per sample (S/sp, or a PipeFusion patch's share)
    and `text_tokens` local text tokens of joint attention (all of them, a patch's share, or with
    `text_split` this rank's T/sp, which then travel with the image tokens as one joint chunk)."""
    model, cluster, config = st.model, st.cluster, st.config
    u, r = config.ulysses, config.ring
    b = model.dtype_bytes
    h = model.hidden_size
    text_rows = text_tokens if kind in ("joint", "single") else 0
    tiers: dict[str, float] = {}
    comm = 0.0
    if kind == "temporal":
        # SP splits spatial positions, so every rank holds whole frame sequences: no communication.
        work = BlockWork(kind, st.batch, image_tokens, 0, st.frames_tokens, st.frames_tokens, 1.0)
        positions = max(1, image_tokens // max(1, st.frames_tokens))
        attn = compute.attention_seconds(cluster.hardware, st.batch * model.num_heads * positions,
                                         st.frames_tokens, st.frames_tokens, model.head_dim)
        return _BlockCost(compute.block_seconds(cluster, model, work, attention=attn), 0.0, tiers)
    # After Ulysses' all-to-all a rank holds its ring shard of the queries for heads/u heads: the image
    # tokens plus the whole text, or with a split text the joint chunk (text and image) of its group.
    shard_rows = image_tokens + (text_rows if text_split else 0)  # what the all-to-all and ring hops carry
    held_text = 0 if text_split else text_rows  # text queries held outside the split (sliced by heads)
    text_keys = 0 if text_split else st.text  # the text keys every rank holds, attended once
    full_keys = st.tokens + st.text
    queries = shard_rows * u + held_text
    work = BlockWork(kind, st.batch, image_tokens, text_rows, queries, full_keys, 1.0 / u, skip_linear)
    hw = cluster.hardware
    attention = None
    extra_gpu = 0.0
    extra_ops = 0
    if r > 1:
        batch_heads = st.batch * model.num_heads / u
        chunk = compute.attention_seconds(hw, batch_heads, queries, max(1, (full_keys - text_keys) // r), model.head_dim)
        text_part = compute.attention_seconds(hw, batch_heads, queries, text_keys, model.head_dim) if text_keys else 0.0
        out_bytes = st.batch * queries * (h / u) * 4  # the fp32 running output
        merge = compute.elementwise_seconds(hw, RING_MERGE_PASSES * out_bytes, out_bytes)
        hop_bytes = 2.0 * st.batch * shard_rows * h * b  # K and V of the local shard for the local heads
        hop, tier = cluster.comm_time("p2p", st.groups["ring"], hop_bytes)
        # Each hop runs while the previous block's attention and merge compute (async isend/irecv).
        exposed = (r - 1) * max(0.0, hop - (chunk + merge))
        attention = text_part + r * chunk + (r - 1) * merge
        extra_ops += r * RING_OPS_PER_BLOCK + (RING_TEXT_OPS if held_text else 0)
        if exposed > 0:
            comm += exposed
            tiers[tier] = tiers.get(tier, 0.0) + exposed
    if u > 1:
        slab = st.batch * shard_rows * h * b
        a2a, tier = cluster.comm_time("all_to_all", st.groups["ulysses"], slab)
        extra_gpu += compute.elementwise_seconds(hw, ULYSSES_LAYOUT_PASSES * slab, slab)
        extra_ops += ULYSSES_OPS + (ULYSSES_TEXT_OPS if held_text else 0)
        comm += 4 * a2a
        tiers[tier] = tiers.get(tier, 0.0) + 4 * a2a
    gpu, host = compute.block_gpu_host(cluster, model, work, attention, extra_gpu, extra_ops)
    # Collectives run on the GPU's stream: while the host is still issuing the block's operators they
    # cost nothing extra; only what exceeds the host's time is exposed.
    busy = max(gpu, host)
    exposed = max(gpu + comm, host) - busy
    if comm > 0:
        tiers = {tier: seconds * exposed / comm for tier, seconds in tiers.items()}
    return _BlockCost(busy, exposed, tiers)


def _sequence_cost(st: _Setup, blocks: list[tuple[int, str]], image_tokens: int, text_tokens: int,
                   text_split: bool = False) -> _BlockCost:
    """Sum of `_block_cost` over (block index, kind) pairs, computing each distinct block once."""
    counts: dict[tuple[str, bool], int] = {}
    half = st.model.num_blocks // 2
    for index, kind in blocks:
        key = (kind, st.model.skip_connections and index > half)
        counts[key] = counts.get(key, 0) + 1
    total = _BlockCost(0.0, 0.0, {})
    for (kind, skip), count in counts.items():
        cost = _block_cost(st, kind, image_tokens, text_tokens, skip, text_split)
        total.compute += count * cost.compute
        total.comm += count * cost.comm
        for tier, seconds in cost.tiers.items():
            total.tiers[tier] = total.tiers.get(tier, 0.0) + count * seconds
    return total


def _latent_bytes(st: _Setup, image_tokens: int) -> float:
    """Bytes of the latent (noise prediction) that `image_tokens` tokens cover, per rank's batch."""
    m = st.model
    return st.batch * image_tokens * m.patch_size**2 * m.temporal_patch_size * m.vae_latent_channels * m.dtype_bytes


def _step_extras(st: _Setup) -> tuple[float, float, dict[str, float]]:
    """(compute, exposed comm, tiers) per step outside the blocks: embeddings, output gathers, guidance."""
    cluster = st.cluster
    host = STEP_KERNELS * cluster.host_op_us * 1e-6
    tiers: dict[str, float] = {}
    comm = 0.0
    if st.config.sp > 1:
        seconds, tier = cluster.comm_time("all_gather", st.groups["sp"], _latent_bytes(st, st.tokens // st.config.sp))
        comm += seconds
        tiers[tier] = tiers.get(tier, 0.0) + seconds
    if st.config.cfg > 1:
        seconds, tier = cluster.comm_time("all_gather", st.groups["cfg"], _latent_bytes(st, st.tokens // st.config.sp))
        comm += seconds
        tiers[tier] = tiers.get(tier, 0.0) + seconds
    return host, comm, tiers


# ------------------------------------------------------------------ PipeFusion

def _stages(st: _Setup) -> list[list[tuple[int, str]]]:
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


class _Transfers:
    """Point-to-point costs between pipefusion stages (every SP/CFG/DP replica sends at once)."""

    def __init__(self, st: _Setup) -> None:
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


def _pipefusion(st: _Setup, trace: list | None) -> dict[str, Any]:
    config, model = st.config, st.model
    p, M, sp = config.pipefusion, config.patches, config.sp
    b, h = model.dtype_bytes, model.hidden_size
    stages = _stages(st)
    transfers = _Transfers(st)
    host, extra_comm, extra_tiers = _step_extras(st)
    full_tokens = st.tokens // sp
    patch_tokens = max(1, st.tokens // (M * sp))
    # Stage durations: full image (warmup) and per patch. The MM-DiT text stream is split into strips
    # like the image, so each patch carries T/M text tokens and the text runs once per step in total.
    patch_text = -(-st.text // M)
    full = [_sequence_cost(st, blocks, full_tokens, st.text) for blocks in stages]
    patch = [_sequence_cost(st, blocks, patch_tokens, patch_text) for blocks in stages]
    per_patch_extra = (host + extra_comm) / M
    durations = [[patch[s].compute + patch[s].comm + (per_patch_extra if s == p - 1 else 0.0) for _ in range(M)]
                 for s in range(p)]
    # Messages each stage sends per patch: the hidden states (with the patch's text strip) to the next
    # stage and the latent strip from the last stage back to stage 0. HunyuanDiT's long skips (block
    # i's output feeds block L-1-i) ride along: stages only talk to their neighbour, so a skip is
    # relayed across every boundary between its source stage and its target stage.
    stage_of = {index: s for s, blocks in enumerate(stages) for index, _ in blocks}
    slab = st.batch * patch_tokens * h * b
    text_slab = st.batch * st.text * h * b
    patch_text_slab = st.batch * patch_text * h * b
    relayed = [0] * p  # skips crossing the boundary s -> s+1
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
            out.append((0, _latent_bytes(st, patch_tokens)))
        messages.append(out)

    # Warmup: synchronous full-image steps through the stages in turn.
    warm_step = sum(cost.compute + cost.comm for cost in full) + host + extra_comm
    if p > 1:
        warm_step += sum(transfers.seconds(s, s + 1, st.batch * full_tokens * h * b * (1 + relayed[s]) + text_slab)
                         for s in range(p - 1))
        warm_step += transfers.seconds(p - 1, 0, _latent_bytes(st, full_tokens))
    warmup_steps = min(config.warmup, st.steps)
    warmup_s = warmup_steps * warm_step
    if trace is not None:
        _trace_warmup(st, trace, full, stages, warmup_steps, warm_step)

    # Patch pipeline.
    stage_free = [warmup_s] * p
    send_free = [warmup_s] * p
    busy = [0.0] * p
    back = [warmup_s] * M
    end = warmup_s
    ranks_of = [[g[s] for g in st.groups["pipefusion"]] for s in range(p)]
    for t in range(warmup_steps, st.steps):
        for m in range(M):
            need = [0.0] * p
            need[0] = back[m]
            for s in range(p):
                start = stage_free[s] if stage_free[s] > need[s] else need[s]
                finish = start + durations[s][m]
                if trace is not None:
                    _trace_patch(trace, ranks_of[s], stage_free[s], start, finish, t, m, s)
                stage_free[s] = finish
                busy[s] += durations[s][m]
                for target, nbytes in messages[s]:
                    send_start = finish if finish > send_free[s] else send_free[s]
                    arrival = send_start + transfers.seconds(s, target, nbytes)
                    send_free[s] = arrival
                    if trace is not None:
                        for rank in ranks_of[s]:
                            trace.append(_event(f"send to stage {target}", "communication", rank, 1, send_start, arrival))
                    if target == 0:
                        back[m] = arrival
                    else:
                        need[target] = arrival
                if p == 1:
                    back[m] = finish  # one process: the next step's patch m waits only for this one
                end = max(end, finish)
    pipelined = st.steps - warmup_steps
    pipeline_s = end - warmup_s
    bottleneck = max(range(p), key=lambda s: busy[s])
    bottleneck_comm = (patch[bottleneck].comm + (extra_comm / M if bottleneck == p - 1 else 0.0)) * M * pipelined
    tiers: dict[str, float] = {}
    for tier, seconds in patch[bottleneck].tiers.items():
        tiers[tier] = tiers.get(tier, 0.0) + seconds * M * pipelined
    if bottleneck == p - 1:
        for tier, seconds in extra_tiers.items():
            tiers[tier] = tiers.get(tier, 0.0) + seconds * pipelined
    breakdown = {
        "warmup_s": warmup_s,
        "compute_s": busy[bottleneck] - bottleneck_comm,
        "communication_s": bottleneck_comm,
        "bubble_s": max(0.0, pipeline_s - busy[bottleneck]),
    }
    per_step = pipeline_s / pipelined if pipelined else warm_step
    return {"latency": warmup_s + pipeline_s, "breakdown": breakdown, "per_step": per_step, "tiers": tiers,
            "stages": stages}


def _event(name: str, category: str, rank: int, track: int, start: float, finish: float, **args: Any) -> dict[str, Any]:
    return {"name": name, "cat": category, "ph": "X", "pid": rank, "tid": track, "ts": start * 1e6,
            "dur": max(0.0, finish - start) * 1e6, "args": args}


def _trace_patch(trace: list, ranks: list[int], free: float, start: float, finish: float, t: int, m: int, s: int) -> None:
    for rank in ranks:
        if start > free + 1e-12:
            trace.append(_event("waiting", "waiting", rank, 0, free, start))
        trace.append(_event(f"step {t} patch {m}", "compute", rank, 0, start, finish, step=t, patch=m, stage=s))


def _trace_warmup(st: _Setup, trace: list, full: list, stages: list, warmup_steps: int, warm_step: float) -> None:
    for t in range(warmup_steps):
        clock = t * warm_step
        for s, cost in enumerate(full):
            for g in st.groups["pipefusion"]:
                trace.append(_event(f"warmup step {t}", "compute", g[s], 0, clock, clock + cost.compute, step=t, stage=s))
                if cost.comm:
                    trace.append(_event("sequence-parallel communication", "communication", g[s], 1,
                                        clock + cost.compute, clock + cost.compute + cost.comm))
            clock += cost.compute + cost.comm


# ------------------------------------------------------------------ memory, encoders, VAE

def _memory(st: _Setup, stages: list | None) -> dict[str, float]:
    """Per-GPU memory (GiB) by part; `stages` is the PipeFusion split (None without PipeFusion)."""
    model, config = st.model, st.config
    b, h = model.dtype_bytes, model.hidden_size
    L = model.num_blocks
    own_blocks = max(len(blocks) for blocks in stages) if stages else L
    params = model.params * b * own_blocks / L
    # xDiT keeps the whole pipeline (text encoders, VAE) on every rank.
    encoders = (model.encoder_params + model.vae_params) * b
    local = st.tokens // config.sp
    # Activations: the largest block input a rank holds (the full image in warmup steps or without
    # patches), ACTIVATION_SLABS + mlp_ratio slabs of it live at the peak of a block.
    rows = st.batch * (local + (st.text // config.sp if _text_split(st) else st.text))
    activations = rows * h * b * (ACTIVATION_SLABS + model.mlp_ratio)
    if model.skip_connections:
        activations += (L // 2 - 1) * st.batch * local * h * b  # long-skip outputs held until the mirror block
    kv = 0.0
    if config.uses_patches:
        # Stale K/V of the whole sequence for this rank's heads, in every attention layer it holds.
        layers = max(sum(1 for _, kind in blocks if kind != "temporal") for blocks in stages) if stages else L
        kv = layers * 2.0 * st.batch * (st.tokens + st.text) * h * b / config.sp
    return {
        "params_gib": params / GIB,
        "encoders_vae_gib": encoders / GIB,
        "activations_gib": activations / GIB,
        "kv_buffers_gib": kv / GIB,
        "runtime_gib": RUNTIME_OVERHEAD_GIB,
    }


# ------------------------------------------------------------------ public entry points

def _text_split(st: _Setup) -> bool:
    """Whether the executor splits the joint text over the SP ranks in this configuration."""
    config = st.config
    return (st.model.family in TEXT_SPLIT_FAMILIES and st.text > 0 and config.sp > 1 and st.text % config.sp == 0
            and config.pipefusion == 1 and not config.uses_patches)


def _non_pipeline(st: _Setup, trace: list | None) -> dict[str, Any]:
    blocks = list(enumerate(st.model.block_sequence))
    split = _text_split(st)
    cost = _sequence_cost(st, blocks, st.tokens // st.config.sp, st.text // st.config.sp if split else st.text, split)
    host, extra_comm, extra_tiers = _step_extras(st)
    step_compute = cost.compute + host
    step_comm = cost.comm + extra_comm
    per_step = step_compute + step_comm
    tiers = {tier: seconds * st.steps for tier, seconds in cost.tiers.items()}
    for tier, seconds in extra_tiers.items():
        tiers[tier] = tiers.get(tier, 0.0) + seconds * st.steps
    if trace is not None:
        for rank in range(st.config.world_size):
            for t in range(st.steps):
                start = t * per_step
                trace.append(_event(f"step {t}", "compute", rank, 0, start, start + step_compute, step=t))
                if step_comm:
                    trace.append(_event(f"step {t} communication", "communication", rank, 1,
                                        start + step_compute, start + per_step, step=t))
    return {
        "latency": per_step * st.steps,
        "breakdown": {"compute_s": step_compute * st.steps, "communication_s": step_comm * st.steps},
        "per_step": per_step, "tiers": tiers, "stages": None,
    }


def _result(st: _Setup, core: dict[str, Any], trace: list | None) -> SimResult:
    memory = _memory(st, core["stages"])
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
        text_encode_s=stages.text_encode_s, vae_decode_s=stages.vae_decode_s, trace=trace,
        end_to_end_s=stages.end_to_end_s(core["latency"]), stages=stages.to_dict(),
    )


def simulate(model: Any, cluster: Any, config: Any, height: int | None = None, width: int | None = None,
             frames: int | None = None, steps: int | None = None, placement: Any = None,
             trace: bool = False) -> SimResult:
    """Predict one configuration; a configuration that breaks a rule raises DitplanError naming each rule."""
    st = _setup(model, cluster, config, height, width, frames, steps, placement)
    events: list | None = [] if trace else None
    if st.config.pipefusion > 1 or st.config.uses_patches:
        core = _pipefusion(st, events)
    else:
        core = _non_pipeline(st, events)
    if events is not None:
        for rank in range(st.config.world_size):
            events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}})
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "communication"}})
    return _result(st, core, events)


def estimate(model: Any, cluster: Any, config: Any, height: int | None = None, width: int | None = None,
             frames: int | None = None, steps: int | None = None, placement: Any = None,
             trace: bool = False) -> SimResult:
    """Closed form of `simulate`: PipeFusion as fill + steady state instead of an event simulation.

    Cheap for any GPU count; within a few percent of `simulate` where the pipeline is balanced.
    """
    st = _setup(model, cluster, config, height, width, frames, steps, placement)
    if not (st.config.pipefusion > 1 or st.config.uses_patches):
        return _result(st, _non_pipeline(st, None), None)
    config, model = st.config, st.model
    p, M, sp = config.pipefusion, config.patches, config.sp
    stages = _stages(st)
    host, extra_comm, _ = _step_extras(st)
    patch_tokens = max(1, st.tokens // (M * sp))
    full_tokens = st.tokens // sp
    full = [_sequence_cost(st, blocks, full_tokens, st.text) for blocks in stages]
    patch = [_sequence_cost(st, blocks, patch_tokens, -(-st.text // M)) for blocks in stages]
    transfers = _Transfers(st)
    slab = st.batch * patch_tokens * model.hidden_size * model.dtype_bytes
    hop = max((transfers.seconds(s, s + 1, slab) for s in range(p - 1)), default=0.0)
    per_patch = [c.compute + c.comm for c in patch]
    per_patch[-1] += (host + extra_comm) / M
    cycle = sum(per_patch) + p * hop  # one patch around the stage ring
    per_step = max(M * max(per_patch), cycle)
    warm_step = sum(c.compute + c.comm for c in full) + host + extra_comm + (p - 1) * hop * M
    warmup_steps = min(config.warmup, st.steps)
    pipelined = st.steps - warmup_steps
    pipeline_s = (cycle - max(per_patch) + per_step * pipelined) if pipelined else 0.0
    busy = max(per_patch) * M * pipelined
    core = {
        "latency": warmup_steps * warm_step + pipeline_s,
        "breakdown": {"warmup_s": warmup_steps * warm_step, "compute_s": min(busy, pipeline_s),
                      "communication_s": 0.0, "bubble_s": max(0.0, pipeline_s - busy)},
        "per_step": per_step if pipelined else warm_step, "tiers": {}, "stages": stages,
    }
    return _result(st, core, None)
