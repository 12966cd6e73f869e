"""Staged transformers, stale-KV attention and per-stage parameters."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pf_tiny import build  # noqa: E402

from executor.families import FAMILIES  # noqa: E402

from executor.pipefusion.partition import keep_stage_only, parameter_count  # noqa: E402
from executor.pipefusion.pipeline import stage_units  # noqa: E402
from executor.pipefusion.stages import staged  # noqa: E402
from executor.pipefusion.stale_kv import StaleKVState, install_stale_kv  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_pieces_in_sequence_equal_the_forward(family: str) -> None:
    tiny = build(family)
    model, latents, kwargs = tiny.model, tiny.latents, tiny.inputs
    t = tiny.timestep(500.0)
    with torch.no_grad():
        expected = model(hidden_states=latents, timestep=t, **kwargs, return_dict=False)[0]
        stages = staged(model, family)
        got = stages.forward(latents, t, kwargs, stages.layout(latents, kwargs, 1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_stale_kv_patches_reproduce_the_full_image_when_nothing_changed(family: str) -> None:
    """Buffers filled from the same input: every patch (image rows and, for joint attention, its
    text strip; 6 text tokens over 4 patches is an uneven split) sees exactly the full image's
    and text's K/V, so each patch's output is the full output's strip; poisoned buffers change it."""
    tiny = build(family)
    model, latents, kwargs = tiny.model, tiny.latents, tiny.inputs
    t = tiny.timestep(500.0)
    stages = staged(model, family)
    layout = stages.layout(latents, kwargs, 4)
    state = StaleKVState()
    handle = install_stale_kv(stages.stale_layers(range(stages.unit_count())), state)
    try:
        with torch.no_grad():
            state.mode = "fill"
            cond = stages.condition(latents, t, kwargs)
            text_tokens = state.text_tokens = stages.text_tokens(cond)
            full = stages.forward(latents, t, kwargs, layout)
            state.mode = "patch"
            image = stages.embed(latents, cond)

            def run_patch(m: int) -> torch.Tensor:
                state.index, state.text_index = layout.token_index(m), layout.text_slice(m, text_tokens)
                state.text_tokens = state.text_index.stop - state.text_index.start
                carry = stages.select(image, state.index, state.text_index)
                for unit in range(stages.unit_count()):
                    carry = stages.run_unit(unit, carry, cond, state.index, state.text_index)
                return stages.head(carry, cond, layout, m)

            for m in range(layout.patches):
                torch.testing.assert_close(run_patch(m), layout.take_latent(full, m), rtol=1e-5, atol=1e-5)
            # Stale rows matter: poison the buffers outside patch 0 and patch 0's output moves.
            for processor in state.processors:
                for buffer in (processor.image.key, processor.image.value, processor.text.key, processor.text.value):
                    if buffer is not None:
                        buffer.mul_(3.0)
            patch0 = run_patch(0)
            assert (patch0 - layout.take_latent(full, 0)).abs().max() > 1e-3
    finally:
        handle.remove()
    assert all(not hasattr(module.processor, "state") for module, _ in stages.stale_layers(range(stages.unit_count())))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("degree", [2, 4])
def test_each_stage_keeps_about_its_share_of_the_blocks(family: str, degree: int) -> None:
    """Per-rank parameters: blocks within 10 % of 1/p of all blocks, plus the conditioning every
    stage keeps and the embedding (first) / head (last) extras, and nothing else."""
    layers = {"flux": 64, "hunyuan": 40, "hunyuan-video": 60}.get(family, 24)  # real models' depths: whole blocks split into near-equal shares
    model = build(family, layers=layers).model
    whole_blocks = sum(staged(model, family).unit_weights)
    for stage in range(degree):
        model = build(family, layers=layers).model
        stages = staged(model, family)
        shared = parameter_count(model) - whole_blocks - sum(
            parameter_count(getattr(model, a)) if isinstance(getattr(model, a), torch.nn.Module) else getattr(model, a).numel()
            for a in stages.first_stage_attrs + stages.last_stage_attrs if getattr(model, a) is not None
        )
        extras = sum(
            parameter_count(getattr(model, a)) if isinstance(getattr(model, a), torch.nn.Module) else getattr(model, a).numel()
            for a in ((stages.first_stage_attrs if stage == 0 else ()) + (stages.last_stage_attrs if stage == degree - 1 else ()))
            if getattr(model, a) is not None
        )
        units = stage_units(stages.unit_weights, degree, stage)
        keep_stage_only(stages, units, stage == 0, stage == degree - 1)
        kept_blocks = parameter_count(model) - shared - extras
        assert abs(kept_blocks - whole_blocks / degree) <= 0.10 * whole_blocks / degree, (family, degree, stage, kept_blocks, whole_blocks)
        assert parameter_count(model) <= whole_blocks / degree * 1.10 + shared + extras


@pytest.mark.parametrize("family", FAMILIES)
def test_stale_kv_through_the_sequence_parallel_processors(family: str) -> None:
    """The PipeFusion x SP path in one process (ulysses = ring = 1): stale KV reaches the SP
    processors' attention as their KV source, not through torch's attention function. Buffers
    filled from the same input reproduce the full image's strips; poisoned buffers change them; and
    torch's scaled_dot_product_attention stays the original function inside every layer."""
    from executor.pipefusion.hybrid import SequenceInStage

    original = torch.nn.functional.scaled_dot_product_attention
    tiny = build(family)
    model, latents, kwargs = tiny.model, tiny.latents, tiny.inputs
    t = tiny.timestep(500.0)
    stages = staged(model, family)
    layout = stages.layout(latents, kwargs, 4)
    units = range(stages.unit_count())
    sequence = SequenceInStage(stages, units, layout, None, None)
    state = StaleKVState()
    layers = [(module, sequence.text_position(position)) for module, position in stages.stale_layers(units)]
    handle = install_stale_kv(layers, state)
    in_place: list[bool] = []
    hooks = [sub.register_forward_pre_hook(lambda *_: in_place.append(torch.nn.functional.scaled_dot_product_attention is original))
             for module, _ in layers for sub in module.modules() if sub is not module]
    try:
        with torch.no_grad():
            cond = stages.condition(latents, t, kwargs)
            text_tokens = stages.text_tokens(cond)
            state.mode, state.text_tokens = "fill", text_tokens
            sequence.share(None, text_tokens)
            full = stages.forward(latents, t, kwargs, layout)
            state.mode = "patch"
            image = stages.embed(latents, cond)

            def run_patch(m: int) -> torch.Tensor:
                state.index, state.text_index = layout.token_index(m), layout.text_slice(m, text_tokens)
                state.text_tokens = state.text_index.stop - state.text_index.start
                mine = sequence.share(m, state.text_tokens)
                carry = stages.select(image, mine, state.text_index)
                for unit in units:
                    carry = stages.run_unit(unit, carry, cond, mine, state.text_index)
                return stages.head(carry, cond, layout, m)

            for m in range(layout.patches):
                torch.testing.assert_close(run_patch(m), layout.take_latent(full, m), rtol=1e-5, atol=1e-5)
            for processor in state.processors:
                for buffer in (processor.image.key, processor.image.value, processor.text.key, processor.text.value):
                    if buffer is not None:
                        buffer.mul_(3.0)
            assert (run_patch(0) - layout.take_latent(full, 0)).abs().max() > 1e-3
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
        sequence.remove()
    assert in_place and all(in_place)
