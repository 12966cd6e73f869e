"""Stepping a diffusers scheduler one patch (row strip) at a time.

The schedulers the supported pipelines use (flow-matching Euler, DPM-Solver multistep, DDIM, DDPM,
Euler) update every latent element from the same element of the model output, the sample and the
scheduler's own history (DPM-Solver keeps the last model outputs). So one step can be taken strip
by strip: before each strip the scheduler's state is set back to what it was when the step began,
with every latent-sized tensor in it cut to the strip; after the strip, the latent-sized tensors it
left behind are written into full-size copies. When all strips of the step are done, the assembled
state is the one the full-latent step would have left. Noise drawn inside a step (DDPM) is drawn
once for the full latent, from the same generator call a full step makes, and sliced.

Refused: schedulers that normalise over the whole image (dynamic thresholding).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from costmodel.errors import DitplanError
from executor.pipefusion.layout import PatchLayout


def _copy_containers(value: Any) -> Any:
    """Copy lists/tuples/dicts recursively, keeping tensors and other objects by reference."""
    if type(value) is list:
        return [_copy_containers(v) for v in value]
    if type(value) is tuple:
        return tuple(_copy_containers(v) for v in value)
    if type(value) is dict:
        return {k: _copy_containers(v) for k, v in value.items()}
    return value


def _map_tensors(value: Any, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value) if tuple(value.shape) == shape else value
    if type(value) is list:
        return [_map_tensors(v, shape, fn) for v in value]
    if type(value) is tuple:
        return tuple(_map_tensors(v, shape, fn) for v in value)
    if type(value) is dict:
        return {k: _map_tensors(v, shape, fn) for k, v in value.items()}
    return value


class PatchScheduler:
    """A drop-in stand-in for a scheduler whose `step` takes one strip's tensors.

    Use `with patch_scheduler.patch(m): patch_scheduler.step(noise_strip, t, latents_strip, ...)`
    for m = 0..M-1 in order within each denoising step; outside `patch(...)` it steps the full latent.
    Every other attribute is the wrapped scheduler's.
    """

    def __init__(self, scheduler: Any, layout: PatchLayout, latent_shape: tuple[int, ...]) -> None:
        if getattr(getattr(scheduler, "config", None), "thresholding", False):
            raise DitplanError(
                f"PipeFusion: scheduler {type(scheduler).__name__} uses dynamic thresholding, which normalises over the whole "
                "image and so cannot step one patch at a time; turn thresholding off or use a plan without patches."
            )
        self.__dict__["_scheduler"] = scheduler
        self._layout = layout
        self._full_shape = tuple(latent_shape)
        self._current: int | None = None
        self._begin_state: dict[str, Any] | None = None
        self._assembled: dict[str, Any] = {}
        self._stepped: set[int] = set()
        self._noise: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_scheduler"], name)

    def _patch_shape(self, m: int) -> tuple[int, ...]:
        shape = list(self._full_shape)
        shape[-2] = self._layout.latent_slice(m).stop - self._layout.latent_slice(m).start
        return tuple(shape)

    @contextmanager
    def patch(self, m: int) -> Iterator["PatchScheduler"]:
        self._current = m
        try:
            yield self
        finally:
            self._current = None

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._scheduler.scale_model_input(sample, *args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped scheduler's `step` on the current strip: its tensor arguments are strips, or
        full-latent tensors (a solver's previous prediction), which are cut to the strip here."""
        m = self._current
        scheduler = self._scheduler
        if m is None:
            if self._begin_state is not None:
                raise RuntimeError("a full-latent scheduler step began while a patch-by-patch step was unfinished")
            return scheduler.step(*args, **kwargs)
        if m in self._stepped:
            raise RuntimeError(f"patch {m} was stepped twice in one denoising step")
        if self._begin_state is None:
            self._begin_state = _copy_containers(dict(vars(scheduler)))
            self._assembled, self._noise = {}, None
        strip = self._layout.latent_slice(m)
        shape = self._patch_shape(m)
        vars(scheduler).update(_map_tensors(_copy_containers(self._begin_state), self._full_shape, lambda t: t[..., strip, :]))
        args = _map_tensors(args, self._full_shape, lambda t: t[..., strip, :])
        kwargs = _map_tensors(kwargs, self._full_shape, lambda t: t[..., strip, :])
        with self._full_noise(m):
            result = scheduler.step(*args, **kwargs)
        for key, value in vars(scheduler).items():
            if key not in self._assembled:  # the same structure for every strip of a step
                self._assembled[key] = _map_tensors(value, shape, lambda t: t.new_zeros(self._full_shape))
            self._write_strip(self._assembled[key], value, shape, strip)
        self._stepped.add(m)
        if len(self._stepped) == self._layout.patches:
            vars(scheduler).update(self._assembled)
            self._begin_state, self._assembled, self._noise = None, {}, None
            self._stepped = set()
        return result

    def _write_strip(self, full: Any, part: Any, shape: tuple[int, ...], strip: slice) -> None:
        if isinstance(part, torch.Tensor) and tuple(part.shape) == shape and isinstance(full, torch.Tensor):
            full[..., strip, :] = part
        elif type(part) in (list, tuple):
            for f, p in zip(full, part):
                self._write_strip(f, p, shape, strip)
        elif type(part) is dict:
            for k, p in part.items():
                self._write_strip(full[k], p, shape, strip)

    @contextmanager
    def _full_noise(self, m: int) -> Iterator[None]:
        """Make the scheduler's `randn_tensor` hand out this strip of one full-latent draw per step."""
        module = sys.modules[type(self._scheduler).__module__]
        original = getattr(module, "randn_tensor", None)
        if original is None:
            yield
            return
        strip = self._layout.latent_slice(m)

        def strip_of_full_draw(shape: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self._noise is None:
                self._noise = original(self._full_shape, *args, **kwargs)
            return self._noise[..., strip, :]

        module.randn_tensor = strip_of_full_draw
        try:
            yield
        finally:
            module.randn_tensor = original
