"""One rank of a recorded run: `python comm_worker.py MODEL PLAN STEPS DTYPE OUT` under torchrun's variables.

Runs `executor.parallelize(pipe, plan=PLAN)` on a tiny pipeline converted to DTYPE (float32,
bfloat16) with two prompts; rank 0 saves the final latents to OUT. The test sets
DITPLAN_COMM_TRACE so every torch.distributed call this rank makes is recorded for the NCCL rule
checker.
"""
from __future__ import annotations

import sys

import torch

PROMPTS = ["a photo of a cat", "a red car at night"]


def main() -> int:
    model, plan, steps, dtype, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    from executor import parallelize
    from executor.tiny import build_tiny_pipeline

    parallel = parallelize(build_tiny_pipeline(model, seed=0).to(dtype), plan=plan, show_progress=False)
    output = parallel(prompt=PROMPTS, num_inference_steps=steps, seed=0, output_type="latent")
    parallel.close()
    if parallel.rank == 0:
        torch.save(output.images, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
