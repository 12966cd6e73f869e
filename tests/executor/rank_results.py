"""What every spawned test worker shares: the tiny model's size, 8-bit levels of decoded images,
and one JSON file per rank written before a hard exit."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def tiny_size(model_id: str) -> dict[str, int]:
    """The tiny model's own default size (some pipelines default to their real model's: 1024 px, or
    Wan's 480x832 x 81 frames, whose transformer config holds no sample size to scale down)."""
    from executor.tiny import load_tiny_spec

    spec = load_tiny_spec(model_id)
    size = {"height": spec["default_height"], "width": spec["default_width"]}
    if spec["default_frames"] > 1:
        size["num_frames"] = spec["default_frames"]
    return size


def eight_bit(images: Any) -> torch.Tensor:
    """Decoded images or frames in [0, 1] (a pipeline's "np" output) as 8-bit levels, in float64."""
    return torch.from_numpy(np.round(np.asarray(images, dtype=np.float64) * 255.0))


def write_and_exit(result_dir: Path, rank: int, results: dict[str, Any], code: int = 0) -> None:
    """Write RESULT_DIR/rank<R>.json, then leave at once: process-group teardown can wait on peers
    that already left."""
    (result_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
