"""Tiny random-weight pipelines of the executor's DiT families, built offline from configs.

Each `profiles/models/tiny-<id>.yaml` carries a `build:` mapping (the recipe: diffusers/transformers
class names and config kwargs of every component) next to the cost-model figures of the result.
`build_tiny_pipeline` instantiates the components with seeded random weights, makes a local
tokenizer from a small built-in vocabulary (nothing is downloaded), saves the pipeline with
`save_pretrained` and loads it back with the real `from_pretrained`, so the executor always runs
what a user's `from_pretrained` would give it.

A heavier variant for benchmarks: `derive_spec("tiny-flux-dev", "tiny-flux-dev-heavy",
transformer={...}, defaults={...})` then `write_model_yaml(spec, path)` writes a YAML the cost
model can read, with figures measured from the built modules.

Python: `build_tiny_pipeline(model_id, seed=0, **transformer_overrides)`,
`save_tiny_pipeline(model_id, folder, seed=0, **transformer_overrides)`.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from costmodel.errors import DitplanError
from costmodel.profiler.module_count import add_operator_counts

MODELS_DIR = Path(__file__).resolve().parent.parent / "profiles" / "models"
# derive_spec's `source:` opening, which marks a heavier variant of another tiny recipe.
DERIVED_FROM = "derived from "

# Words the tiny tokenizers know as whole tokens; anything else falls back to single characters.
_WORDS = (
    "a an the of on in with and at by photo picture painting cat dog horse astronaut man woman child "
    "red blue green yellow white black sky sea tree forest river mountain city house car street night "
    "sunset morning riding sitting standing flying over under beautiful small big old new low quality"
).split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

# transformers model class -> its config class (the recipe names only the model class).
_TEXT_CONFIGS = {
    "T5EncoderModel": "T5Config",
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "BertModel": "BertConfig",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLConfig",
    "UMT5EncoderModel": "UMT5Config",
    "LlamaModel": "LlamaConfig",
    "Gemma2Model": "Gemma2Config",
}


def spec_path(model_id: str) -> Path:
    """The YAML of a tiny model id (or the path itself when given a .yaml path)."""
    if model_id.endswith((".yaml", ".yml")):
        return Path(model_id)
    return MODELS_DIR / f"{model_id}.yaml"


def is_tiny_model(model: str) -> bool:
    """True for `tiny-*` ids with a YAML recipe (or a YAML path that carries `build:`)."""
    if model.endswith((".yaml", ".yml")):
        return Path(model).is_file() and "build" in (yaml.safe_load(Path(model).read_text()) or {})
    return model.startswith("tiny-") and spec_path(model).is_file()


def load_tiny_spec(model_id: str) -> dict[str, Any]:
    """The model YAML as a dict; refuses ids without a `build:` recipe, naming the known ones."""
    path = spec_path(model_id)
    if not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("tiny-*.yaml"))
        raise DitplanError(f"tiny model {model_id!r}: no recipe at {path}; the tiny models are {', '.join(known)}.")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "build" not in spec:
        raise DitplanError(f"model file {path}: it has no 'build:' recipe, so it cannot be built as a tiny pipeline.")
    return spec


def tiny_ids() -> tuple[str, ...]:
    """The tiny models of the executor's families: every `tiny-*.yaml` recipe of a family the executor
    declares, except the heavier variants `derive_spec` made of another recipe."""
    from executor.families import FAMILIES

    ids = []
    for path in sorted(MODELS_DIR.glob("tiny-*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        if "build" in spec and spec.get("family") in FAMILIES and not str(spec.get("source", "")).startswith(DERIVED_FROM):
            ids.append(path.stem)
    return tuple(ids)


def tiny_model_per_family() -> dict[str, str]:
    """Executor family -> its first tiny model by id (tiny-pixart-alpha before tiny-pixart-sigma)."""
    models: dict[str, str] = {}
    for model_id in tiny_ids():
        models.setdefault(load_tiny_spec(model_id)["family"], model_id)
    return models


def derive_spec(
    base_id: str, new_id: str, transformer: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A variant of a tiny recipe: transformer config overrides and new default sizes/steps.

    `defaults` may set default_height, default_width, default_frames, default_steps.
    """
    spec = copy.deepcopy(load_tiny_spec(base_id))
    spec["id"] = new_id
    spec["source"] = f"{DERIVED_FROM}{base_id} with transformer overrides {dict(transformer or {})}"
    for config in _transformer_configs(spec):
        config.update(transformer or {})
    for key, value in (defaults or {}).items():
        if key not in ("default_height", "default_width", "default_frames", "default_steps"):
            raise DitplanError(f"derive_spec: {key!r} is not a default this recipe has.")
        spec[key] = value
    return spec


