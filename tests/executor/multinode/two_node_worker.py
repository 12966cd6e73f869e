"""One rank of the two-node method checks, started by torchrun in one network namespace per node:
`python two_node_worker.py RESULT_DIR`.

For every configuration in CONFIGS it runs `executor.parallelize(pipe, plan=CONFIG)` on the tiny
PixArt pipeline and, on rank 0, compares the final latents and the decoded 8-bit images with the
one-process loop (the serial loop; for PipeFusion with stale KV the one-process loop of the same
patches and warmup). Each rank also records where it ran (its network namespace, torchrun's node
rank) so the test can check that the ranks really were on different "nodes".
Results: RESULT_DIR/rank<R>.json.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rank_results import eight_bit, write_and_exit  # noqa: E402

MODEL = "tiny-pixart-alpha"
PROMPTS = ["a photo of a cat", "a red car at night"]
STEPS = 4
SEED = 3
# (configuration, (patches, warmup) of its one-process reference)
CONFIGS = [
    ("ulysses=2", (1, 1)),
    ("ring=2", (1, 1)),
    ("cfg=2", (1, 1)),
    (f"pipefusion=2,patches=2,warmup={STEPS}", (1, 1)),  # warmup = steps: no stale KV, the serial images
    ("pipefusion=2,patches=4,warmup=1", (4, 1)),  # stale KV: the one-process loop of the same patches
]


def request():
    from executor.families import GenerationRequest

    return GenerationRequest(prompts=PROMPTS, num_inference_steps=STEPS,
                             generators=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))])


@torch.no_grad()
def one_process(patches: int, warmup: int):
    """Final latents and 8-bit images of the one-process loop on an uncut pipeline."""
    from costmodel.config import ParallelConfig
    from executor.families import adapter_for
    from executor.loop import denoise
    from executor.tiny import build_tiny_pipeline

    adapter = adapter_for(build_tiny_pipeline(MODEL, seed=0))
    job = adapter.prepare(request())
    latents = denoise(job, adapter, ParallelConfig(patches=patches, warmup=warmup))
    return job, adapter, latents, eight_bit(adapter.decode(job, latents, "np"))


def main() -> None:
    result_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline

    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {"where": {"netns": os.readlink("/proc/self/ns/net"), "node_rank": os.environ.get("GROUP_RANK"),
                                          "local_rank": os.environ.get("LOCAL_RANK")}}
    references: dict[tuple[int, int], tuple] = {}
    for config, reference in CONFIGS:
        try:
            # A fresh pipeline per plan: PipeFusion cuts the transformer to this rank's stage.
            parallel = parallelize(build_tiny_pipeline(MODEL, seed=0), plan=config, show_progress=False)
            try:
                output = parallel(prompt=PROMPTS, num_inference_steps=STEPS, seed=SEED, output_type="latent")
            finally:
                parallel.close()
            if rank == 0:
                if reference not in references:
                    references[reference] = one_process(*reference)
                job, adapter, ref_latents, ref_pixels = references[reference]
                with torch.no_grad():
                    pixels = eight_bit(adapter.decode(job, output.images, "np"))
                results[config] = {
                    "latent_diff": float((output.images - ref_latents).abs().max()),
                    "pixel_diff": float((pixels - ref_pixels).abs().max()),
                    "reference": f"pipefusion=1,patches={reference[0]},warmup={reference[1]}",
                }
        except Exception as error:  # noqa: BLE001 - recorded per check; the parent test reports it
            results[config] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc(limit=6)}
            break  # the process group may be unusable after a failure
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
