"""One transformer block on one rank under sequence parallelism (Ulysses, Ring, USP): its compute,
its exposed communication by link tier, and the per-step work outside the blocks.

- Ulysses: four all-to-alls per attention layer (q, k, v in; output back), not overlapped; text
  tokens of joint attention stay on every rank (each rank projects all of them), except Flux's
  without PipeFusion, which the executor splits over the SP ranks like the image when they divide.
- Ring: r-1 point-to-point hops of the local K/V per attention layer, each hidden behind the
  attention of the block in hand and its fold into the running output (the exact log-sum-exp merge,
  elementwise in fp32; the first block's fold is only its upcast, as it starts the running output).
- USP: Ulysses inside groups of u, ring across groups of r.
- Linear attention (SANA): a rank attends its own tokens through the key-value summary of all of them;
  Ring passes each rank's fp32 summary ((head_dim + 1) x head_dim per local head) around the ring
  instead of K and V, r-1 hops that the summary sum waits for (each rank adds the r summaries in ring
  order, so every rank holds the same sum); Ulysses splits heads as usual.
- SANA's MLP convolves over the token grid (a 3x3 depthwise convolution), and SP splits the tokens by
  whole rows: at every block each rank gathers every rank's first and last row of the MLP input (the
  halo its neighbours read), over the Ulysses group and then the ring, before the MLP runs.
- Latte's spatial blocks attend within each frame; its temporal blocks across frames at each
  position, which SP (splitting positions) leaves without communication.
- PipeFusion's patch steps keep every attention layer's full K/V in buffers: each patch writes its
  fresh rows in, and joint attention then concatenates the image buffer with the text buffer into
  the K/V it attends to, a copy of the whole buffer per patch that cross-attention blocks (whose
  buffer is attended as it is) do not make.
"""
from __future__ import annotations

from dataclasses import dataclass

from costmodel import compute
from costmodel.flops import GLU_CONV_FAMILIES, BlockWork, text_output
from costmodel.sim_setup import Setup, latent_bytes

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
# The first block folded in becomes the running output: only its upcast to fp32 (1.5 passes).
RING_FIRST_FOLD_PASSES = 1.5
# Host operators per ring hop of a linear-attention summary: the batched isend/irecv + wait (~3) and
# the add into the running sum (1).
RING_SUMMARY_OPS = 4
# Token rows of the MLP input each SP rank contributes to the halo exchange of a convolutional MLP
# (SANA): its first and its last, which the 3x3 convolutions of the ranks above and below it read.
MLP_HALO_ROWS = 2
# Host operators of that exchange: the two edge rows' concatenation, the all-gather over each axis,
# the halo's concatenation before the MLP and the crop after it.
MLP_HALO_OPS = 6
# Passes of the stale-K/V buffers per patch (PipeFusion): K and V of the fresh rows copied in (read +
# write), and for joint attention K and V of the whole buffer and text concatenated (read + write).
STALE_KV_PUT_PASSES = 4.0
STALE_KV_CAT_PASSES = 4.0


@dataclass
class BlockCost:
    compute: float  # seconds the GPU computes (includes ring hops hidden behind attention)
    comm: float  # exposed communication seconds
    tiers: dict[str, float]


