"""One rank of the SP correctness checks: `python sp_worker.py RANK WORLD INIT_FILE RESULT_FILE`.

Runs every check for its world size (2: Ulysses 2 and Ring 2; 4: USP 2x2, Ring 4, Ulysses 4) on the
tiny transformer of every executor family (`Family.tiny_transformer`) and on the bare attention primitive, and writes {check name: max abs diff
against the serial result, or the error text} as JSON. Each check's error is recorded and the run
goes on; an error that leaves the ranks out of step (a collective half done) ends the process with a
non-zero status, and gloo's timeout keeps the other ranks from waiting forever.
"""
from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(2, 2), (1, 4), (4, 1)]}


def layout_name(ulysses: int, ring: int) -> str:
    return f"ulysses={ulysses},ring={ring}"


def make_groups(ulysses: int, ring: int, world: int):
    """The Ulysses and Ring groups of this rank, laid out by costmodel's Placement (every rank builds all)."""
    from costmodel.config import ParallelConfig, Placement

    placement = Placement(ParallelConfig(ulysses=ulysses, ring=ring, dp=world // (ulysses * ring)))
    mine = {}
    for axis in ("ulysses", "ring"):
        for members in placement.groups(axis):
            group = dist.new_group(members) if len(members) > 1 else None
            if dist.get_rank() in members:
                mine[axis] = group
    return mine["ulysses"], mine["ring"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != serial {tuple(b.shape)}")
    return float((a - b).abs().max())


def check_primitive(ulysses_group, ring_group, rank_in_sp: int, sp: int) -> float:
    """sequence_parallel_attention with joint text tokens against full attention over image+text."""
    from executor.sp.attention import sequence_parallel_attention

    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=generator) for _ in range(3))
    tq, tk, tv = (torch.randn(2, 4, 5, 16, generator=generator) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2))
    chunk = slice(rank_in_sp * 32 // sp, (rank_in_sp + 1) * 32 // sp)
    out, text_out = sequence_parallel_attention(q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], ulysses_group, ring_group, tq, tk, tv)
    return max(max_diff(out, full[:, :, :32][:, :, chunk]), max_diff(text_out, full[:, :, 32:]))


def check_refusals(rank: int, ulysses_group, record) -> None:
    """Sizes that do not divide, and ranks that disagree on sizes, end in a DitplanError on every rank."""
    from executor.families import declaration
    from executor.sp import enable_sequence_parallel

    def odd_token_count() -> None:
        tiny = declaration("pixart").tiny_transformer(rows=6, cols=6)  # 6 x 6 latent / patch 2 = 9 tokens over 2 ranks
        enable_sequence_parallel(tiny.model, "pixart", ulysses_group, None)
        tiny.model(**tiny.call_kwargs())

    def heads_not_dividing() -> None:
        enable_sequence_parallel(declaration("pixart").tiny_transformer(heads=3).model, "pixart", ulysses_group, None)

    def ranks_disagree() -> None:
        size = 8 if rank == 0 else 12
        tiny = declaration("flux").tiny_transformer(rows=size, cols=size)
        enable_sequence_parallel(tiny.model, "flux", ulysses_group, None)
        tiny.model(**tiny.call_kwargs())

    def enabled_twice() -> None:
        model = declaration("sd3").tiny_transformer().model
        enable_sequence_parallel(model, "sd3", ulysses_group, None)
        enable_sequence_parallel(model, "sd3", ulysses_group, None)

    record("refuse/tokens", odd_token_count)
    record("refuse/twice", enabled_twice)
    record("refuse/heads", heads_not_dividing)
    record("refuse/shapes", ranks_disagree)


def main() -> None:
    rank, world, init_file, result_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    from executor.comm_trace import install_from_environment

    install_from_environment()  # before the group exists: the NCCL rule checker needs every call
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from costmodel.errors import DitplanError
    from executor.families import DECLARATIONS
    from executor.sp import enable_sequence_parallel
    from executor.sp.comm import group_rank, group_size

    results: dict[str, object] = {}

    def record(name: str, compute) -> None:
        try:
            results[name] = compute()
        except DitplanError as error:
            results[name] = f"DitplanError: {error}"
        except Exception:  # noqa: BLE001 - the parent test reports the worker's traceback
            results[name] = "error: " + traceback.format_exc()
        Path(result_file).write_text(json.dumps(results))

    layouts = [(u, r, *make_groups(u, r, world)) for u, r in LAYOUTS[world]]
    for u, r, ulysses_group, ring_group in layouts:
        sp_rank = group_rank(ring_group) * group_size(ulysses_group) + group_rank(ulysses_group)
        record(f"primitive/{layout_name(u, r)}", lambda: check_primitive(ulysses_group, ring_group, sp_rank, u * r))

    with torch.no_grad():
        for family, declared in DECLARATIONS.items():
            tiny = declared.tiny_transformer()
            model, kwargs = tiny.model, tiny.call_kwargs()
            serial = model(**kwargs)[0]
            for u, r, ulysses_group, ring_group in layouts:
                def run_parallel() -> float:
                    handle = enable_sequence_parallel(model, family, ulysses_group, ring_group)
                    try:
                        output = model(**kwargs)[0]
                        shard = handle.shard  # proof that this rank computed only its share of the tokens
                        if shard.stop - shard.start != shard.image_tokens // (u * r):
                            raise AssertionError(f"rank held tokens {shard.start}:{shard.stop} of {shard.image_tokens}")
                        if family == "flux":  # which text layout ran: split over the ranks, or whole
                            results[f"flux/{layout_name(u, r)}/text"] = [shard.text_split, shard.text_tokens]
                        return max_diff(output, serial)
                    finally:
                        handle.remove()
                record(f"{family}/{layout_name(u, r)}", run_parallel)
            record(f"{family}/removed", lambda: max_diff(model(**kwargs)[0], serial))

        if world == 2:
            check_refusals(rank, layouts[0][2], record)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
