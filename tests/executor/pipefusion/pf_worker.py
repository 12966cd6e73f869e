"""Worker processes for the distributed PipeFusion checks: one spawn runs many cases.

Each case builds the same seeded tiny transformer on every rank, keeps only the rank's stage of it,
runs `denoise_pipelined`, and rank 0 compares the final latents with the one-process references:
the patch-sequential algorithm (same patches and warmup) and the serial loop.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from costmodel.config import ParallelConfig, Placement
from pf_tiny import build, make_job, reported_results

Case = dict[str, Any]  # family, pipefusion, cfg, patches, warmup, steps


def serial_latents(family: str, steps: int, rows: int = 16) -> torch.Tensor:
    """The plain loop with the unmodified transformer: the serial reference."""
    tiny = build(family, rows=rows)
    model = tiny.model
    job = make_job(family, tiny, steps=steps)
    x = job.latents.clone()
    with torch.no_grad():
        for i, t in enumerate(job.timesteps):
            inp = job.model_input(x, t)
            out = model(hidden_states=inp, timestep=job.model_timestep(t, inp.shape[0]), **job.model_kwargs, return_dict=False)[0]
            x = job.step(job.scheduler, job.guide(out, i, t), t, x, i, None)
    return x


def _config(case: Case) -> ParallelConfig:
    return ParallelConfig(cfg=case["cfg"], ulysses=case.get("ulysses", 1), ring=case.get("ring", 1), pipefusion=case["pipefusion"],
                          patches=case["patches"], warmup=case["warmup"])


def run_case(case: Case, groups: dict[tuple[int, ...], Any]) -> dict[str, Any] | None:
    from executor.pipefusion.partition import keep_stage_only, parameter_count
    from executor.pipefusion.pipeline import denoise_pipelined, stage_units
    from executor.pipefusion.sequential import denoise_sequential
    from executor.pipefusion.stages import staged

    family, steps = case["family"], case["steps"]
    config = _config(case)
    placement = Placement(config)
    rank = dist.get_rank()
    pipe_ranks = placement.group_of(rank, "pipefusion")
    cfg_ranks = placement.group_of(rank, "cfg") if config.cfg > 1 else None
    ulysses_ranks = placement.group_of(rank, "ulysses") if config.ulysses > 1 else None
    ring_ranks = placement.group_of(rank, "ring") if config.ring > 1 else None
    rows = case.get("rows", 16)
    tiny = build(family, rows=rows)
    model = tiny.model
    whole = parameter_count(model)
    stages = staged(model, family)
    stage = pipe_ranks.index(rank)
    keep_stage_only(stages, stage_units(stages.unit_weights, config.pipefusion, stage), stage == 0, stage == config.pipefusion - 1)
    job = make_job(family, tiny, steps=steps)
    out = denoise_pipelined(job, stages, pipe_ranks, groups.get(tuple(pipe_ranks)), config.patches, config.warmup,
                            cfg_ranks, groups[tuple(cfg_ranks)] if cfg_ranks else None,
                            groups[tuple(ulysses_ranks)] if ulysses_ranks else None, groups[tuple(ring_ranks)] if ring_ranks else None)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([parameter_count(model)]))
    counts = [counts[r] for r in pipe_ranks]  # one rank per stage
    if rank != 0:
        return None
    ref = build(family, rows=rows)
    reference = denoise_sequential(make_job(family, ref, steps=steps), staged(ref.model, family),
                                   config.patches, config.warmup)
    serial = serial_latents(family, steps, rows)
    return {
        **case,
        "max_abs_vs_reference": (out - reference).abs().max().item(),
        "max_abs_vs_serial": (out - serial).abs().max().item(),
        "max_abs_serial": serial.abs().max().item(),
        "stage_params": [int(c.item()) for c in counts],
        "whole_params": whole,
    }


def worker(rank: int, world: int, port: int, cases: list[Case], out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    from executor.comm_trace import install_from_environment

    install_from_environment()  # before the group exists: the NCCL rule checker needs every call
    # A hung receive raises after this long instead of blocking the test run.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    with reported_results(rank, out_path) as results:
        groups: dict[tuple[int, ...], Any] = {}
        for case in cases:  # every rank creates the same groups in the same order
            config = _config(case)
            for axis in ("ulysses", "ring", "pipefusion", "cfg"):
                for members in Placement(config).groups(axis):
                    if len(members) > 1 and tuple(members) not in groups:
                        groups[tuple(members)] = dist.new_group(members)
        for case in cases:
            result = run_case(case, groups)
            if result is not None:
                results.append(result)
