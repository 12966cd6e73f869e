"""`ditplan models`: the built-in model catalogue; `ditplan models import PATH` profiles a diffusers model."""
from __future__ import annotations

import argparse
from pathlib import Path

from planner.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_format_argument(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    imported = actions.add_parser(
        "import", help="write a model YAML from a diffusers model folder or transformer config.json",
        description="Build the transformer of a diffusers model folder (model_index.json + transformer/config.json) "
                    "or of a transformer config.json on the meta device, count its parameters, and write the model "
                    "YAML that every command takes with --model PATH.")
    imported.add_argument("path", metavar="PATH", help="diffusers model folder or transformer config.json")
    imported.add_argument("--id", help="model id (default: the folder name, or imported-<family>)")
    imported.add_argument("--out", metavar="MODEL.yaml", help="where to write (default: <id>.yaml here)")


def _describe(spec) -> dict[str, object]:
    blocks = " + ".join(f"{group.count} {group.kind}" for group in _merged(spec.blocks))
    return {
        "id": spec.id, "family": spec.family, "params": spec.params, "blocks": blocks, "num_blocks": spec.num_blocks,
        "hidden_size": spec.hidden_size, "heads": spec.num_heads, "head_dim": spec.head_dim,
        "patch_size": spec.patch_size, "text_tokens": spec.text_tokens,
        "text": "joint attention" if spec.text_joins_attention else "cross-attention",
        "uses_cfg": spec.uses_cfg, "skip_connections": spec.skip_connections, "attention": spec.attention,
        "experts": spec.experts,
        "encoder_params": spec.encoder_params, "vae_params": spec.vae_params,
        "default_size": f"{spec.default_width}x{spec.default_height}" + (f"x{spec.default_frames}" if spec.default_frames > 1 else ""),
        "default_steps": spec.default_steps, "source": spec.source,
    }


def _merged(groups):
    """Count block kinds in order of first appearance (Latte's 28 x [cross, temporal] -> 28 cross + 28 temporal)."""
    from costmodel.specs import BlockGroup

    counts: dict[str, int] = {}
    for group in groups:
        counts[group.kind] = counts.get(group.kind, 0) + group.count
    return [BlockGroup(kind, count) for kind, count in counts.items()]


def _count(value: float) -> str:
    """2.03B, 611M, 85k."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.{2 if suffix == 'B' else 0}f}{suffix}"
    return f"{value:.0f}"


def _import(args: argparse.Namespace) -> int:
    from costmodel.flops import per_block_flops, step_flops
    from costmodel.specs import load_model
    from planner.model_import import import_model, write_yaml

    data = import_model(args.path, args.id)
    out = Path(args.out or f"{data['id']}.yaml")
    write_yaml(data, out)
    spec = load_model(str(out))  # what every command will read back, checked by the strict loader
    total = step_flops(spec, spec.default_height, spec.default_width, spec.default_frames)
    print(f"wrote {out}: {spec.family}, {_count(spec.params)} parameters"
          f"{f' x {spec.experts} experts' if spec.experts > 1 else ''}, "
          + " + ".join(f"{group.count} {group.kind}" for group in _merged(spec.blocks)) + " blocks")
    print(f"one step at {spec.default_width}x{spec.default_height}"
          f"{f'x{spec.default_frames}' if spec.default_frames > 1 else ''}: {total.total / 1e12:.1f} TFLOP "
          f"(linear {total.linear / 1e12:.1f}, attention {total.attention / 1e12:.1f})")
    kinds: dict[str, tuple[int, float, float]] = {}
    for kind, flops in per_block_flops(spec, spec.default_height, spec.default_width, spec.default_frames):
        count, linear, attention = kinds.get(kind, (0, 0.0, 0.0))
        kinds[kind] = (count + 1, linear + flops.linear, attention + flops.attention)
    for kind, (count, linear, attention) in kinds.items():
        print(f"  per {kind} block: linear {linear / count / 1e12:.2f} TFLOP, "
              f"attention {attention / count / 1e12:.2f} TFLOP")
    return 0


def run(args: argparse.Namespace) -> int:
    from costmodel import list_models, load_model

    if getattr(args, "action", None) == "import":
        return _import(args)

    described = [_describe(load_model(name)) for name in list_models()]
    if args.format == "json":
        common.print_json(described)
        return 0
    rows = [(d["id"], ("2x" if d["experts"] == 2 else "") + _count(d["params"]), d["blocks"], d["hidden_size"],
             f"{d['heads']}x{d['head_dim']}",
             f"{d['text_tokens']} {'joint' if d['text'] == 'joint attention' else 'cross'}",
             "yes" if d["uses_cfg"] else "no", d["default_size"], d["default_steps"]) for d in described]
    print(common.format_table(rows, ("model", "params", "blocks", "hidden", "heads", "text tokens", "cfg",
                                     "default size", "steps"), align="llllllllr"))
    return 0
