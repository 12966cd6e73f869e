"""One rank of the HunyuanVideo checks: `python hunyuan_video_worker.py RESULT_DIR` under torchrun-like variables.

Every 2-rank plan of `PLANS` runs `executor.parallelize(tiny-hunyuan-video, plan=...)` on two prompts
at the tiny model's default size; rank 0 compares its final latents and 8-bit frames with the
one-process run of the same pipeline: the serial loop, or for stale-KV plans (patches with warmup <
steps) the one-process patch-sequential loop of the same patches and warmup. The prompts keep 6 of
the 256 text tokens (5 words and the template's closing token): the other 250 are padding under
the mask, so a padded key reaching any attention would show. Results go to RESULT_DIR/rank<R>.json
as {plan: figures or error}. A refusal (the same on every rank) is recorded and the run goes on.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_rank_checks import PROMPTS, SEED, compare_plans, refusal, run_once  # noqa: E402
from rank_results import tiny_size, write_and_exit  # noqa: E402

MODEL = "tiny-hunyuan-video"
STEPS = 3
PLANS = (
    "ulysses=2", "ring=2", f"pipefusion=2,patches=2,warmup={STEPS}", "pipefusion=2,patches=2,warmup=1",
    "ulysses=2,patches=2,warmup=1", "ring=2,patches=2,warmup=1", "dp=2,patches=2,warmup=1",
    # 6 text tokens in 8 strips: two patches carry none, and under Ring their text asks no attention.
    "pipefusion=2,patches=8,warmup=1", "ring=2,patches=8,warmup=1",
)


def padding_effect(pipe) -> float:
    """How much one transformer call moves when its padded text keys are not masked: the size of
    what a leak of the padding into the attention would change."""
    from executor.families import GenerationRequest, adapter_for

    adapter = adapter_for(pipe)
    job = adapter.prepare(GenerationRequest(prompts=PROMPTS[:1], num_inference_steps=STEPS, **tiny_size(MODEL),
                                            generators=[torch.Generator().manual_seed(SEED)]))
    kwargs = adapter.transformer_kwargs(job, job.latents, job.timesteps[0], job.branches)
    with torch.no_grad():
        masked = pipe.transformer(**kwargs)[0]
        unmasked = pipe.transformer(**{**kwargs, "encoder_attention_mask": torch.ones_like(kwargs["encoder_attention_mask"])})[0]
    return float((masked - unmasked).abs().max())


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    pipe = build_tiny_pipeline(MODEL)
    size = tiny_size(MODEL)
    # The shared prompts keep five text tokens each: one kept text length per batch.
    results = compare_plans(pipe, PLANS, rank, STEPS, size)
    results["padding effect"] = {"value": padding_effect(pipe)}
    results["refusal|cfg"] = refusal(lambda: run_once(parallelize(pipe, plan="cfg=2", show_progress=False), size, PROMPTS))
    results["refusal|vae strips"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2,vae=2", show_progress=False), size, PROMPTS))
    # "a cat" keeps 3 text tokens, "a red car at night" 6: one batch, two kept lengths.
    results["refusal|mixed lengths"] = refusal(
        lambda: run_once(parallelize(pipe, plan="ulysses=2", show_progress=False), size, ["a cat", PROMPTS[1]]))
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
