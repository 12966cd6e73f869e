"""Per-GPU memory of one configuration: weights, encoders and VAE, activations, stale K/V buffers
and the runtime's own."""
from __future__ import annotations

from costmodel.sim_setup import Setup, text_split

GIB = 2**30
# CUDA context, cuBLAS workspaces, NCCL buffers and the caching allocator's fragmentation: about
# 1.5 GiB per process (nvidia-smi shows ~0.5 GiB for an idle context, NCCL ~0.3 GiB per communicator).
RUNTIME_OVERHEAD_GIB = 1.5
# Peak live slabs of one block beyond its input: q, k, v, attention output and the residual/norm
# copies (7), plus the MLP activation (mlp_ratio slabs).
ACTIVATION_SLABS = 7.0


def memory_gib(st: Setup, stages: list | None) -> dict[str, float]:
    """Per-GPU memory (GiB) by part; `stages` is the PipeFusion split (None without PipeFusion)."""
    model, config = st.model, st.config
    b, h = model.dtype_bytes, model.hidden_size
    L = model.num_blocks
    own_blocks = max(len(blocks) for blocks in stages) if stages else L
    # Every expert stays resident (Wan 2.2 A14B swaps them at a boundary step); a stage holds its blocks of each.
    params = model.resident_params * b * own_blocks / L
    # xDiT keeps the whole pipeline (text encoders, VAE) on every rank.
    encoders = (model.encoder_params + model.vae_params) * b
    local = st.tokens // config.sp
    # Activations: the largest block input a rank holds (the full image in warmup steps or without
    # patches), ACTIVATION_SLABS + mlp_ratio slabs of it live at the peak of a block.
    rows = st.batch * (local + (st.text // config.sp if text_split(st) else st.text))
    activations = rows * h * b * (ACTIVATION_SLABS + model.mlp_ratio)
    if model.skip_connections:
        activations += (L // 2 - 1) * st.batch * local * h * b  # long-skip outputs held until the mirror block
    kv = 0.0
    if config.uses_patches:
        # Stale K/V of the whole sequence for this rank's heads, in every attention layer it holds
        # (of one expert: the executor drops the first expert's buffers when the second takes over).
        layers = max(sum(1 for _, kind in blocks if kind != "temporal") for blocks in stages) if stages else L
        if model.linear_attention:
            # The stale state is each patch's fp32 key-value summary, per head (head_dim + 1) x head_dim.
            kv = layers * config.patches * st.batch * model.num_heads / config.ulysses * (model.head_dim + 1) \
                * model.head_dim * 4
        else:
            kv = layers * 2.0 * st.batch * (st.tokens + st.text) * h * b / config.sp
    return {
        "params_gib": params / GIB,
        "encoders_vae_gib": encoders / GIB,
        "activations_gib": activations / GIB,
        "kv_buffers_gib": kv / GIB,
        "runtime_gib": RUNTIME_OVERHEAD_GIB,
    }
