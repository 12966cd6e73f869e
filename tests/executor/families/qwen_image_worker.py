"""One rank of the Qwen-Image PipeFusion checks: `python qwen_image_worker.py RESULT_DIR` (2 ranks).

For each configuration it runs `executor.parallelize(tiny-qwen-image, plan=CONFIG)` on two prompts
and, on rank 0, compares the final latents and the decoded 8-bit images with the one-process loop
of the same job: the serial loop, or for stale K/V (warmup < steps) the one-process
patch-sequential loop with the same patches and warmup. Results go to RESULT_DIR/rank<R>.json as
{check: figures, or the error}; a refusal (DitplanError, alike on every rank) is recorded and the
run goes on.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_rank_checks import PROMPTS, SEED, compare_plans, refusal  # noqa: E402
from rank_results import write_and_exit  # noqa: E402

MODEL = "tiny-qwen-image"
STEPS = 3
SIZE = {"height": 128, "width": 128}  # 8 x 8 tokens (the pipeline's own default, 1024 px, would be 4096)
NO_CFG = 1.0  # PipeFusion with both guidance branches on one rank needs equal text lengths (refused below)

# CFG, data and sequence parallelism alone run with every family's tiny model (tests/executor/test_parallel_pipelines.py);
# here PipeFusion, whose guidance branches join one padded batch: without guidance, and with CFG halves.
PLANS_WITHOUT_CFG = (f"pipefusion=2,patches=2,warmup={STEPS}", "pipefusion=2,patches=2,warmup=1", "ulysses=2,patches=2,warmup=1")
PLANS_WITH_CFG = (f"cfg=2,patches=2,warmup={STEPS}",)
# Plans refused on every rank alike before any step: PipeFusion with both guidance branches on a rank
# (their text lengths differ), and decoding in strips (the VAE cannot).
REFUSED = ("pipefusion=2,patches=2,warmup=1", "ulysses=2,vae=2")


def without_cfg(plan: str) -> str:
    return f"{plan} guidance={NO_CFG:g}"


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    pipe = build_tiny_pipeline(MODEL)
    results = compare_plans(pipe, PLANS_WITHOUT_CFG, rank, STEPS, SIZE, guidance=NO_CFG, key=without_cfg)
    if not any(entry.get("refusal") is False for entry in results.values()):
        results.update(compare_plans(pipe, PLANS_WITH_CFG, rank, STEPS, SIZE))

    def generate(plan: str) -> None:
        parallel = parallelize(build_tiny_pipeline(MODEL), plan=plan, show_progress=False)
        try:
            parallel(prompt=PROMPTS, num_inference_steps=STEPS, seed=SEED, **SIZE)
        finally:
            parallel.close()

    for plan in REFUSED:
        results[f"refusal|{plan}"] = refusal(lambda: generate(plan))
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
