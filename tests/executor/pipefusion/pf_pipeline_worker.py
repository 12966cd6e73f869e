"""Workers for PipeFusion on the executor's tiny diffusers pipelines, through `executor.parallelize`.

Rank 0 also computes, in-process, the references with an uncut pipeline built from the same seed:
the serial loop and the one-process patch-sequential loop with the same patches and warmup.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pf_tiny import reported_results

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


@lru_cache(maxsize=None)
def _uncut_pipeline(model_id: str) -> Any:
    """The reference pipeline of `model_id` (one-process loops never cut it, so one serves all)."""
    from executor.tiny import build_tiny_pipeline

    return build_tiny_pipeline(model_id, seed=0)


@lru_cache(maxsize=None)
@torch.no_grad()
def _reference(model_id: str, patches: int, warmup: int) -> tuple[torch.Tensor, np.ndarray]:
    """Final latents and 8-bit images of the one-process loop (patches 1: the serial loop)."""
    from costmodel.config import ParallelConfig
    from executor.families import adapter_for
    from executor.loop import denoise

    adapter = adapter_for(_uncut_pipeline(model_id))
    job = adapter.prepare(_request(model_id, "np"))
    latents = denoise(job, adapter, ParallelConfig(patches=patches, warmup=warmup))
    return latents, _eight_bit(adapter.decode(job, latents, "np"))


def references(model_id: str, patches: int, warmup: int) -> dict[str, Any]:
    """Serial and patch-sequential final latents and 8-bit images, with an uncut pipeline."""
    serial, serial_images = _reference(model_id, 1, 1)
    sequential, sequential_images = _reference(model_id, patches, warmup)
    return {"serial": serial, "serial_images": serial_images, "sequential": sequential, "sequential_images": sequential_images}


def worker(rank: int, world: int, port: int, cases: list[dict[str, Any]], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      DITPLAN_COLLECTIVE_TIMEOUT_S="120")  # a hung receive raises instead of blocking the test run
    torch.set_num_threads(1)
    from costmodel.config import ParallelConfig, Placement
    from executor import parallelize
    from executor.tiny import build_tiny_pipeline

    with reported_results(rank, out_path) as results:
        def plan_of(case: dict[str, Any]) -> str:
            return (f"pipefusion={case['pipefusion']},cfg={case.get('cfg', 1)},ulysses={case.get('ulysses', 1)},ring={case.get('ring', 1)},"
                    f"patches={case['patches']},warmup={case['warmup']}")

        # A pipeline keeps the stage it was cut to: one per (model, this rank's stage of how many).
        pipes: dict[tuple[str, int, int], Any] = {}

        def pipe_for(model_id: str, plan: str) -> Any:
            config = ParallelConfig.parse(plan)
            key = (model_id, Placement(config).coordinates(rank)["pipefusion"], config.pipefusion)
            if key not in pipes:
                pipes[key] = build_tiny_pipeline(model_id, seed=0)
            return pipes[key]

        for case in cases:
            model_id = case["model"]
            plan = plan_of(case)
            parallel = parallelize(pipe_for(model_id, plan), plan=plan, show_progress=False)
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
