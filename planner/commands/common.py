"""Arguments shared by the subcommands (model, generation size, cluster, GPUs, nodes, configuration,
output format) and their resolution into specs, plus small table/JSON printers.

Nothing here imports torch: the cost model is pure Python.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from costmodel.errors import DitplanError


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --height, --width, --frames, --steps (sizes default to the model's)."""
    parser.add_argument("--model", required=required, help="model id (see `ditplan models`) or path to a model YAML")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--frames", type=int, help="video frames (default: the model's; 1 for images)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")


def add_cluster_arguments(parser: argparse.ArgumentParser, required: bool = True, gpus_help: str | None = None) -> None:
    """--cluster, --gpus, --nodes."""
    parser.add_argument("--cluster", required=required, help="cluster id (see `ditplan clusters`) or path to a cluster YAML")
    parser.add_argument("--gpus", type=int, help=gpus_help or "use the first N GPUs of the cluster (default: the configuration's product)")
    parser.add_argument("--nodes", type=int, help="replicate a node-shaped cluster over this many nodes (default: the file's)")


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required,
                        help="parallel configuration, e.g. cfg=2,ulysses=2,ring=1,pipefusion=2,patches=4,warmup=1,dp=1")
    parser.add_argument("--placement",
                        help="axis order innermost first (default ulysses,ring,pipefusion,cfg,dp): the first axis gets the nearest GPUs")


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")


# Far beyond any model, yet quick to cost: the simulator's work grows with the steps (1000 is DDPM's
# schedule, the longest diffusers ships), the memory model's figures with the pixels and frames.
SIZE_LIMITS = {"height": 1_000_000, "width": 1_000_000, "frames": 100_000, "steps": 1000}


@dataclass(frozen=True)
class Generation:
    """The model and generation size, with the model's defaults filled in."""

    model: Any  # costmodel.ModelSpec
    height: int
    width: int
    frames: int
    steps: int

    def as_kwargs(self) -> dict[str, int]:
        return {"height": self.height, "width": self.width, "frames": self.frames, "steps": self.steps}


def resolve_generation(model: str, height: int | None = None, width: int | None = None, frames: int | None = None,
                       steps: int | None = None) -> Generation:
    from costmodel import load_model

    spec = load_model(model)
    values = {
        "height": spec.default_height if height is None else height,
        "width": spec.default_width if width is None else width,
        "frames": spec.default_frames if frames is None else frames,
        "steps": spec.default_steps if steps is None else steps,
    }
    check_sizes(**values)
    return Generation(spec, **values)


def check_sizes(**sizes: int | None) -> None:
    """--height, --width, --frames, --steps (those given) are positive and within SIZE_LIMITS."""
    for name, value in sizes.items():
        if value is not None and not 1 <= value <= SIZE_LIMITS[name]:
            raise DitplanError(f"--{name} {value}: it must be an integer from 1 to {SIZE_LIMITS[name]}.")


def generation_from_args(args: argparse.Namespace) -> Generation:
    return resolve_generation(args.model, args.height, args.width, args.frames, args.steps)


def parse_config(text: str):
    from costmodel import ParallelConfig

    return ParallelConfig.parse(text)


def parse_placement(config, text: str | None):
    from costmodel import Placement

    return Placement(config) if not text else Placement.parse(config, text)


def cluster_for_config(cluster: str, config, gpus: int | None, nodes: int | None):
    """The cluster's first `gpus` GPUs (default: the configuration's product). A configuration larger
    than the cluster is blamed on itself, not on a --gpus the user did not give."""
    from costmodel import load_cluster

    if gpus is None:
        whole = load_cluster(cluster, nodes=nodes)
        if config.world_size > whole.gpus:
            raise DitplanError(f"configuration {config} needs {config.world_size} GPUs but cluster {cluster} has "
                               f"{whole.gpus} GPUs; lower its degrees.")
        gpus = config.world_size
    return load_cluster(cluster, gpus=gpus, nodes=nodes)


def percent(fraction: float) -> str:
    """A share as a percentage with one decimal (three would claim a precision the model lacks)."""
    return f"{100.0 * fraction:.1f}"


# ------------------------------------------------------------------ output

def clean_json(value: Any) -> Any:
    """NaN/inf -> null, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: clean_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(item) for item in value]
    return value


def print_json(value: Any, stream=None) -> None:
    json.dump(clean_json(value), stream or sys.stdout, indent=2, allow_nan=False)
    (stream or sys.stdout).write("\n")


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], align: str | None = None) -> str:
    """Plain-text columns; `align` gives 'l' or 'r' per column (default: numbers right, text left)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    if align is None:
        align = "".join("r" if rows and all(isinstance(r[i], (int, float)) for r in rows) else "l" for i in range(len(headers)))

    def line(values: Iterable[str]) -> str:
        parts = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