def block_cost(st: Setup, kind: str, image_tokens: int, text_tokens: int, skip_linear: bool,
                text_split: bool = False, stale_kv: bool = False, carries_text: bool = True) -> BlockCost:
    """One block for `image_tokens` local image tokens per sample (S/sp, or a PipeFusion patch's share)
    and `text_tokens` local text tokens of joint attention (all of them, a patch's share, or with
    `text_split` this rank's T/sp, which then travel with the image tokens as one joint chunk);
    `stale_kv`: a PipeFusion patch step, attending the full K/V buffers; `carries_text`: False for
    a joint block whose text only enters its attention (`costmodel.flops.text_output`)."""
    model, cluster, config = st.model, st.cluster, st.config
    u, r = config.ulysses, config.ring
    b = model.dtype_bytes
    h = model.hidden_size
    text_rows = text_tokens if kind in ("joint", "single") else 0
    tiers: dict[str, float] = {}
    comm = 0.0
    if kind == "temporal":
        # SP splits spatial positions, so every rank holds whole frame sequences: no communication.
        positions = max(1, image_tokens // max(1, st.frames_tokens))
        work = BlockWork(kind, st.batch, image_tokens, 0, st.frames_tokens, st.frames_tokens, 1.0,
                         attn_groups=positions)
        return BlockCost(compute.block_seconds(cluster, model, work), 0.0, tiers)
    # After Ulysses' all-to-all a rank holds its ring shard of the queries for heads/u heads: the image
    # tokens plus the whole text, or with a split text the joint chunk (text and image) of its group.
    shard_rows = image_tokens + (text_rows if text_split else 0)  # what the all-to-all and ring hops carry
    held_text = 0 if text_split else text_rows  # text queries held outside the split (sliced by heads)
    text_keys = 0 if text_split else st.text  # the text keys every rank holds, attended once
    full_keys = st.tokens + st.text
    queries = shard_rows * u + held_text
    # Latte's spatial blocks attend within each frame: one sequence per frame, of that frame's tokens.
    groups = st.frames_tokens if model.has_temporal_blocks else 1
    work = BlockWork(kind, st.batch, image_tokens, text_rows, max(1, queries // groups), max(1, full_keys // groups),
                     1.0 / u, skip_linear, attn_groups=groups, text_output=carries_text)
    hw = cluster.hardware
    attention = None
    extra_gpu = 0.0
    extra_ops = 0
    if r > 1 and model.linear_attention:
        # The rank's queries are its own ring shard; the summaries of the others arrive by r-1 hops.
        work = BlockWork(kind, st.batch, image_tokens, text_rows, queries, queries, 1.0 / u, skip_linear,
                         text_output=carries_text)
        summary_bytes = st.batch * (model.num_heads / u) * (model.head_dim + 1) * model.head_dim * 4
        hop, tier = cluster.comm_time("p2p", st.groups["ring"], summary_bytes)
        comm += (r - 1) * hop
        tiers[tier] = tiers.get(tier, 0.0) + (r - 1) * hop
        extra_ops += r * RING_SUMMARY_OPS
    elif r > 1:
        batch_heads = st.batch * model.num_heads / u * groups
        group_queries = max(1, queries // groups)
        chunk_keys = max(1, (full_keys - text_keys) // (r * groups))
        chunk = compute.attention_seconds(hw, batch_heads, group_queries, chunk_keys, model.head_dim)
        text_part = compute.attention_seconds(hw, batch_heads, group_queries, text_keys, model.head_dim) if text_keys else 0.0
        out_bytes = st.batch * queries * (h / u) * 4  # the fp32 running output
        merge = compute.elementwise_seconds(hw, RING_MERGE_PASSES * out_bytes, out_bytes)
        # Without text keys (folded in first) the local block starts the running output: an upcast.
        first_fold = merge if text_keys else compute.elementwise_seconds(hw, RING_FIRST_FOLD_PASSES * out_bytes, out_bytes)
        hop_bytes = 2.0 * st.batch * shard_rows * h * b  # K and V of the local shard for the local heads
        hop, tier = cluster.comm_time("p2p", st.groups["ring"], hop_bytes)
        # Each hop (async isend/irecv) runs while the block in hand is attended and folded in.
        exposed = max(0.0, hop - (chunk + first_fold)) + (r - 2) * max(0.0, hop - (chunk + merge))
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
    if stale_kv:
        head_share = h / u * b * st.batch
        fresh = shard_rows * u + held_text  # this patch's rows of the buffer, all of them after Ulysses
        extra_gpu += compute.elementwise_seconds(hw, STALE_KV_PUT_PASSES * fresh * head_share, fresh * head_share)
        if text_keys:
            buffer = (st.tokens // r + st.text) * head_share
            extra_gpu += compute.elementwise_seconds(hw, STALE_KV_CAT_PASSES * buffer, buffer)
    if model.family in GLU_CONV_FAMILIES and config.sp > 1:
        row_bytes = st.batch * model.token_grid(st.height, st.width, st.frames)[2] * h * b
        # Over the Ulysses group each rank gives its two rows; over the ring, its group's 2u rows.
        for axis, rows in (("ulysses", MLP_HALO_ROWS), ("ring", MLP_HALO_ROWS * u)):
            seconds, tier = cluster.comm_time("all_gather", st.groups[axis], rows * row_bytes)
            comm += seconds
            tiers[tier] = tiers.get(tier, 0.0) + seconds
        extra_ops += MLP_HALO_OPS
    gpu, host = compute.block_gpu_host(cluster, model, work, attention, extra_gpu, extra_ops)
    # Collectives run on the GPU's stream: while the host is still issuing the block's operators they
    # cost nothing extra; only what exceeds the host's time is exposed.
    busy = max(gpu, host)
    exposed = max(gpu + comm, host) - busy
    if comm > 0:
        tiers = {tier: seconds * exposed / comm for tier, seconds in tiers.items()}
    return BlockCost(busy, exposed, tiers)


def sequence_cost(st: Setup, blocks: list[tuple[int, str]], image_tokens: int, text_tokens: int,
                   text_split: bool = False, stale_kv: bool = False) -> BlockCost:
    """Sum of `_block_cost` over (block index, kind) pairs, computing each distinct block once."""
    counts: dict[tuple[str, bool, bool], int] = {}
    half = st.model.num_blocks // 2
    for index, kind in blocks:
        key = (kind, st.model.skip_connections and index > half, text_output(st.model, index, kind))
        counts[key] = counts.get(key, 0) + 1
    total = BlockCost(0.0, 0.0, {})
    for (kind, skip, carries_text), count in counts.items():
        cost = block_cost(st, kind, image_tokens, text_tokens, skip, text_split, stale_kv, carries_text)
        total.compute += count * cost.compute
        total.comm += count * cost.comm
        for tier, seconds in cost.tiers.items():
            total.tiers[tier] = total.tiers.get(tier, 0.0) + count * seconds
    return total


def step_extras(st: Setup) -> tuple[float, float, dict[str, float]]:
    """(compute, exposed comm, tiers) per step outside the blocks: embeddings, output gathers, guidance."""
    cluster = st.cluster
    host = STEP_KERNELS * cluster.host_op_us * 1e-6
    tiers: dict[str, float] = {}
    comm = 0.0
    if st.config.sp > 1:
        seconds, tier = cluster.comm_time("all_gather", st.groups["sp"], latent_bytes(st, st.tokens // st.config.sp))
        comm += seconds
        tiers[tier] = tiers.get(tier, 0.0) + seconds
    if st.config.cfg > 1:
        seconds, tier = cluster.comm_time("all_gather", st.groups["cfg"], latent_bytes(st, st.tokens // st.config.sp))
        comm += seconds
        tiers[tier] = tiers.get(tier, 0.0) + seconds
    return host, comm, tiers
