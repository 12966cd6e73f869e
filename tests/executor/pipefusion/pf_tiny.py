"""The families' tiny transformers (`Family.tiny_transformer`) as PipeFusion jobs, for single-transformer checks.

Built straight from configs (no pipeline, no text encoder): 4 blocks (Flux 2+2), 4 heads, an
8x8 token grid (16 latent rows) so up to 8 patches fit.
"""
from __future__ import annotations

import inspect
import json
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from executor.families import TinyTransformer, declaration


def build(family: str, seed: int = 0, batch: int = 2, rows: int = 16, cols: int = 16, layers: int = 4) -> TinyTransformer:
    """The family's seeded tiny transformer and inputs (4 heads; `rows`, `cols`: the latent's size)."""
    return declaration(family).tiny_transformer(seed=seed, batch=batch, rows=rows, cols=cols, layers=layers)


def make_job(family: str, tiny: TinyTransformer, steps: int = 4, guidance: float = 4.0, seed: int = 0) -> Any:
    """A PatchJob for a bare transformer: the family's usual scheduler, CFG where the family uses it.

    `tiny` comes from `build(..., batch=2)`: with CFG the batch is [uncond, cond] over one sample;
    Flux (guidance-distilled, no CFG) denoises both entries as two samples.
    """
    from executor.pipefusion.job import PatchJob

    cfg = tiny.guided
    scheduler = tiny.make_scheduler()
    scheduler.set_timesteps(steps)
    sample = tiny.latents[:1] if cfg else tiny.latents
    channel_dim = declaration(family).adapter.latent_layout.index("C")
    channels = sample.shape[channel_dim]
    generator = torch.Generator().manual_seed(seed)
    # Schedulers that add noise (HunyuanDiT's DDPM) draw it from the job's generator; others take none (UniPC).
    step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

    def model_input(x: torch.Tensor, t: Any) -> torch.Tensor:
        return torch.cat([x, x]) if cfg else x

    def guide(out: torch.Tensor, step_index: int, t: Any) -> torch.Tensor:
        out = out.narrow(channel_dim, 0, channels)  # drop a learned sigma
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def step(sched: Any, noise: torch.Tensor, t: Any, x: torch.Tensor, step_index: int, patch: int | None) -> torch.Tensor:
        return sched.step(noise, t, x, return_dict=False, **step_options)[0]

    return PatchJob(sample.clone(), list(scheduler.timesteps), scheduler, tiny.inputs, model_input, tiny.timestep, guide, step, cfg)


@contextmanager
def reported_results(rank: int, out_path: str) -> Iterator[list[dict[str, Any]]]:
    """A list a spawned worker fills with its results; on leaving, rank 0 (and any rank that raised)
    writes {"results", "error"} as JSON to `out_path` (`out_path.rankN` for others), and a rank that
    did not fail leaves the process group."""
    import torch.distributed as dist

    results: list[dict[str, Any]] = []
    error = None
    try:
        yield results
    except Exception:
        error = traceback.format_exc()
        raise
    finally:
        if rank == 0 or error:
            with open(out_path if rank == 0 else f"{out_path}.rank{rank}", "w") as f:
                json.dump({"results": results, "error": error}, f)
        if error is None and dist.is_initialized():
            dist.destroy_process_group()