def _transformer_configs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's transformer configs: the transformer's, and a second expert's (Wan 2.2's
    `transformer_2`) where there is one; overrides change both, which must keep one shape."""
    components = spec["build"]["components"]
    return [components[name]["config"] for name in ("transformer", "transformer_2") if components.get(name)]


# -- tokenizers ---------------------------------------------------------------------------------
def _t5_tokenizer(cls: type, model_max_length: int) -> Any:
    # A unigram vocabulary: specials first (T5: pad=0, eos=1, unk=2), then words, then characters.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + word, -2.0) for word in _WORDS]
    vocab += [(char, -5.0) for char in _LETTERS]
    return cls(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _merge_left_to_right(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that join each word's symbols left to right into one token (added to `vocab`)."""
    merges: list[tuple[str, str]] = []
    for symbols in words:
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((symbols[0], symbols[1]))
            symbols = [merged] + symbols[2:]
    return merges


def _clip_tokenizer(cls: type, model_max_length: int) -> Any:
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _LETTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    # Common words become single tokens.
    merges = _merge_left_to_right([[*word[:-1], word[-1] + "</w>"] for word in _WORDS], vocab)
    return cls(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bert_tokenizer(cls: type, model_max_length: int) -> Any:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_LETTERS, *_WORDS]
    return cls(vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))}, model_max_length=model_max_length)


# Qwen-Image's prompt template: its system part is dropped after encoding by a fixed token count, so
# the tiny tokenizer keeps each of these words whole, as Qwen's own vocabulary does.
_CHAT_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background"
).split()
_CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


