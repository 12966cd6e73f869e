"""One rank of the SANA checks: `python sana_worker.py RESULT_DIR` under torchrun-like variables.

Every 2-rank plan of `PLANS` runs `executor.parallelize(tiny-sana, plan=...)` on two prompts at the
tiny model's default size; rank 0 compares its final latents and 8-bit images with the one-process
run of the same pipeline: the serial loop, or for stale-summary plans (patches with warmup < steps)
the one-process patch-sequential loop of the same patches and warmup. Results go to
RESULT_DIR/rank<R>.json as {plan: figures or error}. A refusal (the same on every rank) is recorded
and the run goes on.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_rank_checks import compare_plans, refusal, run_once, uneven_transformer_call  # noqa: E402
from rank_results import tiny_size, write_and_exit  # noqa: E402

MODEL = "tiny-sana"
STEPS = 3
# Linear attention split by heads (Ulysses) and by summaries (Ring), the guidance halves, PipeFusion
# exact (warmup = steps) and with stale summaries and halo rows, and stale patches under SP and CFG.
PLANS = (
    "ulysses=2", "ring=2", "cfg=2", f"pipefusion=2,patches=2,warmup={STEPS}", "pipefusion=2,patches=4,warmup=1",
    "ulysses=2,patches=2,warmup=1", "ring=2,patches=2,warmup=1", "cfg=2,patches=2,warmup=1",
)
# 288 x 864 pixels is one of the pipeline's 512-px bins: 9 x 27 token rows x columns, and 9 rows do not
# split over two ranks.
UNEVEN = {"height": 288, "width": 864}


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    pipe = build_tiny_pipeline(MODEL)
    size = tiny_size(MODEL)
    results = compare_plans(pipe, PLANS, rank, STEPS, size)
    results["refusal|plan"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2", show_progress=False), UNEVEN))
    results["refusal|vae strips"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2,vae=2", show_progress=False), size))
    results["refusal|transformer"] = refusal(lambda: uneven_transformer_call(pipe, "sana", UNEVEN))
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
