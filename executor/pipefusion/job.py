"""What the patch loop needs to know about one generation, independent of the family adapter.

`executor.pipefusion.denoise` builds a PatchJob from the executor's DenoiseJob and family adapter;
tests build one directly around a bare transformer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch



@dataclass
class PatchJob:
    """One denoising loop.

    latents: the initial latents of the samples (not doubled for CFG).
    timesteps: the scheduler's timesteps, in order.
    scheduler: the prepared scheduler (set_timesteps done).
    model_kwargs: transformer kwargs of the whole model batch, except the latents and the timestep
        (with CFG: the unconditional half first, then the conditional half, along dim 0).
    model_input(latents, t): the transformer's latent input for these latents (CFG doubling, the
        scheduler's input scaling). Must act element by element along the rows: it is called on
        strips as well as on the whole latent.
    model_timestep(t, batch): the timestep tensor the transformer takes.
    guide(model_output, step_index, t): the noise prediction for the latents from the model batch's
        output (CFG combine, dropping learned sigma). Element by element along the rows too.
    step(scheduler, noise, t, latents, step_index, patch): one scheduler step of the whole latent
        (patch None) or of strip `patch`; returns the new latents (strip).
    cfg: whether the model batch is [uncond, cond] (so CFG parallelism may split it).
    step_experts: the expert (index into the stages given to the loop) of each step; empty: the first
        runs every step.
    """

    latents: torch.Tensor
    timesteps: Sequence[Any]
    scheduler: Any
    model_kwargs: dict[str, Any]
    model_input: Callable[[torch.Tensor, Any], torch.Tensor]
    model_timestep: Callable[[Any, int], torch.Tensor]
    guide: Callable[[torch.Tensor, int, Any], torch.Tensor]
    step: Callable[[Any, torch.Tensor, Any, torch.Tensor, int, int | None], torch.Tensor]
    cfg: bool = False
    step_experts: Sequence[int] = ()

    def experts_of_steps(self) -> list[int]:
        """The expert of each step (the first throughout without `step_experts`)."""
        return list(self.step_experts) or [0] * len(self.timesteps)

    # Keys whose tensors are shared by the whole batch (position tables), never split by CFG.
    SHARED_KEYS = ("image_rotary_emb", "txt_ids", "img_ids")

    def cfg_half(self, half: int) -> dict[str, Any]:
        """model_kwargs of one CFG half (0: unconditional, 1: conditional)."""
        assert self.cfg, "cfg=2 without an unconditional half: refused at the entrance (executor.parallel)"
        batch = 2 * self.latents.shape[0]

        def cut(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                return value.chunk(2)[half]
            if isinstance(value, dict):
                return {k: cut(v) for k, v in value.items()}
            return value

        return {k: (v if k in self.SHARED_KEYS else cut(v)) for k, v in self.model_kwargs.items()}