def _qwen2_tokenizer(cls: type, model_max_length: int) -> Any:
    # A byte-level BPE (every byte is a token, so any text encodes) whose merges are learned from the
    # known words, each with and without its leading space, until every one of them is a single token.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = list(dict.fromkeys([*_WORDS, *_CHAT_WORDS]))
    probe = cls(vocab={"<|endoftext|>": 0}, merges=[])  # the Qwen2 pre-tokenizer, to train with
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=4096, show_progress=False, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([*words, *(" " + word for word in words)], trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return cls(vocab=state["vocab"], merges=merges, model_max_length=model_max_length,
               extra_special_tokens=list(_CHAT_SPECIALS))


# HunyuanVideo's prompt template: the pipeline crops its first `crop_start` (95) tokens after encoding,
# so the tiny Llama tokenizer holds these pieces whole: with the header tokens special, the template's
# part before the prompt is 95 tokens long, as with the real Llama-3 vocabulary.
_LLAMA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA_PIECES = ("\n\n", *(
    "system Describe user \u2581video \u2581by \u2581detailing \u2581following \u2581aspects \u25811 \u2581The \u2581main "
    "\u2581content \u2581theme \u2581color \u2581shape \u2581size \u2581texture \u2581quantity \u2581text \u2581spatial "
    "\u2581relationships \u2581objects \u2581Actions \u2581events \u2581behaviors \u2581temporal \u2581physical \u2581movement "
    "\u2581changes \u2581background \u2581environment \u2581light \u2581style \u2581atmosphere \u2581camera \u2581angles "
    "\u2581movements \u2581transitions \u2581used"
).split())


def _llama_tokenizer(cls: type, model_max_length: int) -> Any:
    # Llama's byte-fallback BPE over metaspace-marked text: every character is a token, and merges
    # (left to right within each piece) make the known words and the template's pieces whole tokens.
    # Padding goes at the end, where HunyuanVideo's transformer expects it.
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    pieces = [*_LLAMA_PIECES, *("\u2581" + word for word in _WORDS)]
    for char in sorted(set("".join(pieces) + _LETTERS + _LETTERS.upper() + ".,:;'!?-\n")):
        vocab.setdefault(char, len(vocab))
    merges = _merge_left_to_right([list(piece) for piece in pieces], vocab)
    return cls(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right", model_max_length=model_max_length,
               extra_special_tokens=list(_LLAMA_SPECIALS))


def _gemma_tokenizer(cls: type, model_max_length: int) -> Any:
    # Gemma's BPE with byte fallback (any text encodes): spaces become "\u2581", each known word is merged
    # into one token after its "\u2581", everything else falls back to letters or bytes. Like Gemma's own,
    # it starts every text with <bos> (the token SANA's pipeline keeps ahead of the prompt's last ones).
    vocab: dict[str, int] = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    for token in (*(f"<0x{byte:02X}>" for byte in range(256)), "\u2581", *_LETTERS):
        vocab.setdefault(token, len(vocab))
    merges = _merge_left_to_right([["\u2581", *word] for word in _WORDS], vocab)
    return cls(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


_TOKENIZER_KINDS = {"t5": _t5_tokenizer, "clip": _clip_tokenizer, "bert": _bert_tokenizer, "qwen2": _qwen2_tokenizer,
                    "llama": _llama_tokenizer, "gemma": _gemma_tokenizer}


# -- building -----------------------------------------------------------------------------------
def _make_component(name: str, recipe: dict[str, Any]) -> Any:
    class_name = recipe["class"]
    if "tokenizer" in recipe:
        import transformers

        return _TOKENIZER_KINDS[recipe["tokenizer"]](getattr(transformers, class_name), recipe["model_max_length"])
    if class_name in _TEXT_CONFIGS:
        import transformers

        config = getattr(transformers, _TEXT_CONFIGS[class_name])(**recipe["config"])
        return getattr(transformers, class_name)(config)
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise DitplanError(f"tiny recipe component {name!r}: diffusers has no class {class_name!r}.")
    config = dict(recipe.get("config") or {})
    if not issubclass(cls, torch.nn.Module):
        return cls.from_config(config)  # schedulers
    return cls(**config)


def quiet_libraries() -> None:
    """Silence the loading chatter (progress bars, accelerate hints) of diffusers and transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _instantiate(spec: dict[str, Any], seed: int) -> Any:
    import diffusers

    quiet_libraries()

    build = spec["build"]
    components: dict[str, Any] = {}
    for index, (name, recipe) in enumerate(build["components"].items()):
        # Seed each component separately so a change to one recipe leaves the others' weights alone.
        torch.manual_seed(seed * 1000 + index)
        components[name] = None if recipe is None else _make_component(name, recipe)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipeline_cls = getattr(diffusers, build["pipeline"])
    return pipeline_cls(**components, **(build.get("pipeline_kwargs") or {}))


def save_tiny_pipeline(model_id: str | dict[str, Any], folder: str | Path, seed: int = 0, **transformer_overrides: Any) -> Path:
    """Build the tiny pipeline (seeded) and `save_pretrained` it to `folder`; returns the folder."""
    spec = load_tiny_spec(model_id) if isinstance(model_id, str) else copy.deepcopy(model_id)
    for config in _transformer_configs(spec):
        config.update(transformer_overrides)
    pipe = _instantiate(spec, seed)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_missing_text_weights(pipe, folder)
    return folder


def _write_missing_text_weights(pipe: Any, folder: Path) -> None:
    """Write transformers models' weights where their save_pretrained skipped them.

    Inside an initialised torch.distributed job, transformers writes weights on global rank 0 only
    (it assumes a shared checkpoint folder); each rank here saves to its own temporary folder, so
    the other ranks write the same safetensors file themselves.
    """
    from safetensors.torch import save_model

    for name, component in pipe.components.items():
        target = folder / name
        if isinstance(component, torch.nn.Module) and hasattr(component, "config") and target.is_dir():
            if not any(target.glob("*.safetensors")):
                component.config.save_pretrained(target)
                save_model(component, str(target / "model.safetensors"))


def build_tiny_pipeline(model_id: str | dict[str, Any], seed: int = 0, **transformer_overrides: Any) -> Any:
    """The tiny pipeline of `model_id` (an id, a YAML path or a spec dict), loaded with `from_pretrained`.

    Same id, seed and overrides -> bit-identical weights. `transformer_overrides` change the
    transformer config (e.g. num_layers, attention_head_dim) for heavier variants.
    """
    import diffusers

    with tempfile.TemporaryDirectory(prefix="ditplan-tiny-") as folder:
        save_tiny_pipeline(model_id, folder, seed=seed, **transformer_overrides)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # Lets the executor check plans against this model's profile (costmodel rules).
    pipe.ditplan_model_id = model_id if isinstance(model_id, str) and not model_id.endswith((".yaml", ".yml")) else None
    return pipe


# -- cost-model figures measured from the built modules -----------------------------------------
def _params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters())) if isinstance(module, torch.nn.Module) else 0


def _spatial_patch(patch_size: Any) -> int:
    """A config's spatial patch size: the number, or the rows' entry of a (frames, rows, cols) patch."""
    return int(patch_size[1]) if isinstance(patch_size, (list, tuple)) else int(patch_size)


def measured_figures(spec: dict[str, Any], pipe: Any) -> dict[str, Any]:
    """The cost-model fields of `spec` as the built `pipe` really has them.

    Text tokens are counted from a prepared job at the pipeline defaults (what the transformer sees).
    """
    from executor.families import adapter_for, declaration

    family = declaration(spec["family"])
    cfg = pipe.transformer.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(cfg.attention_head_dim)
    description = family.describe_blocks(pipe.transformer)
    figures: dict[str, Any] = {
        "hidden_size": heads * head_dim, "num_heads": heads, "head_dim": head_dim, "blocks": description.blocks,
        "patch_size": _spatial_patch(cfg.patch_size), "in_channels": int(cfg.in_channels), "skip_connections": False,
        **description.figures,
    }
    figures["mlp_ratio"] = float(description.mlp_width) / figures["hidden_size"]
    figures["params"] = _params(pipe.transformer)
    boundary_ratio = getattr(pipe.config, "boundary_ratio", None)
    if boundary_ratio is not None:  # two experts of one shape (Wan 2.2 A14B): `params` is one expert's
        figures["experts"] = 2
        figures["expert_boundary_ratio"] = float(boundary_ratio)
        figures["flow_shift"] = float(pipe.scheduler.config.flow_shift)

    adapter = adapter_for(pipe)
    from executor.families.base import GenerationRequest

    request = GenerationRequest(
        prompts=["a photo of a cat"], negative_prompt="", height=spec["default_height"], width=spec["default_width"],
        num_frames=spec["default_frames"] if adapter.is_video else None, num_inference_steps=1,
        generators=[torch.Generator().manual_seed(0)],
    )
    job = adapter.prepare(request)
    text_states = job.branch_inputs["cond"]
    tokens = sum(text_states[key].shape[1] for key in adapter.text_state_keys)
    text_hidden = text_states[adapter.text_state_keys[0]].shape[-1]
    encoders = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            encoders.append({"name": f"tiny-{type(module).__name__}", "params": _params(module)})
    vae = pipe.vae.config
    # Wan's VAE names its temporal factor, CogVideoX's a compression ratio; image VAEs have neither.
    temporal = getattr(vae, "scale_factor_temporal", None) or getattr(vae, "temporal_compression_ratio", 1) or 1
    measured = {
        "transformer": figures,
        "text": {"tokens": int(tokens), "hidden": int(text_hidden), "joins_attention": family.joins_attention, "encoders": encoders},
        "vae": {
            "params": _params(pipe.vae),
            # The pipeline's own factor (CogVideoX and Wan name it apart); Qwen-Image's and Wan's VAEs call
            # their latent channels z_dim.
            "spatial_factor": int(getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor),
            "temporal_factor": int(temporal),
            "latent_channels": int(getattr(vae, "latent_channels", None) or vae.z_dim),
        },
        "token_grid": list(job.token_grid),
    }
    # The operators and elementwise passes per block, counted as the catalogue's are.
    add_operator_counts(_profile(spec, measured), pipe.transformer)
    return measured


def _profile(spec: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The model profile of `spec` with its measured figures (the transformer's dict is shared)."""
    profile = {key: spec[key] for key in ("id", "family", "source", "uses_cfg", "default_steps", "default_height",
                                          "default_width", "default_frames", "dtype_bytes")}
    profile.update(transformer=measured["transformer"], text=measured["text"], vae=measured["vae"])
    return profile


def write_model_yaml(spec: dict[str, Any], path: str | Path, seed: int = 0) -> Path:
    """Build `spec`, measure its figures and write the model YAML (figures + `build:` recipe)."""
    pipe = build_tiny_pipeline(spec, seed=seed)
    out = _profile(spec, measured_figures(spec, pipe))
    out["build"] = spec["build"]
    path = Path(path)
    path.write_text(yaml.safe_dump(out, sort_keys=False, width=120))
    return path
