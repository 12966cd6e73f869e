"""One rank of a recorded run: `python comm_worker.py MODEL PLAN [STEPS]` under torchrun's variables.

Runs `executor.parallelize(pipe, plan=PLAN)` on a tiny pipeline with two prompts; the test sets
DITPLAN_COMM_TRACE so every torch.distributed call this rank makes is recorded for the NCCL rule
checker.
"""
from __future__ import annotations

import sys

import torch


def main() -> int:
    model, plan = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.set_num_threads(1)
    from executor import parallelize
    from executor.tiny import build_tiny_pipeline

    parallel = parallelize(build_tiny_pipeline(model, seed=0), plan=plan, show_progress=False)
    size = {"height": 64, "width": 64} if model == "tiny-flux-dev" else {}
    parallel(prompt=["a photo of a cat", "a red car at night"], num_inference_steps=steps, seed=0, output_type="latent", **size)
    parallel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
