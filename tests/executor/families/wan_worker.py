"""One rank of the Wan checks: `python wan_worker.py RESULT_DIR` under torchrun-like variables.

Every 2-rank plan of `PLANS` runs `executor.parallelize(<model>, plan=...)` on two prompts at the
tiny model's default size (tiny-wan2.1, and tiny-wan2.2 with its two experts); rank 0 compares its final latents and 8-bit frames with the one-process
run of the same pipeline: the serial loop, or for stale-KV plans (patches with warmup < steps) the
one-process patch-sequential loop of the same patches and warmup. Results go to RESULT_DIR/rank<R>.json
as {"model|plan": figures or error}. A refusal (the same on every rank) is recorded and the run goes on.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_rank_checks import PROMPTS, compare_plans, refusal, run_once, uneven_transformer_call  # noqa: E402
from rank_results import tiny_size, write_and_exit  # noqa: E402

# Per model: its steps and plans. CFG 2, DP 2, Ulysses 2 and Ring 2 run for every family's first
# tiny model (tiny-wan2.1) in tests/executor/test_parallel_pipelines.py.
# tiny-wan2.2 at 4 steps: the high-noise expert runs steps 0-1 (t = 999, 900), the low-noise one
# steps 2-3 (t = 750, 500); with warmup 1 each expert's first step is a full-image step.
MODELS = {
    "tiny-wan2.1": (3, ("pipefusion=2,patches=2,warmup=3", "pipefusion=2,patches=2,warmup=1",
                        "ulysses=2,patches=2,warmup=1", "ring=2,patches=2,warmup=1", "cfg=2,patches=2,warmup=1")),
    "tiny-wan2.2": (4, ("ulysses=2", "ring=2", "cfg=2", "pipefusion=2,patches=2,warmup=4", "pipefusion=2,patches=2,warmup=1")),
}
PLANS = tuple(f"{model}|{plan}" for model, (_, plans) in MODELS.items() for plan in plans)
MODEL = "tiny-wan2.1"  # the refusals' model
EXPERT_STEP_COUNTS = (1, 3, 4, 7, 20, 40)
# 48 x 80 pixels, one frame: 3 x 5 = 15 video tokens, which two sequence-parallel ranks cannot split.
UNEVEN = {"height": 48, "width": 80, "num_frames": 1}


def other_wan_pipeline(pipe, **options) -> None:
    """The executor's adapter for a WanPipeline of the same components with `options` added."""
    from diffusers import WanPipeline

    from executor.families import adapter_for

    parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
    adapter_for(WanPipeline(**parts, **options))


def step_experts(pipe) -> dict[str, list[int]]:
    """Steps -> the expert of each step in the executor's job (the pipeline's rule on its timesteps)."""
    from executor.families import GenerationRequest, adapter_for

    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS[:1], height=64, width=64, num_frames=1)
    return {str(steps): list(adapter.prepare(replace(request, num_inference_steps=steps)).step_experts)
            for steps in EXPERT_STEP_COUNTS}


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {}
    pipes = {model: build_tiny_pipeline(model) for model in MODELS}
    for model, (steps, plans) in MODELS.items():
        results.update(compare_plans(pipes[model], plans, rank, steps, tiny_size(model), key=lambda plan: f"{model}|{plan}"))
        if any(entry.get("refusal") is False for entry in results.values()):
            break  # the process group may be unusable
    pipe = pipes[MODEL]
    size = tiny_size(MODEL)
    if rank == 0:
        results["experts|tiny-wan2.2"] = step_experts(pipes["tiny-wan2.2"])
    results["refusal|plan"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2", show_progress=False), UNEVEN))
    results["refusal|vae strips"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2,vae=2", show_progress=False), size))
    results["refusal|transformer"] = refusal(lambda: uneven_transformer_call(pipe, "wan", UNEVEN))
    results["refusal|two experts"] = refusal(lambda: other_wan_pipeline(pipe, boundary_ratio=0.875))
    results["refusal|guidance_scale_2"] = refusal(lambda: run_once(
        parallelize(pipe, plan="ulysses=2", show_progress=False), {**size, "guidance_scale_2": 3.0}))
    results["refusal|expand_timesteps"] = refusal(lambda: other_wan_pipeline(pipe, expand_timesteps=True))
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
