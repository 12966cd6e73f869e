"""What the families' two-rank checks share.

Worker side (inside each rank of a `<family>_worker.py`): run plans with `executor.parallelize` on a
tiny pipeline and, on rank 0, compare the final latents and 8-bit images with the one-process run of
the same job (the serial loop, or for stale K/V, patches with warmup < steps, the one-process
patch-sequential loop of the same patches and warmup); record refusals.
Test side: start the two ranks, check each plan's figures and the refusals, run `ditplan run`.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from executor_spawn import recorded_communication, run_ranks  # noqa: E402
from rank_results import eight_bit  # noqa: E402

ROOT = HERE.parents[2]
PROMPTS = ["a photo of a cat", "a red car at night"]
SEED = 5
LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1.0  # one 8-bit level


# ----------------------------------------------------------------------------------- worker side
def reference_config(plan: str, steps: int) -> Any:
    """The one-process configuration `plan` must reproduce: the same patches and warmup where it
    runs on stale K/V, else the serial loop."""
    from costmodel.config import ParallelConfig

    config = ParallelConfig.parse(plan)
    stale = config.pipelines and config.warmup < steps
    return ParallelConfig(patches=config.patches, warmup=config.warmup) if stale else ParallelConfig()


def one_process_run(pipe: Any, steps: int, sizes: dict[str, int], config: Any, guidance: float | None = None) -> tuple:
    """(job, final latents, 8-bit images) of the one-process loop: a world of one, no collectives."""
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise

    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, **sizes,
                                generators=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))])
    job = adapter.prepare(request)
    with torch.no_grad():
        latents = denoise(job, adapter, config)
        return job, latents, eight_bit(adapter.decode(job, latents, "np"))


def compare_plans(pipe: Any, plans: Iterable[str], rank: int, steps: int, sizes: dict[str, int],
                  guidance: float | None = None, key: Callable[[str], str] = str) -> dict[str, dict]:
    """{key(plan): figures against the one-process run, or the error} for every plan, on rank 0
    (the other ranks record only errors). A refusal is recorded and the next plan runs; any other
    error (recorded with "refusal": False) ends the loop, since the process group may be unusable after it."""
    from costmodel.errors import DitplanError
    from executor.parallel import parallelize

    results: dict[str, dict] = {}
    references: dict = {}
    for plan in plans:
        try:
            reference = None
            if rank == 0:
                config = reference_config(plan, steps)
                if config not in references:
                    references[config] = one_process_run(pipe, steps, sizes, config, guidance)
                reference = references[config]
            # PipeFusion cuts the transformers to this rank's stage: each such plan gets its own pipeline.
            staged = "pipefusion" in plan or "patches" in plan
            parallel = parallelize(copy.deepcopy(pipe) if staged else pipe, plan=plan, show_progress=False)
            try:
                output = parallel(prompt=PROMPTS, num_inference_steps=steps, seed=SEED, guidance_scale=guidance,
                                  output_type="latent", **sizes)
            finally:
                parallel.close()
            if rank == 0:
                job, ref_latents, ref_pixels = reference
                latents = output.images if getattr(output, "frames", None) is None else output.frames
                with torch.no_grad():
                    pixels = eight_bit(parallel.adapter.decode(job, latents, "np"))
                results[key(plan)] = {"latent_diff": float((latents - ref_latents).abs().max()),
                                      "pixel_diff": float((pixels - ref_pixels).abs().max()),
                                      "latent_scale": float(ref_latents.abs().max())}
        except Exception as error:  # noqa: BLE001 - recorded per plan; the parent test reports it
            results[key(plan)] = {"error": f"{type(error).__name__}: {error}", "refusal": isinstance(error, DitplanError),
                                  "trace": traceback.format_exc(limit=8)}
            if not isinstance(error, DitplanError):
                break
    return results


def run_once(parallel: Any, sizes: dict[str, int], prompts: list[str] = PROMPTS[:1]) -> None:
    """One short generation (what a refusal must stop before it starts), then close."""
    try:
        parallel(prompt=prompts, num_inference_steps=1, seed=SEED, output_type="np", **sizes)
    finally:
        parallel.close()


def uneven_transformer_call(pipe: Any, family: str, sizes: dict[str, int]) -> None:
    """The transformer itself under Ulysses 2 at a size whose tokens do not split (what a model
    without a profile meets)."""
    import torch.distributed as dist

    from executor.families import GenerationRequest, adapter_for
    from executor.sp import enable_sequence_parallel

    adapter = adapter_for(pipe)
    job = adapter.prepare(GenerationRequest(prompts=PROMPTS[:1], num_inference_steps=1, **sizes,
                                            generators=[torch.Generator().manual_seed(SEED)]))
    handle = enable_sequence_parallel(pipe.transformer, family, dist.new_group([0, 1]), None)
    try:
        with torch.no_grad():
            pipe.transformer(**adapter.transformer_kwargs(job, job.latents, job.timesteps[0], job.branches[-1:]))
    finally:
        handle.remove()


def refusal(attempt: Callable[[], Any]) -> dict[str, str]:
    """{"message": the refusal's words}, or {"error": ...} where `attempt` was not refused."""
    from costmodel.errors import DitplanError

    try:
        attempt()
    except DitplanError as error:
        return {"message": str(error)}
    return {"error": "not refused"}


# ------------------------------------------------------------------------------------- test side
def spawn_pair(worker: Path, folder: Path, deadline_s: float = 420) -> dict:
    """Run `worker` as two ranks with their communication recorded; {"folder", 0: rank 0's results, 1: ...}."""
    with recorded_communication(folder / "communication"):
        outcomes = run_ranks(worker, 2, [str(folder)], deadline_s=deadline_s)
    for rank, (code, output) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited with {code}:\n{output[-4000:]}"
    return {"folder": folder, **{rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}}


def assert_matches_one_process(results: dict, name: str) -> None:
    assert name in results, f"{name} was not run (an earlier check broke the process group?)"
    entry = results[name]
    assert "error" not in entry, f"{name}: {entry['error']}\n{entry.get('trace', '')}"
    assert entry["latent_diff"] <= LATENT_TOLERANCE, f"{name}: latents differ by {entry['latent_diff']:.3g}"
    assert entry["pixel_diff"] <= PIXEL_TOLERANCE, f"{name}: 8-bit images differ by {entry['pixel_diff']} levels"


def assert_refused_alike(two_ranks: dict, name: str, words: str) -> None:
    """Both ranks refused `name` with the same message, which contains `words`."""
    messages = [two_ranks[rank][f"refusal|{name}"] for rank in (0, 1)]
    assert all("message" in m for m in messages), messages
    assert messages[0]["message"] == messages[1]["message"]
    assert words in messages[0]["message"], messages[0]["message"]


def ditplan_run_on_two_ranks(out: Path, model: str, plan: str, *options: str) -> dict:
    """`ditplan run --nproc 2` of one short generation; returns its run.json after checking its files."""
    result = subprocess.run(
        [sys.executable, "-m", "planner", "run", "--model", model, "--plan", plan, "--nproc", "2", "--seed", "3",
         "--prompt", "a cat", "--out", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2
    assert record["files"] and all((out / name).is_file() for name in record["files"])
    return record
