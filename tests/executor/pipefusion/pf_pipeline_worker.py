"""Workers for PipeFusion on the executor's tiny diffusers pipelines, through `executor.parallelize`.

Rank 0 also computes, in-process, the references with an uncut pipeline built from the same seed:
the serial loop and the one-process patch-sequential loop with the same patches and warmup.
"""
from __future__ import annotations

import json
import os
import traceback
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STEPS = 4
PROMPT = "a red fox in the snow"
# Flux's tiny pipeline defaults to a 4096-token image; 64x64 pixels keep it to 256 tokens here.
SIZES = {"tiny-flux-dev": {"height": 64, "width": 64}}


def _request(model_id: str, output_type: str) -> Any:
    from executor.families import GenerationRequest

    return GenerationRequest(prompts=[PROMPT], num_inference_steps=STEPS, generators=[torch.Generator().manual_seed(0)],
                             output_type=output_type, **SIZES.get(model_id, {}))


def _eight_bit(images: Any) -> np.ndarray:
    array = np.asarray(images if not isinstance(images, list) else np.stack([np.asarray(i) for i in images]), dtype=np.float64)
    return np.round(array * 255.0) if array.max() <= 1.0 else array


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@torch.no_grad()
def references(model_id: str, patches: int, warmup: int) -> dict[str, Any]:
    """Serial and patch-sequential final latents and 8-bit images, with an uncut pipeline."""
    from costmodel.config import ParallelConfig
    from executor.families import adapter_for
    from executor.loop import denoise
    from executor.tiny import build_tiny_pipeline

    out = {}
    for name, config in (("serial", ParallelConfig()), ("sequential", ParallelConfig(patches=patches, warmup=warmup))):
        pipe = build_tiny_pipeline(model_id, seed=0)
        adapter = adapter_for(pipe)
        job = adapter.prepare(_request(model_id, "np"))
        latents = denoise(job, adapter, config)
        out[name] = latents
        out[name + "_images"] = _eight_bit(adapter.decode(job, latents, "np"))
    return out


def worker(rank: int, world: int, port: int, cases: list[dict[str, Any]], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      DITPLAN_COLLECTIVE_TIMEOUT_S="120")  # a hung receive raises instead of blocking the test run
    torch.set_num_threads(1)
    from executor import parallelize
    from executor.tiny import build_tiny_pipeline

    results, error = [], None
    try:
        # Built before the process group exists: transformers' save_pretrained writes nothing on a
        # rank other than 0 once torch.distributed is initialised. A pipeline keeps the stage it
        # was cut to, so one per (model, plan).
        def plan_of(case: dict[str, Any]) -> str:
            return (f"pipefusion={case['pipefusion']},cfg={case.get('cfg', 1)},ulysses={case.get('ulysses', 1)},ring={case.get('ring', 1)},"
                    f"patches={case['patches']},warmup={case['warmup']}")

        pipes: dict[tuple[str, str], Any] = {}
        for case in cases:
            key = (case["model"], plan_of(case))
            if key not in pipes:
                pipes[key] = build_tiny_pipeline(case["model"], seed=0)
        for case in cases:
            model_id = case["model"]
            plan = plan_of(case)
            key = (model_id, plan)
            parallel = parallelize(pipes[key], plan=plan, show_progress=False)
            output = parallel(prompt=PROMPT, num_inference_steps=STEPS, seed=0, output_type="latent", **SIZES.get(model_id, {}))
            if rank != 0:
                continue
            latents = output.images if output.images is not None else output.frames
            refs = references(model_id, case["patches"], case["warmup"])
            with torch.no_grad():
                images = _eight_bit(parallel.adapter.decode(parallel.adapter.prepare(_request(model_id, "np")), latents, "np"))
            results.append({
                **case,
                "max_abs_vs_sequential": (latents - refs["sequential"]).abs().max().item(),
                "max_abs_vs_serial": (latents - refs["serial"]).abs().max().item(),
                "rel_l2_vs_serial": ((latents - refs["serial"]).norm() / refs["serial"].norm()).item(),
                "max_level_vs_sequential": float(np.abs(images - refs["sequential_images"]).max()),
                "max_level_vs_serial": float(np.abs(images - refs["serial_images"]).max()),
                "psnr_vs_serial": _psnr(images, refs["serial_images"]),
            })
    except Exception:
        error = traceback.format_exc()
        raise
    finally:
        if rank == 0 or error:
            with open(out_path if rank == 0 else f"{out_path}.rank{rank}", "w") as f:
                json.dump({"results": results, "error": error}, f)
        if error is None and dist.is_initialized():
            dist.destroy_process_group()
