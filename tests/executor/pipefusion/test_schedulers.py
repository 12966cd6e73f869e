"""Patch-by-patch scheduler steps equal the scheduler's own full-latent step."""
from __future__ import annotations

import pytest
import torch

from costmodel.errors import DitplanError
from executor.pipefusion.layout import PatchLayout
from executor.pipefusion.schedulers import PatchScheduler


def _schedulers() -> dict[str, object]:
    from diffusers import (CogVideoXDDIMScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           FlowMatchEulerDiscreteScheduler)

    return {
        "flow-match-euler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "dpm-solver-multistep-2": DPMSolverMultistepScheduler(solver_order=2),
        "dpm-solver-multistep-3": DPMSolverMultistepScheduler(solver_order=3),
        "ddim": DDIMScheduler(),
        "ddpm": DDPMScheduler(),  # draws noise inside step: one full draw per step, sliced
        "cogvideox-ddim": CogVideoXDDIMScheduler(),
    }


@pytest.mark.parametrize("name", list(_schedulers()))
@pytest.mark.parametrize("patches", [1, 3, 4])
def test_patch_steps_equal_full_steps(name: str, patches: int) -> None:
    steps, shape = 5, (2, 4, 12, 8)  # 12 latent rows = 6 token rows: 3 patches of 2, 4 of 1-2 (uneven)
    full_sched, patch_sched = _schedulers()[name], _schedulers()[name]
    full_sched.set_timesteps(steps)
    patch_sched.set_timesteps(steps)
    layout = PatchLayout(token_rows=6, row_tokens=4, latent_rows_per_token_row=2, token_frames=1, patches=patches)
    wrapper = PatchScheduler(patch_sched, layout, shape)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(shape, generator=gen)
    by_patch = full.clone()
    outputs = [torch.randn(shape, generator=gen) for _ in range(steps)]
    full_gen, patch_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(full_sched.timesteps):
        full = full_sched.step(outputs[i], t, full, generator=full_gen, return_dict=False)[0]
        for m in range(patches):
            with wrapper.patch(m):
                strip = wrapper.step(layout.take_latent(outputs[i], m), t, layout.take_latent(by_patch, m),
                                     generator=patch_gen, return_dict=False)[0]
            layout.put_latent(by_patch, m, strip)
    torch.testing.assert_close(by_patch, full, rtol=0, atol=1e-6)
    assert torch.count_nonzero(full - outputs[-1]) > 0  # the check compares real updates


def test_thresholding_is_refused() -> None:
    from diffusers import DPMSolverMultistepScheduler

    layout = PatchLayout(4, 4, 2, 1, 2)
    with pytest.raises(DitplanError, match="thresholding"):
        PatchScheduler(DPMSolverMultistepScheduler(thresholding=True), layout, (1, 4, 8, 8))


def test_layout_strips_cover_the_image_once() -> None:
    layout = PatchLayout(token_rows=7, row_tokens=3, latent_rows_per_token_row=2, token_frames=2, patches=3)
    assert [layout.patch_rows(m) for m in range(3)] == [3, 2, 2]
    covered = torch.cat([layout.token_index(m) for m in range(3)]).sort().values
    assert torch.equal(covered, torch.arange(layout.image_tokens))
    with pytest.raises(DitplanError, match="patches=8"):
        PatchLayout(7, 3, 2, 1, 8)
