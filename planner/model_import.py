"""`ditplan models import PATH`: a model YAML from a diffusers model folder or a transformer config.json.

The transformer is built from its config on PyTorch's meta device (no weights); its parameters, and
the operators and elementwise bytes of one forward per block (costmodel.profiler.module_count), are counted
there; its structure (width, heads, block kinds and counts, patch sizes, MLP width) is read
from the config by the family's reader below. A folder's `model_index.json` also gives the experts
(`transformer_2`, `boundary_ratio`) and its `vae/config.json` the VAE, counted on the meta device too.
What a transformer config cannot say (text encoders, prompt length, default size, steps, guidance) is
taken from the family's reference catalogue entry and named in `source:`. torch and diffusers are
imported only when the command runs.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from costmodel.errors import DitplanError
from costmodel.profiler.module_count import add_operator_counts


def _wan(c: dict[str, Any]) -> dict[str, Any]:
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    temporal, patch = c["patch_size"][0], c["patch_size"][1]
    return dict(hidden_size=hidden, num_heads=c["num_attention_heads"], head_dim=c["attention_head_dim"],
                mlp_ratio=round(c["ffn_dim"] / hidden, 4), patch_size=patch, temporal_patch_size=temporal,
                in_channels=c["in_channels"], cross_attention_dim=hidden,  # the text is projected to the width first
                blocks=[{"kind": "cross", "count": c["num_layers"]}])


def _hunyuan_video(c: dict[str, Any]) -> dict[str, Any]:
    return dict(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], mlp_ratio=float(c["mlp_ratio"]), patch_size=c["patch_size"],
                temporal_patch_size=c["patch_size_t"], in_channels=c["in_channels"],
                blocks=_dual_then_single(c))


def _dual_then_single(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"kind": "joint", "count": c["num_layers"]}, {"kind": "single", "count": c["num_single_layers"]}]


def _packed(c: dict[str, Any]) -> int:
    """Latent channels of a 2x2-packed input (Flux, Qwen-Image): in_channels / 4."""
    return c["in_channels"] // 4


def _qwen_image(c: dict[str, Any]) -> dict[str, Any]:
    return dict(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], mlp_ratio=4.0, patch_size=c["patch_size"], in_channels=_packed(c),
                blocks=[{"kind": "joint", "count": c["num_layers"]}])


def _flux(c: dict[str, Any]) -> dict[str, Any]:
    return dict(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], mlp_ratio=4.0, patch_size=2, in_channels=_packed(c),
                blocks=_dual_then_single(c))


def _sana(c: dict[str, Any]) -> dict[str, Any]:
    return dict(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], mlp_ratio=float(c["mlp_ratio"]), patch_size=c["patch_size"],
                in_channels=c["in_channels"], attention="linear", cross_attention_dim=c["cross_attention_dim"],
                blocks=[{"kind": "cross", "count": c["num_layers"]}])


def _sd3(c: dict[str, Any]) -> dict[str, Any]:
    return dict(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], mlp_ratio=4.0, patch_size=c["patch_size"],
                in_channels=c["in_channels"], blocks=[{"kind": "joint", "count": c["num_layers"]}])


def _cogvideox(c: dict[str, Any]) -> dict[str, Any]:
    return dict(hidden_size=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], mlp_ratio=4.0, patch_size=c["patch_size"],
                temporal_patch_size=c.get("patch_size_t") or 1, in_channels=c["in_channels"],
                blocks=[{"kind": "single", "count": c["num_layers"]}])


def _consisid(c: dict[str, Any]) -> dict[str, Any]:
    transformer = _cogvideox(c)
    if c.get("is_train_face"):
        transformer["face_attention"] = {"every": c["cross_attn_interval"], "tokens": c["LFE_num_querie"],
                                         "inner_dim": c["cross_attn_num_heads"] * c["cross_attn_dim_head"],
                                         "kv_dim": c["LFE_output_dim"]}
    return transformer


@dataclass(frozen=True)
class Importer:
    family: str
    reference: str  # the catalogue entry whose text, VAE and defaults an imported model starts from
    read: Callable[[dict[str, Any]], dict[str, Any]]


# diffusers transformer class -> how to read it.
IMPORTERS: dict[str, Importer] = {
    "WanTransformer3DModel": Importer("wan", "wan2.1-t2v-1.3b", _wan),
    "HunyuanVideoTransformer3DModel": Importer("hunyuan-video", "hunyuan-video", _hunyuan_video),
    "QwenImageTransformer2DModel": Importer("qwen-image", "qwen-image", _qwen_image),
    "SanaTransformer2DModel": Importer("sana", "sana-1600m", _sana),
    "SD3Transformer2DModel": Importer("sd3", "sd3.5-large", _sd3),
    "CogVideoXTransformer3DModel": Importer("cogvideox", "cogvideox1.5-5b", _cogvideox),
    "ConsisIDTransformer3DModel": Importer("cogvideox", "consisid", _consisid),
    "FluxTransformer2DModel": Importer("flux", "flux-dev", _flux),
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DitplanError(f"{path}: no such file.") from None
    except json.JSONDecodeError as error:
        raise DitplanError(f"{path}: not valid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise DitplanError(f"{path}: expected a JSON object.")
    return data


def _init_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _meta_module(class_name: str, config: dict[str, Any], where: Path) -> Any:
    """The diffusers module `class_name` built from `config` on the meta device."""
    import diffusers
    import torch

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise DitplanError(f"{where}: diffusers {diffusers.__version__} has no class {class_name!r}.")
    try:
        with torch.device("meta"):
            return cls(**_init_kwargs(config)).eval()
    except TypeError as error:
        raise DitplanError(f"{where}: {class_name} rejects this config ({error}).") from None


def _meta_params(class_name: str, config: dict[str, Any], where: Path) -> int:
    return sum(p.numel() for p in _meta_module(class_name, config, where).parameters())


def import_model(path: str | Path, model_id: str | None = None) -> dict[str, Any]:
    """The model YAML's content (a dict in the catalogue schema) for a folder or a transformer config."""
    from costmodel.specs import load_model

    path = Path(path)
    index: dict[str, Any] = {}
    if path.is_dir():
        index = _read_json(path / "model_index.json")
        config_path = path / "transformer" / "config.json"
    else:
        config_path = path
    config = _read_json(config_path)
    class_name = config.get("_class_name")
    importer = IMPORTERS.get(str(class_name))
    if importer is None:
        known = ", ".join(f"{name} ({imp.family})" for name, imp in IMPORTERS.items())
        raise DitplanError(f"{config_path}: _class_name {class_name!r} is not a known transformer family; "
                           f"the known ones are {known}.")
    try:
        transformer = importer.read(config)
    except (KeyError, TypeError, IndexError) as error:
        raise DitplanError(f"{config_path}: {class_name} config lacks or misstates {error}.") from None
    module = _meta_module(str(class_name), config, config_path)
    params = sum(p.numel() for p in module.parameters())
    reference = load_model(importer.reference)
    experts = 2 if "transformer_2" in index else 1
    transformer = {"params": float(f"{params:.4g}"), **transformer}
    if experts == 2:
        if not isinstance(index.get("boundary_ratio"), (int, float)):
            raise DitplanError(f"{path / 'model_index.json'}: names transformer_2 but no numeric boundary_ratio; "
                               "two experts need the ratio at which the second takes over.")
        transformer["experts"] = 2
        transformer["expert_boundary_ratio"] = float(index["boundary_ratio"])
        # The scheduler's flow shift places the boundary among the steps.
        scheduler_path = path / "scheduler" / "scheduler_config.json"
        if scheduler_path.exists() and isinstance(_read_json(scheduler_path).get("flow_shift"), (int, float)):
            transformer["flow_shift"] = float(_read_json(scheduler_path)["flow_shift"])
    vae = {"params": reference.vae_params, "spatial_factor": reference.vae_spatial_factor,
           "temporal_factor": reference.vae_temporal_factor, "latent_channels": reference.vae_latent_channels,
           "decode_flops_per_pixel": reference.vae_decode_flops_per_pixel}
    vae_source = f"VAE figures of {reference.id}"
    vae_config_path = path / "vae" / "config.json" if path.is_dir() else None
    if vae_config_path is not None and vae_config_path.exists():
        vae_config = _read_json(vae_config_path)
        vae["params"] = float(f"{_meta_params(str(vae_config.get('_class_name')), vae_config, vae_config_path):.4g}")
        vae_source = f"VAE parameters counted from {vae_config_path.name}, its other figures of {reference.id}"
    name = model_id or (path.name if path.is_dir() else f"imported-{importer.family}")
    where = f"{path}/transformer/config.json" if path.is_dir() else str(path)
    data = {
        "id": name,
        "family": importer.family,
        "source": (f"ditplan models import {path}: transformer structure from {where} ({class_name}), "
                   f"{params:.4g} parameters{' per expert' if experts == 2 else ''}, and the operators and elementwise "
                   f"passes per block, counted on the meta device; "
                   f"{vae_source}; text encoders, prompt length, default size, steps and guidance of {reference.id}"),
        "uses_cfg": reference.uses_cfg,
        "default_steps": reference.default_steps,
        "default_height": reference.default_height,
        "default_width": reference.default_width,
        "default_frames": reference.default_frames,
        "dtype_bytes": reference.dtype_bytes,
        "transformer": transformer,
        "text": {"tokens": reference.text_tokens, "hidden": reference.text_hidden,
                 "joins_attention": reference.text_joins_attention,
                 "encoders": [{"name": e.name, "params": e.params} for e in reference.encoders]},
        "vae": vae,
    }
    add_operator_counts(data, module)
    return data


def write_yaml(data: dict[str, Any], out: Path) -> None:
    """Write `data` to `out` atomically (a temporary file in the same folder, then a rename)."""
    import yaml

    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            yaml.safe_dump(data, stream, sort_keys=False, width=120)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
