"""In every public (scenario, GPU count) group of two or more rows, of the published configurations the
one `ditplan search` ranks first is the published fastest (rows flagged `inconsistent` left out, as
public.csv's README says; models outside the catalogue skipped).

A failure here is a cost-model disagreement with the measurements (the planner only ranks the
simulator's figures); the message gives every row's rank, predicted and published latency.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest

import planner
from costmodel.config import ParallelConfig
from costmodel.specs import list_models

PUBLIC = Path(__file__).resolve().parents[2] / "profiles" / "validation" / "public.csv"


def _groups() -> dict[tuple[str, int], list[dict[str, str]]]:
    known = set(list_models())
    grouped: dict[tuple[str, int], list[dict[str, str]]] = {}
    with PUBLIC.open() as handle:
        for row in csv.DictReader(handle):
            if row["quality"] != "inconsistent" and row["model"] in known:
                grouped.setdefault((row["scenario"], int(row["gpus"])), []).append(row)
    return {key: rows for key, rows in grouped.items() if len(rows) > 1}


def _config(row: dict[str, str]) -> ParallelConfig:
    values = {key: int(row[key]) for key in ("cfg", "ulysses", "ring", "pipefusion", "dp")}
    for key in ("patches", "warmup"):  # empty: the papers' defaults, which are ParallelConfig's
        if row[key].strip():
            values[key] = int(row[key])
    return ParallelConfig(**values)


GROUPS = _groups()
@pytest.mark.parametrize("group", sorted(GROUPS), ids=lambda key: f"{key[0]}@{key[1]}")
def test_search_ranks_the_published_fastest_first(group):
    scenario, gpus = group
    rows = GROUPS[group]
    first = rows[0]
    # The published rows include PipeFusion without warmup: search without the default floor.
    result = planner.search(first["model"], first["cluster"], gpus, height=int(first["height"]),
                            width=int(first["width"]), frames=int(first["frames"]), steps=int(first["steps"]),
                            min_warmup=0)
    ranked: list[tuple[int, float, float, str]] = []
    for row in rows:
        config = _config(row)
        # The published rows leave the VAE decode alone; the search also chooses vae.
        position = next((i for i, plan in enumerate(result.plans) if replace(plan.config, vae=1) == config), None)
        assert position is not None, f"{scenario}: published {config} is not among the ranked plans (pruned?)"
        ranked.append((position, result.plans[position].latency_s, float(row["latency_s"]), str(config)))
    ranked.sort()
    published_fastest = min(ranked, key=lambda item: item[2])
    detail = "; ".join(f"#{pos + 1} {config}: predicted {pred:.2f} s, published {pub:.2f} s"
                       for pos, pred, pub, config in ranked)
    assert ranked[0] is published_fastest, f"{scenario} on {gpus} GPU(s): {detail}"


def test_every_group_is_checked():
    assert len(GROUPS) == 27
