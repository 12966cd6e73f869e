"""The cost model's FLOPs and parameter counts against the real diffusers modules.

Every real catalogue model is built at full size on the meta device (no weights, nothing downloaded)
from its published transformer config, run once per size under `FlopCounterMode`, and compared with
`costmodel.flops.step_flops`: linear FLOPs (addmm/mm, plus the patch-embedding convolution) and
attention FLOPs (SDPA decomposes into batched matmuls on the meta device) within 3 %, at two
resolutions (two frame counts for video); the profile's parameter count within 1 % of the module's.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from costmodel.flops import step_flops  # noqa: E402
from costmodel.specs import list_models, load_model  # noqa: E402

# The published transformer/config.json of each model (the fields that shape the module).
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
              norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
              attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)
COGVIDEOX = dict(attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
                 sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
                 max_text_seq_length=226)
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
           cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = {**WAN, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart-alpha": ("PixArtTransformer2DModel", {**PIXART, "use_additional_conditions": True}),
    "pixart-sigma": ("PixArtTransformer2DModel", {**PIXART, "use_additional_conditions": False}),
    "sd3-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                 num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                 joint_attention_dim=4096, caption_projection_dim=1536,
                                                 pooled_projection_dim=2048, pos_embed_max_size=192)),
    "flux-dev": ("FluxTransformer2DModel", {**FLUX, "guidance_embeds": True}),
    "flux-schnell": ("FluxTransformer2DModel", {**FLUX, "guidance_embeds": False}),
    "hunyuan-dit": ("HunyuanDiT2DModel", dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                                              sample_size=128, hidden_size=1408, num_layers=40, mlp_ratio=4.3637,
                                              learn_sigma=True, cross_attention_dim=1024, cross_attention_dim_t5=2048,
                                              pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                                              use_style_cond_and_image_meta_size=False)),
    "cogvideox-2b": ("CogVideoXTransformer3DModel", {**COGVIDEOX, "num_attention_heads": 30, "num_layers": 30,
                                                     "use_rotary_positional_embeddings": False}),
    "cogvideox-5b": ("CogVideoXTransformer3DModel", {**COGVIDEOX, "num_attention_heads": 48, "num_layers": 42,
                                                     "use_rotary_positional_embeddings": True}),
    "latte": ("LatteTransformer3DModel", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                              num_layers=28, cross_attention_dim=1152, sample_size=64, patch_size=2,
                                              caption_channels=4096, video_length=16, activation_fn="gelu-approximate",
                                              norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                              num_embeds_ada_norm=1000, attention_bias=True)),
    "wan2.1-t2v-1.3b": ("WanTransformer3DModel", {**WAN, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
    "wan2.1-t2v-14b": ("WanTransformer3DModel", WAN_14B),
    "wan2.2-t2v-a14b": ("WanTransformer3DModel", WAN_14B),  # each of its two experts
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56))),
    "qwen-image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
    "sana-1600m": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6)),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "cogvideox1.5-5b": ("CogVideoXTransformer3DModel", {
        **COGVIDEOX, "num_attention_heads": 48, "num_layers": 42, "patch_size_t": 2, "sample_height": 300,
        "sample_width": 300, "sample_frames": 81, "patch_bias": False, "use_rotary_positional_embeddings": True}),
}
# Two generations per model: (height, width, frames).
SIZES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "cogvideox-2b": ((480, 720, 49), (480, 720, 25)),
    "cogvideox-5b": ((480, 720, 49), (480, 720, 25)),
    "cogvideox1.5-5b": ((768, 1360, 81), (480, 720, 49)),
    # Video at reduced sizes keeps the meta-device run short; the counts scale the same way.
    "wan2.1-t2v-1.3b": ((480, 832, 81), (480, 832, 33)),
    "wan2.1-t2v-14b": ((480, 832, 33), (480, 832, 17)),
    "wan2.2-t2v-a14b": ((480, 832, 33), (320, 512, 33)),
    "hunyuan-video": ((320, 512, 33), (320, 512, 61)),
    # Latte's temporal position embedding is fixed at its 16 training frames: two resolutions instead.
    "latte": ((512, 512, 16), (256, 384, 16)),
}
IMAGE_SIZES = ((1024, 1024, 1), (512, 768, 1))


def _inputs(model_id: str, batch: int, height: int, width: int, frames: int) -> dict[str, Any]:
    """The transformer's forward arguments for one step, as the pipeline passes them (meta tensors)."""
    spec = load_model(model_id)
    h, w = height // spec.vae_spatial_factor, width // spec.vae_spatial_factor
    text = torch.empty(batch, spec.text_tokens, spec.text_hidden)
    t = torch.empty(batch)
    family = spec.family
    if family == "pixart":
        return dict(hidden_states=torch.empty(batch, 4, h, w), encoder_hidden_states=text, timestep=t,
                    added_cond_kwargs={"resolution": torch.empty(batch, 2), "aspect_ratio": torch.empty(batch, 1)})
    if family == "sd3":
        return dict(hidden_states=torch.empty(batch, 16, h, w), encoder_hidden_states=text, timestep=t,
                    pooled_projections=torch.empty(batch, 2048))
    if family == "flux":
        tokens = (h // 2) * (w // 2)
        return dict(hidden_states=torch.empty(batch, tokens, 64), encoder_hidden_states=text, timestep=t,
                    pooled_projections=torch.empty(batch, 768), img_ids=torch.zeros(tokens, 3),
                    txt_ids=torch.zeros(spec.text_tokens, 3),
                    guidance=torch.empty(batch) if PUBLISHED[model_id][1]["guidance_embeds"] else None)
    if family == "hunyuan":
        tokens = (h // 2) * (w // 2)
        return dict(hidden_states=torch.empty(batch, 4, h, w), timestep=t,
                    encoder_hidden_states=torch.empty(batch, 77, 1024), text_embedding_mask=torch.ones(batch, 77),
                    encoder_hidden_states_t5=torch.empty(batch, 256, 2048), text_embedding_mask_t5=torch.ones(batch, 256),
                    image_rotary_emb=(torch.empty(tokens, 88), torch.empty(tokens, 88)))
    if family == "cogvideox":
        token_frames = spec.token_grid(height, width, frames)[0]
        latent_frames = token_frames * spec.temporal_patch_size  # padded up to whole temporal patches
        tokens = token_frames * (h // 2) * (w // 2)
        rotary = (torch.empty(tokens, 64), torch.empty(tokens, 64)) if model_id != "cogvideox-2b" else None
        return dict(hidden_states=torch.empty(batch, latent_frames, 16, h, w), encoder_hidden_states=text, timestep=t,
                    image_rotary_emb=rotary)
    if family == "wan":
        return dict(hidden_states=torch.empty(batch, 16, spec.latent_frames(frames), h, w), timestep=t,
                    encoder_hidden_states=text)
    if family == "hunyuan-video":
        return dict(hidden_states=torch.empty(batch, 16, spec.latent_frames(frames), h, w), timestep=t,
                    encoder_hidden_states=text, encoder_attention_mask=torch.ones(batch, spec.text_tokens),
                    pooled_projections=torch.empty(batch, 768), guidance=torch.empty(batch))
    if family == "qwen-image":
        return dict(hidden_states=torch.empty(batch, (h // 2) * (w // 2), 64), encoder_hidden_states=text, timestep=t,
                    encoder_hidden_states_mask=torch.ones(batch, spec.text_tokens, dtype=torch.bool),
                    img_shapes=[(1, h // 2, w // 2)] * batch)
    if family == "sana":
        return dict(hidden_states=torch.empty(batch, 32, h, w), encoder_hidden_states=text, timestep=t)
    assert family == "latte"
    return dict(hidden_states=torch.empty(batch, 4, frames, h, w), encoder_hidden_states=text, timestep=t)


def _counted(module: Any, inputs: dict[str, Any]) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) that FlopCounterMode counts in one forward."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(**inputs)
    linear = attention = 0.0
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        if "bmm" in name or "scaled_dot_product" in name:
            attention += flops
        elif name.split(".")[1] in ("mm", "addmm", "convolution"):
            linear += flops
    return linear, attention


def test_every_real_model_is_covered() -> None:
    real = {name for name in list_models() if not name.startswith("tiny-")}
    assert real == set(PUBLISHED), "a real catalogue model has no published config in this test"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_flops_and_params_match_the_diffusers_module(model_id: str) -> None:
    spec = load_model(model_id)
    class_name, config = PUBLISHED[model_id]
    with torch.device("meta"):
        module: Callable[..., Any] = getattr(diffusers, class_name)(**config)
        params = sum(p.numel() for p in module.parameters())
        assert spec.params == pytest.approx(params, rel=0.01), f"{model_id}: profile params {spec.params:.4g}, module {params:.4g}"
        for height, width, frames in SIZES.get(model_id, IMAGE_SIZES):
            batch = 2 if spec.uses_cfg else 1
            linear, attention = _counted(module, _inputs(model_id, batch, height, width, frames))
            predicted = step_flops(spec, height, width, frames)
            where = f"{model_id} at {width}x{height}x{frames}"
            assert predicted.linear == pytest.approx(linear, rel=0.03), f"{where}: linear {predicted.linear:.4g} vs {linear:.4g}"
            assert predicted.attention == pytest.approx(attention, rel=0.03), \
                f"{where}: attention {predicted.attention:.4g} vs {attention:.4g}"
