"""The executor's serial loop is the diffusers pipeline: same final latents, bit for bit, every family.

This is the reference every parallel plan is compared with, so it must equal the pipeline's own
`__call__(output_type="latent")` (same prompts, one seeded generator per prompt).
"""
from __future__ import annotations

import inspect

import pytest
import torch

from executor.families import GenerationRequest, adapter_for
from executor.loop import denoise
from executor.tiny import build_tiny_pipeline, load_tiny_spec, tiny_ids

PROMPTS = ["a photo of a cat", "a red car at night"]


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(11 + i) for i in range(len(PROMPTS))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_id", tiny_ids())
def test_serial_loop_equals_the_pipeline_call(model_id):
    torch.set_num_threads(1)
    spec = load_tiny_spec(model_id)
    pipe = build_tiny_pipeline(model_id)
    adapter = adapter_for(pipe)
    call = {"prompt": PROMPTS, "height": spec["default_height"], "width": spec["default_width"],
            "num_inference_steps": 3, "output_type": "latent"}
    frames = spec["default_frames"] if adapter.is_video else None
    parameters = inspect.signature(pipe.__call__).parameters
    for name in ("num_frames", "video_length"):  # Latte's pipeline calls the frame count video_length
        if adapter.is_video and name in parameters:
            call[name] = frames
    if "true_cfg_scale" in parameters:  # Qwen-Image runs its CFG only given a negative prompt; the executor's default is ""
        call["negative_prompt"] = [""] * len(PROMPTS)
    if "use_resolution_binning" in parameters:
        call["use_resolution_binning"] = False  # the executor renders the size asked for
    expected = pipe(**call, generator=generators())
    expected = expected.frames if adapter.is_video else expected.images

    job = adapter.prepare(GenerationRequest(prompts=PROMPTS, height=spec["default_height"], width=spec["default_width"],
                                            num_frames=frames, num_inference_steps=3, generators=generators()))
    latents = denoise(job, adapter)
    assert latents.shape == expected.shape
    assert torch.equal(latents, expected), f"max abs diff {(latents - expected).abs().max().item():.3g}"
    assert job.do_cfg == spec["uses_cfg"]


@pytest.mark.timeout(120)
def test_data_parallel_share_reproduces_its_rows_of_the_batch():
    # Latte encodes a one-prompt batch differently (padding trimmed); a replica's share is cut from
    # the whole batch's job, so it still denoises exactly its rows.
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("tiny-latte")
    adapter = adapter_for(pipe)
    request = GenerationRequest(prompts=PROMPTS, num_inference_steps=2, generators=generators())
    whole = denoise(adapter.prepare(request), adapter)
    second = denoise(adapter.prepare(GenerationRequest(prompts=PROMPTS, num_inference_steps=2, generators=generators())).subset([1]), adapter)
    # Same inputs; only the transformer's batch size differs, which moves the last float bits.
    assert (second - whole[1:]).abs().max() <= 1e-5
    alone = denoise(adapter.prepare(request.subset([1])), adapter)
    assert (alone - whole[1:]).abs().max() > 1e-2, "Latte's one-prompt encoding no longer differs; simplify subset()"


@pytest.mark.timeout(120)
def test_two_experts_take_their_own_guidance_scales_as_the_pipeline_does():
    # tiny-wan2.2 at 3 steps: the high-noise expert runs step 0, the low-noise one steps 1-2 with guidance_scale_2.
    torch.set_num_threads(1)
    spec = load_tiny_spec("tiny-wan2.2")
    pipe = build_tiny_pipeline("tiny-wan2.2")
    adapter = adapter_for(pipe)
    size = {"height": spec["default_height"], "width": spec["default_width"], "num_frames": spec["default_frames"]}
    expected = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=5.0, guidance_scale_2=2.0, output_type="latent",
                    generator=generators(), **size).frames
    job = adapter.prepare(GenerationRequest(prompts=PROMPTS, num_inference_steps=3, guidance_scale=5.0, guidance_scale_2=2.0,
                                            generators=generators(), **size))
    assert job.step_experts == [0, 1, 1]
    latents = denoise(job, adapter)
    assert torch.equal(latents, expected), f"max abs diff {(latents - expected).abs().max().item():.3g}"
    same_scale = denoise(adapter.prepare(GenerationRequest(prompts=PROMPTS, num_inference_steps=3, guidance_scale=5.0,
                                                           generators=generators(), **size)), adapter)
    assert (same_scale - latents).abs().max() > 1e-3  # the second scale is used
