"""One rank of the pipeline-level parallel checks: `python parallel_worker.py WORLD RESULT_DIR`.

The environment carries torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the
executor joins the group exactly as under torchrun. For every tiny family and every configuration
of this world size it runs `executor.parallelize(pipe, plan=CONFIG)` on two prompts and, on rank 0,
compares the final latents and the decoded 8-bit images with the serial loop (one process, the
diffusers-equivalent reference). Results go to RESULT_DIR/rank<R>.json as {check: figures or error}.
A check that fails on every rank alike (a refusal) is recorded and the run goes on.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
from rank_results import eight_bit, tiny_size, write_and_exit  # noqa: E402

# Ring 4 and Ulysses 4 run on two families only (the 4-rank spawn's time): one whose text stays out
# of the attention, and Flux, whose text is split with the image where its token count divides.
WIDE_SP_FAMILIES = ("pixart", "flux")
PROMPTS = ["a photo of a cat", "a red car at night"]
STEPS = 3
SEED = 5


def configs_for(world: int, family: str) -> list[str]:
    """The configurations checked for one family at this world size (CFG ones where its model uses CFG)."""
    from executor.tiny import load_tiny_spec, tiny_model_per_family

    uses_cfg = bool(load_tiny_spec(tiny_model_per_family()[family])["uses_cfg"])
    if world == 2:
        return (["cfg=2"] if uses_cfg else []) + ["dp=2", "ulysses=2", "ring=2"]
    configs = (["cfg=2,dp=2", "cfg=2,ulysses=2"] if uses_cfg else []) + ["ulysses=2,ring=2"]
    if family in WIDE_SP_FAMILIES:
        configs += ["ring=4", "ulysses=4"]
    return configs


def serial_reference(pipe, size: dict[str, int]):
    """Final latents and decoded 8-bit images of the serial loop (world of one, no collectives)."""
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise

    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS, num_inference_steps=STEPS, **size,
                                generators=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))])
    job = adapter.prepare(request)
    with torch.no_grad():
        latents = denoise(job, adapter)
        return job, latents, eight_bit(adapter.decode(job, latents, "np"))


def main() -> None:
    world, result_dir = int(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    from costmodel.errors import DitplanError
    from executor.parallel import parallelize
    from executor.tiny import build_tiny_pipeline, tiny_model_per_family

    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {}
    for family, model_id in tiny_model_per_family().items():
        pipe = build_tiny_pipeline(model_id)
        size = tiny_size(model_id)
        reference = serial_reference(pipe, size) if rank == 0 else None
        for config in configs_for(world, family):
            name = f"{family}|{config}"
            if os.environ.get("DITPLAN_TEST_VERBOSE"):
                print(f"rank {rank}: {name}", flush=True)
            try:
                parallel = parallelize(pipe, plan=config, show_progress=False)
                try:
                    output = parallel(prompt=PROMPTS, num_inference_steps=STEPS, seed=SEED, output_type="latent", **size)
                finally:
                    parallel.close()
                if rank == 0:
                    job, ref_latents, ref_pixels = reference
                    latents = output.frames if parallel.adapter.is_video else output.images
                    with torch.no_grad():
                        pixels = eight_bit(parallel.adapter.decode(job, latents, "np"))
                    results[name] = {
                        "latent_diff": float((latents - ref_latents).abs().max()),
                        "pixel_diff": float((pixels - ref_pixels).abs().max()),
                        "latent_scale": float(ref_latents.abs().max()),
                    }
            except Exception as error:  # noqa: BLE001 - recorded per check; the parent test reports it
                results[name] = {"error": f"{type(error).__name__}: {error}",
                                 "refusal": isinstance(error, DitplanError),
                                 "trace": traceback.format_exc(limit=6)}
                if not isinstance(error, DitplanError):
                    break
    if world == 2:
        # A refusal: Flux has no CFG half; every rank must refuse alike, before any collective.
        try:
            parallelize(build_tiny_pipeline("tiny-flux-dev"), plan="cfg=2")
            results["refusal|flux cfg=2"] = {"error": "not refused"}
        except DitplanError as error:
            results["refusal|flux cfg=2"] = {"message": str(error)}
    write_and_exit(result_dir, rank, results)


if __name__ == "__main__":
    main()
