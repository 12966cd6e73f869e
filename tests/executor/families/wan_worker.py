"""One rank of the Wan checks: `python wan_worker.py RESULT_DIR` under torchrun-like variables.

Every 2-rank plan of `PLANS` runs `executor.parallelize(<model>, plan=...)` on two prompts at the
tiny model's default size (tiny-wan2.1, and tiny-wan2.2 with its two experts); rank 0 compares its final latents and 8-bit frames with the one-process
run of the same pipeline: the serial loop, or for stale-KV plans (patches with warmup < steps) the
one-process patch-sequential loop of the same patches and warmup. Results go to RESULT_DIR/rank<R>.json
as {"model|plan": figures or error}. A refusal (the same on every rank) is recorded and the run goes on.
"""
from __future__ import annotations

import copy
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rank_results import eight_bit, write_and_exit  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car at night"]
SEED = 5
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


def size(model: str = MODEL) -> dict[str, int]:
    from executor.tiny import load_tiny_spec

    spec = load_tiny_spec(model)
    return {"height": spec["default_height"], "width": spec["default_width"], "num_frames": spec["default_frames"]}


def one_process_reference(pipe, model: str, plan: str, made: dict):
    """Final latents and 8-bit frames of the one-process run that `plan` must reproduce (each made
    once: `made` keeps them by model and one-process configuration)."""
    from costmodel.config import ParallelConfig

    steps = MODELS[model][0]
    config = ParallelConfig.parse(plan)
    stale = config.pipelines and config.warmup < steps
    reference = ParallelConfig(patches=config.patches, warmup=config.warmup) if stale else ParallelConfig()
    if (model, reference) not in made:
        made[model, reference] = run_one_process(pipe, model, reference)
    return made[model, reference]


def run_one_process(pipe, model: str, reference):
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise

    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS, num_inference_steps=MODELS[model][0], **size(model),
                                generators=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))])
    job = adapter.prepare(request)
    with torch.no_grad():
        latents = denoise(job, adapter, reference)
        return job, latents, eight_bit(adapter.decode(job, latents, "np"))


def run_once(parallel, sizes: dict[str, int]) -> None:
    try:
        parallel(prompt=PROMPTS[:1], num_inference_steps=1, seed=SEED, output_type="np", **sizes)
    finally:
        parallel.close()


def uneven_transformer_call(pipe) -> None:
    """The transformer itself under Ulysses 2 at the uneven size (what a model without a profile meets)."""
    import torch.distributed as dist

    from executor.families import GenerationRequest, adapter_for
    from executor.sp import enable_sequence_parallel

    adapter = adapter_for(pipe)
    job = adapter.prepare(GenerationRequest(prompts=PROMPTS[:1], num_inference_steps=1, **UNEVEN,
                                            generators=[torch.Generator().manual_seed(SEED)]))
    handle = enable_sequence_parallel(pipe.transformer, "wan", dist.new_group([0, 1]), None)
    try:
        with torch.no_grad():
            pipe.transformer(**adapter.transformer_kwargs(job, job.latents, job.timesteps[0], job.branches[-1:]))
    finally:
        handle.remove()


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
    pipes = {model: build_tiny_pipeline(model) for model in MODELS}
    pipe = pipes[MODEL]
    for entry_name in PLANS:
        model, plan = entry_name.split("|")
        try:
            reference = one_process_reference(pipes[model], model, plan, references) if rank == 0 else None
            # PipeFusion cuts the transformers to this rank's stage: each plan gets a fresh pipeline.
            parallel = parallelize(copy.deepcopy(pipes[model]) if "pipefusion" in plan else pipes[model], plan=plan,
                                   show_progress=False)
            try:
                output = parallel(prompt=PROMPTS, num_inference_steps=MODELS[model][0], seed=SEED, output_type="latent",
                                  **size(model))
            finally:
                parallel.close()
            if rank == 0:
                job, ref_latents, ref_pixels = reference
                with torch.no_grad():
                    pixels = eight_bit(parallel.adapter.decode(job, output.frames, "np"))
                results[entry_name] = {"latent_diff": float((output.frames - ref_latents).abs().max()),
                                 "pixel_diff": float((pixels - ref_pixels).abs().max()),
                                 "latent_scale": float(ref_latents.abs().max())}
        except Exception as error:  # noqa: BLE001 - recorded per plan; the parent test reports it
            results[entry_name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc(limit=8)}
            if not isinstance(error, DitplanError):
                break
    if rank == 0:
        results["experts|tiny-wan2.2"] = step_experts(pipes["tiny-wan2.2"])
    results["refusal|plan"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2", show_progress=False), UNEVEN))
    results["refusal|vae strips"] = refusal(lambda: run_once(parallelize(pipe, plan="ulysses=2,vae=2", show_progress=False), size()))
    results["refusal|transformer"] = refusal(lambda: uneven_transformer_call(pipe))
    results["refusal|two experts"] = refusal(lambda: other_wan_pipeline(pipe, boundary_ratio=0.875))
    results["refusal|guidance_scale_2"] = refusal(lambda: run_once(
        parallelize(pipe, plan="ulysses=2", show_progress=False), {**size(), "guidance_scale_2": 3.0}))
    results["refusal|expand_timesteps"] = refusal(lambda: other_wan_pipeline(pipe, expand_timesteps=True))
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
