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
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rank_results import eight_bit, write_and_exit  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car at night"]
STEPS = 3
SEED = 5
SIZE = 128  # 8 x 8 tokens (the pipeline's own default, 1024 px, would be 4096)
NO_CFG = 1.0  # PipeFusion with both guidance branches on one rank needs equal text lengths (refused below)

# (plan, guidance scale or None for the pipeline's, one-process reference: patches and warmup, None = serial).
# CFG, data and sequence parallelism alone run with every family's tiny model (tests/executor/test_parallel_pipelines.py);
# here PipeFusion, whose guidance branches join one padded batch.
CHECKS: list[tuple[str, float | None, tuple[int, int] | None]] = [
    (f"pipefusion=2,patches=2,warmup={STEPS}", NO_CFG, None),
    ("pipefusion=2,patches=2,warmup=1", NO_CFG, (2, 1)),
    ("ulysses=2,patches=2,warmup=1", NO_CFG, (2, 1)),
    (f"cfg=2,patches=2,warmup={STEPS}", None, None),
]
# Plans refused on every rank alike before any step: PipeFusion with both guidance branches on a rank
# (their text lengths differ), and decoding in strips (the VAE cannot).
REFUSED = ("pipefusion=2,patches=2,warmup=1", "ulysses=2,vae=2")


def name_of(plan: str, guidance: float | None) -> str:
    return plan if guidance is None else f"{plan} guidance={guidance:g}"


def reference(pipe, guidance: float | None, patches_warmup: tuple[int, int] | None):
    """Final latents and 8-bit images of the one-process loop (world of one, no collectives)."""
    from costmodel.config import ParallelConfig
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise

    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
                                generators=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))])
    job = adapter.prepare(request)
    config = ParallelConfig() if patches_warmup is None else ParallelConfig(patches=patches_warmup[0], warmup=patches_warmup[1])
    with torch.no_grad():
        latents = denoise(job, adapter, config)
        return job, latents, eight_bit(adapter.decode(job, latents, "np"))


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from costmodel.errors import DitplanError
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {}
    uncut = build_tiny_pipeline("tiny-qwen-image")  # the one-process references, and the plans that cut nothing
    for plan, guidance, patches_warmup in CHECKS:
        name = name_of(plan, guidance)
        try:
            # A pipefusion>1 plan cuts its pipeline to this rank's stage: it gets a pipeline of its own.
            pipe = build_tiny_pipeline("tiny-qwen-image") if plan.startswith("pipefusion") else uncut
            parallel = parallelize(pipe, plan=plan, show_progress=False)
            try:
                output = parallel(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=SEED,
                                  guidance_scale=guidance, output_type="latent")
            finally:
                parallel.close()
            if rank == 0:
                job, ref_latents, ref_pixels = reference(uncut, guidance, patches_warmup)
                with torch.no_grad():
                    pixels = eight_bit(parallel.adapter.decode(job, output.images, "np"))
                results[name] = {"latent_diff": float((output.images - ref_latents).abs().max()),
                                 "pixel_diff": float((pixels - ref_pixels).abs().max()),
                                 "latent_scale": float(ref_latents.abs().max())}
        except Exception as error:  # noqa: BLE001 - recorded per check; the parent test reports it
            results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc(limit=8)}
            if not isinstance(error, DitplanError):
                break
    for plan in REFUSED:
        try:
            parallel = parallelize(build_tiny_pipeline("tiny-qwen-image"), plan=plan, show_progress=False)
            try:
                parallel(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=SEED)
            finally:
                parallel.close()
            results[f"refusal|{plan}"] = {"error": "not refused"}
        except DitplanError as error:
            results[f"refusal|{plan}"] = {"message": str(error)}
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
