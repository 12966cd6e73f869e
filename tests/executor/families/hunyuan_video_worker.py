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

import copy
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rank_results import eight_bit, write_and_exit  # noqa: E402

MODEL = "tiny-hunyuan-video"
PROMPTS = ["a photo of a cat", "a red car at night"]  # five tokens each: one kept text length per batch
STEPS = 3
SEED = 5
PLANS = (
    "ulysses=2", "ring=2", f"pipefusion=2,patches=2,warmup={STEPS}", "pipefusion=2,patches=2,warmup=1",
    "ulysses=2,patches=2,warmup=1", "ring=2,patches=2,warmup=1", "dp=2,patches=2,warmup=1",
    # 6 text tokens in 8 strips: two patches carry none, and under Ring their text asks no attention.
    "pipefusion=2,patches=8,warmup=1", "ring=2,patches=8,warmup=1",
)


def size() -> dict[str, int]:
    from executor.tiny import load_tiny_spec

    spec = load_tiny_spec(MODEL)
    return {"height": spec["default_height"], "width": spec["default_width"], "num_frames": spec["default_frames"]}


def one_process_reference(pipe, plan: str, made: dict):
    """Final latents and 8-bit frames of the one-process run that `plan` must reproduce (each made
    once: `made` keeps them by the one-process configuration)."""
    from costmodel.config import ParallelConfig

    config = ParallelConfig.parse(plan)
    reference = ParallelConfig(patches=config.patches, warmup=config.warmup) if config.warmup < STEPS else ParallelConfig()
    if reference not in made:
        made[reference] = run_one_process(pipe, reference)
    return made[reference]


def run_one_process(pipe, reference):
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise

    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS, num_inference_steps=STEPS, **size(),
                                generators=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))])
    job = adapter.prepare(request)
    with torch.no_grad():
        latents = denoise(job, adapter, reference)
        return job, latents, eight_bit(adapter.decode(job, latents, "np"))


def padding_effect(pipe) -> float:
    """How much one transformer call moves when its padded text keys are not masked: the size of
    what a leak of the padding into the attention would change."""
    from executor.families import GenerationRequest, adapter_for

    adapter = adapter_for(pipe)
    job = adapter.prepare(GenerationRequest(prompts=PROMPTS[:1], num_inference_steps=STEPS, **size(),
                                            generators=[torch.Generator().manual_seed(SEED)]))
    kwargs = adapter.transformer_kwargs(job, job.latents, job.timesteps[0], job.branches)
    with torch.no_grad():
        masked = pipe.transformer(**kwargs)[0]
        unmasked = pipe.transformer(**{**kwargs, "encoder_attention_mask": torch.ones_like(kwargs["encoder_attention_mask"])})[0]
    return float((masked - unmasked).abs().max())


def run_once(parallel, prompts: list[str]) -> None:
    try:
        parallel(prompt=prompts, num_inference_steps=1, seed=SEED, output_type="np", **size())
    finally:
        parallel.close()


def refusal(attempt) -> dict[str, str]:
    from costmodel.errors import DitplanError

    try:
        attempt()
    except DitplanError as error:
        return {"message": str(error)}
    return {"error": "not refused"}


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from costmodel.errors import DitplanError
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {}
    references: dict = {}
    pipe = build_tiny_pipeline(MODEL)
    for plan in PLANS:
        try:
            reference = one_process_reference(pipe, plan, references) if rank == 0 else None
            # PipeFusion cuts the transformer to this rank's stage: each plan gets a fresh pipeline.
            parallel = parallelize(copy.deepcopy(pipe) if "patches" in plan else pipe, plan=plan, show_progress=False)
            try:
                output = parallel(prompt=PROMPTS, num_inference_steps=STEPS, seed=SEED, output_type="latent", **size())
            finally:
                parallel.close()
            if rank == 0:
                job, ref_latents, ref_pixels = reference
                with torch.no_grad():
                    pixels = eight_bit(parallel.adapter.decode(job, output.frames, "np"))
                results[plan] = {"latent_diff": float((output.frames - ref_latents).abs().max()),
                                 "pixel_diff": float((pixels - ref_pixels).abs().max()),
                                 "latent_scale": float(ref_latents.abs().max())}
        except Exception as error:  # noqa: BLE001 - recorded per plan; the parent test reports it
            results[plan] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc(limit=8)}
            if not isinstance(error, DitplanError):
                break
    results["padding effect"] = {"value": padding_effect(pipe)}
    results["refusal|cfg"] = refusal(lambda: run_once(parallelize(pipe, plan="cfg=2", show_progress=False), PROMPTS))
    results["refusal|vae strips"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2,vae=2", show_progress=False), PROMPTS))
    # "a cat" keeps 3 text tokens, "a red car at night" 6: one batch, two kept lengths.
    results["refusal|mixed lengths"] = refusal(
        lambda: run_once(parallelize(pipe, plan="ulysses=2", show_progress=False), ["a cat", PROMPTS[1]]))
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
