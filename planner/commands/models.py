"""`ditplan models`: the built-in model catalogue."""
from __future__ import annotations

import argparse

from planner.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_format_argument(parser)


def _describe(spec) -> dict[str, object]:
    blocks = " + ".join(f"{group.count} {group.kind}" for group in _merged(spec.blocks))
    return {
        "id": spec.id, "family": spec.family, "params": spec.params, "blocks": blocks, "num_blocks": spec.num_blocks,
        "hidden_size": spec.hidden_size, "heads": spec.num_heads, "head_dim": spec.head_dim,
        "patch_size": spec.patch_size, "text_tokens": spec.text_tokens,
        "text": "joint attention" if spec.text_joins_attention else "cross-attention",
        "uses_cfg": spec.uses_cfg, "skip_connections": spec.skip_connections,
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


def run(args: argparse.Namespace) -> int:
    from costmodel import list_models, load_model

    described = [_describe(load_model(name)) for name in list_models()]
    if args.format == "json":
        common.print_json(described)
        return 0
    rows = [(d["id"], _count(d["params"]), d["blocks"], d["hidden_size"], f"{d['heads']}x{d['head_dim']}",
             f"{d['text_tokens']} {'joint' if d['text'] == 'joint attention' else 'cross'}",
             "yes" if d["uses_cfg"] else "no", d["default_size"], d["default_steps"]) for d in described]
    print(common.format_table(rows, ("model", "params", "blocks", "hidden", "heads", "text tokens", "cfg",
                                     "default size", "steps"), align="llllllllr"))
    return 0
