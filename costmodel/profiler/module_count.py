"""What a transformer module does in one denoising step, counted on PyTorch's meta device.

`forward_inputs` makes the arguments a family's pipeline passes its transformer for one step, and
`count_block_operations` runs one forward of a module built on the meta device (no weights, no
memory) and counts, per block kind, the eager operators each block launches and the bytes its
elementwise operators move. `add_operator_counts` writes them into a model profile: `ditplan models
import` and the tiny models' profiles (executor.tiny) do; the catalogue's were made the same way
(benchmarks/published_transformers.py). torch is imported only when a function runs.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from costmodel.specs import ModelSpec, load_model

# The ModuleLists that hold a transformer's blocks, in every catalogue family.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks", "blocks")
# Matrix products (priced as GEMMs) and operators that launch no kernel (allocation, scalars).
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution"})
# The activation dtype a forward is counted in, by the profile's `dtype_bytes` (an 8-bit profile's
# activations are bf16; its passes are then counted against a slab of one byte per element).
COMPUTE_DTYPE_NAMES = {4: "float32", 2: "bfloat16", 1: "bfloat16"}
NO_KERNEL_OPS = frozenset({"detach", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                           "lift_fresh", "_local_scalar_dense", "alias", "_unsafe_view"})


def forward_inputs(spec: ModelSpec, config: dict[str, Any], batch: int, height: int, width: int, frames: int,
                   tensor: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The forward arguments for one step of `spec`'s transformer, built from `config`, as the
    family's pipeline passes them.

    `tensor(*shape)` makes the floating-point inputs (default: `torch.empty`, which on the meta
    device allocates nothing); masks, ids and shapes are made here whatever `tensor` is."""
    import torch

    tensor = tensor or torch.empty
    h, w = height // spec.vae_spatial_factor, width // spec.vae_spatial_factor
    device = tensor(1).device
    text = tensor(batch, spec.text_tokens, spec.text_hidden)
    t = tensor(batch)
    family = spec.family
    channels = config.get("in_channels", spec.in_channels)  # Flux and Qwen-Image: 2x2-packed channels
    head_dim = config.get("attention_head_dim", spec.head_dim)
    if family == "pixart":
        return dict(hidden_states=tensor(batch, channels, h, w), encoder_hidden_states=text, timestep=t,
                    added_cond_kwargs={"resolution": tensor(batch, 2), "aspect_ratio": tensor(batch, 1)})
    if family == "sd3":
        return dict(hidden_states=tensor(batch, channels, h, w), encoder_hidden_states=text, timestep=t,
                    pooled_projections=tensor(batch, config["pooled_projection_dim"]))
    if family == "flux":
        tokens = (h // 2) * (w // 2)
        return dict(hidden_states=tensor(batch, tokens, channels), encoder_hidden_states=text, timestep=t,
                    pooled_projections=tensor(batch, config["pooled_projection_dim"]), img_ids=torch.zeros(tokens, 3, device=device),
                    txt_ids=torch.zeros(spec.text_tokens, 3, device=device),
                    guidance=tensor(batch) if config.get("guidance_embeds") else None)
    if family == "hunyuan":
        tokens = (h // 2) * (w // 2)
        clip, t5 = config["text_len"], config["text_len_t5"]
        return dict(hidden_states=tensor(batch, channels, h, w), timestep=t,
                    encoder_hidden_states=tensor(batch, clip, config["cross_attention_dim"]),
                    text_embedding_mask=torch.ones(batch, clip, device=device),
                    encoder_hidden_states_t5=tensor(batch, t5, config["cross_attention_dim_t5"]),
                    text_embedding_mask_t5=torch.ones(batch, t5, device=device),
                    image_rotary_emb=(tensor(tokens, head_dim), tensor(tokens, head_dim)),
                    # HunyuanDiT v1.1's size-and-style conditioning (v1.2 dropped it)
                    **(dict(image_meta_size=tensor(batch, 6), style=torch.zeros(batch, dtype=torch.long, device=device))
                       if config.get("use_style_cond_and_image_meta_size") else {}))
    if family == "cogvideox":
        token_frames = spec.token_grid(height, width, frames)[0]
        latent_frames = token_frames * spec.temporal_patch_size  # padded up to whole temporal patches
        tokens = token_frames * (h // 2) * (w // 2)
        rotary = (tensor(tokens, head_dim), tensor(tokens, head_dim)) if config.get("use_rotary_positional_embeddings") else None
        inputs = dict(hidden_states=tensor(batch, latent_frames, channels, h, w),
                      encoder_hidden_states=text, timestep=t, image_rotary_emb=rotary)
        if spec.face_attention is not None:  # ConsisID: the face embedding and the face ViT's 5 hidden states
            inputs.update(id_cond=tensor(batch, 1280), id_vit_hidden=[tensor(batch, 577, 1024)] * 5)
        return inputs
    if family == "wan":
        return dict(hidden_states=tensor(batch, channels, spec.latent_frames(frames), h, w), timestep=t,
                    encoder_hidden_states=text)
    if family == "hunyuan-video":
        return dict(hidden_states=tensor(batch, channels, spec.latent_frames(frames), h, w), timestep=t,
                    encoder_hidden_states=text, encoder_attention_mask=torch.ones(batch, spec.text_tokens, device=device),
                    pooled_projections=tensor(batch, config["pooled_projection_dim"]), guidance=tensor(batch))
    if family == "qwen-image":
        return dict(hidden_states=tensor(batch, (h // 2) * (w // 2), channels), encoder_hidden_states=text, timestep=t,
                    encoder_hidden_states_mask=torch.ones(batch, spec.text_tokens, dtype=torch.bool, device=device),
                    img_shapes=[(1, h // 2, w // 2)] * batch)
    if family == "sana":
        return dict(hidden_states=tensor(batch, channels, h, w), encoder_hidden_states=text, timestep=t)
    assert family == "latte", family
    return dict(hidden_states=tensor(batch, channels, frames, h, w), encoder_hidden_states=text, timestep=t)


@contextlib.contextmanager
def operator_modes(report: Callable[[str, float, float], None]) -> Iterator[None]:
    """Inside, `report(name, bytes, seconds)` is called for every kernel an eager forward launches:
    every aten operator except views and allocations, with a scaled-dot-product attention call
    reported once as "attention" whatever it decomposes into. `bytes` is what a non-matmul operator
    reads and writes (0 for matrix products and attention); `seconds` the thread time the kernel took
    (its operators', for attention)."""
    import time

    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    attention = {"depth": 0}

    class Operators(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.thread_time()
            out = func(*args, **(kwargs or {}))
            seconds = time.thread_time() - start
            name = func.__name__.split(".")[0]
            view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            if not attention["depth"] and not view and name not in NO_KERNEL_OPS:
                nbytes = 0.0 if name in MATMUL_OPS else float(sum(
                    t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)))
                report(name, nbytes, seconds)
            return out

    class Attention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not F.scaled_dot_product_attention:
                return func(*args, **(kwargs or {}))
            attention["depth"] += 1
            start = time.thread_time()
            try:
                return func(*args, **(kwargs or {}))
            finally:
                attention["depth"] -= 1
                report("attention", 0.0, time.thread_time() - start)

    with Attention(), Operators():
        yield


def count_block_operations(module: Any, spec: ModelSpec, height: int, width: int,
                           frames: int) -> dict[str, tuple[float, float]]:
    """Per block kind, the mean over `spec`'s blocks of (eager operators launched, elementwise slab
    passes per row), from one forward of `module` (built on the meta device, and cast in place to
    the profile's precision as `from_pretrained` would load it) at that size.

    Every aten operator a block dispatches counts as one kernel, except views and allocations; a
    scaled-dot-product attention call counts as one kernel whatever it decomposes into. The passes
    are the bytes the non-matmul operators read and write, over the block's slab (batch x rows
    through the block x hidden x dtype bytes, rows counting the text where it joins the block)."""
    import torch

    dtype = getattr(torch, COMPUTE_DTYPE_NAMES[spec.dtype_bytes])
    current: list[list[float]] = []  # [kernels, bytes] of each block call, in execution order
    inside = {"block": False}

    def tally(name: str, nbytes: float, seconds: float) -> None:  # noqa: ARG001 - counting only
        if inside["block"]:
            current[-1][0] += 1
            current[-1][1] += nbytes

    def enter(*_):
        inside["block"] = True
        current.append([0.0, 0.0])

    def leave(*_):
        inside["block"] = False

    batch = 2 if spec.uses_cfg else 1
    # Count at the precision the profile prices (a module built on the meta device is fp32 whatever its
    # checkpoint holds): bytes are then those the run moves, fp32 upcasts inside the blocks included.
    _cast_as_loaded(module, dtype)
    with torch.device("meta"):
        inputs = forward_inputs(spec, dict(module.config), batch, height, width, frames,
                                tensor=lambda *shape: torch.empty(*shape, dtype=dtype))
    hooks = [hook for name, child in module.named_children() if name in BLOCK_LISTS for block in child
             for hook in (block.register_forward_pre_hook(enter), block.register_forward_hook(leave))]
    try:
        with torch.no_grad(), operator_modes(tally):
            module(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    kinds = spec.block_sequence
    if len(current) != len(kinds):
        raise ValueError(f"{spec.id}: {len(current)} block calls, but its profile lists {len(kinds)} blocks")
    tokens = spec.image_tokens(height, width, frames)
    text = spec.text_tokens if spec.text_joins_attention else 0
    sums: dict[str, list[float]] = {}
    for kind, (kernels, nbytes) in zip(kinds, current):
        rows = batch * (tokens + (text if kind in ("joint", "single") else 0))
        total = sums.setdefault(kind, [0.0, 0.0, 0])
        total[0] += kernels
        total[1] += nbytes / (rows * spec.hidden_size * spec.dtype_bytes)
        total[2] += 1
    return {kind: (kernels / n, passes / n) for kind, (kernels, passes, n) in sums.items()}


def _cast_as_loaded(module: Any, dtype: Any) -> None:
    """Cast `module` in place the way `from_pretrained(torch_dtype=dtype)` loads it: to `dtype`, except
    the parameters and buffers its class keeps in fp32 (diffusers' `_keep_in_fp32_modules`, matched on
    the parts of their names: Wan's norms, rotary embedding and modulation table)."""
    import torch

    torch.nn.Module.to(module, dtype)  # ModelMixin.to would warn about the fp32 tensors kept below
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.float()


def add_operator_counts(profile: dict[str, Any], module: Any) -> None:
    """Give every block entry of the model profile `profile` (a dict in the catalogue's schema) its
    kernels and passes, counted from one forward of `module` at the profile's default size. A module
    off the meta device is counted through a meta-device twin built from its config. Where the
    forward cannot be counted, the family's figures stand and `source` says why."""
    import torch
    import yaml

    if next(module.parameters()).device.type != "meta":
        with torch.device("meta"):
            module = type(module).from_config(module.config).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.yaml"
        path.write_text(yaml.safe_dump(profile, sort_keys=False))
        spec = load_model(str(path))
    try:
        counts = count_block_operations(module, spec, spec.default_height, spec.default_width, spec.default_frames)
    except (ValueError, RuntimeError, TypeError) as error:
        profile["source"] += f"; operators per block: the family's figures (the forward could not be counted: {error})"
        return
    for group in profile["transformer"]["blocks"]:
        kernels, passes = counts[group["kind"]]
        group.update(kernels=round(kernels, 1), passes=round(passes, 1))

