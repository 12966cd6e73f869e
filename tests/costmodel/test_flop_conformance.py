"""The cost model's FLOPs and parameter counts against the real diffusers modules.

Every real catalogue model is built at full size on the meta device (no weights, nothing downloaded)
from its published transformer config (tests/fixtures/published/), run once per size under
`FlopCounterMode`, and compared with `costmodel.flops.step_flops`: linear FLOPs (addmm/mm, plus the
patch-embedding convolution) and attention FLOPs (SDPA decomposes into batched matmuls on the meta
device) within 3 %, at two resolutions (two frame counts for video); the profile's parameter count within 1 % of the module's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from costmodel.flops import step_flops  # noqa: E402
from costmodel.specs import list_models, load_model  # noqa: E402

# The published diffusers folders of each model, cut to model_index.json and the transformer's
# config.json (the fields that shape the module): tests/fixtures/published/<id>/.
PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "published"


def _published(model_id: str) -> tuple[str, dict[str, Any]]:
    config = json.loads((PUBLISHED_DIR / model_id / "transformer" / "config.json").read_text())
    return config.pop("_class_name"), config


PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {path.name: _published(path.name)
                                                    for path in sorted(PUBLISHED_DIR.iterdir()) if path.is_dir()}

# Two generations per model: (height, width, frames).
SIZES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "cogvideox-2b": ((480, 720, 49), (480, 720, 25)),
    "cogvideox-5b": ((480, 720, 49), (480, 720, 25)),
    "cogvideox1.5-5b": ((768, 1360, 81), (480, 720, 49)),
    "consisid": ((480, 720, 49), (480, 720, 25)),  # learned position embeddings fix the resolution
    # Video at reduced sizes keeps the meta-device run short; the counts scale the same way.
    "wan2.1-t2v-1.3b": ((480, 832, 33), (320, 512, 33)),
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
        inputs = dict(hidden_states=torch.empty(batch, latent_frames, spec.in_channels, h, w),
                      encoder_hidden_states=text, timestep=t, image_rotary_emb=rotary)
        if spec.face_attention is not None:  # ConsisID: the face embedding and the face ViT's 5 hidden states
            inputs.update(id_cond=torch.empty(batch, 1280), id_vit_hidden=[torch.empty(batch, 577, 1024)] * 5)
        return inputs
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
