"""The search space: GPU-count parsing, factorisations, patches, warmup and placement classes."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.config import AXES, DEFAULT_PLACEMENT, ParallelConfig, Placement
from costmodel.errors import DitplanError
from planner.space import (
    degree_tuples,
    distinct_placements,
    enumerate_configs,
    Hierarchy,
    full_order,
    parse_gpu_counts,
    patch_counts,
    short_config,
    warmup_options,
)


@pytest.mark.parametrize("text, counts", [
    ("8", [8]), ("1-4", [1, 2, 3, 4]), ("1,2,4,8", [1, 2, 4, 8]), ("2-4,16", [2, 3, 4, 16]),
    (" 4 , 2 ", [2, 4]), (6, [6]), ([4, 2, 4], [2, 4]),
])
def test_parse_gpu_counts(text, counts):
    assert parse_gpu_counts(text) == counts


@pytest.mark.parametrize("text, fragment", [
    ("0", "0 GPUs"), ("8-2", "runs backwards"), ("eight", "'eight' is not a count"), ("", "is not a count"),
])
def test_parse_gpu_counts_refuses_with_the_bad_value(text, fragment):
    with pytest.raises(DitplanError, match=fragment):
        parse_gpu_counts(text)


def _brute_force_degrees(n: int) -> set[tuple[int, ...]]:
    found = set()
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for cfg in (1, 2):
        for u, r, p, dp in itertools.product(divisors, repeat=4):
            if cfg * u * r * p * dp == n:
                found.add((cfg, u, r, p, dp))
    return found


@pytest.mark.parametrize("n", [1, 2, 6, 8, 12, 16])
def test_degree_tuples_are_every_factorisation_once(n):
    produced = [(d["cfg"], d["ulysses"], d["ring"], d["pipefusion"], d["dp"]) for d in degree_tuples(n)]
    assert len(produced) == len(set(produced))
    assert set(produced) == _brute_force_degrees(n)


def test_patch_counts_run_from_p_to_4p_where_rows_divide():
    assert patch_counts(1, 128) == [1]
    assert patch_counts(2, 128) == [2, 4, 8]
    assert patch_counts(4, 128) == [4, 8, 16]
    assert patch_counts(3, 128) == [4, 8]
    # Nothing in range divides: keep M = p so that validation prunes it with its reason.
    assert patch_counts(5, 7) == [7]
    assert patch_counts(5, 3) == [5]


def test_warmup_varies_only_where_patches_run():
    assert warmup_options(1, 20) == [1]
    assert warmup_options(4, 20) == [0, 1, 2]
    assert warmup_options(4, 1) == [0, 1]


def test_enumerate_configs_multiplies_to_n_and_has_no_duplicates():
    configs = list(enumerate_configs(8, 128, 20))
    assert all(c.world_size == 8 for c in configs)
    assert len({str(c) for c in configs}) == len(configs)
    assert ParallelConfig(cfg=2, pipefusion=4, patches=8, warmup=0) in configs
    assert ParallelConfig(ulysses=8) in configs


@given(st.sampled_from([ParallelConfig(ulysses=2, ring=2, pipefusion=2), ParallelConfig(cfg=2, ulysses=3, dp=2),
                        ParallelConfig(ring=4, pipefusion=3, cfg=2), ParallelConfig(ulysses=5)]),
       st.permutations(list(AXES)))
@settings(max_examples=40, deadline=None)
def test_placement_groups_are_the_ranks_that_share_the_other_coordinates(config, order):
    """The stride arithmetic of `Placement.groups_of` against its definition through `coordinates`."""
    placement = Placement(config, tuple(order))
    coords = [placement.coordinates(rank) for rank in range(config.world_size)]
    for axes in [(axis,) for axis in AXES] + [("ulysses", "ring"), ("cfg", "pipefusion")]:
        expected: dict[tuple, set[int]] = {}
        for rank, c in enumerate(coords):
            expected.setdefault(tuple(c[a] for a in AXES if a not in axes), set()).add(rank)
        groups = placement.groups_of(axes)
        assert sorted(map(frozenset, groups)) == sorted(map(frozenset, expected.values()))
        assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    for axis in AXES:
        for group in placement.groups(axis):
            assert [coords[rank][axis] for rank in group] == list(range(config.degree(axis)))
        if config.degree(axis) > 1:  # one step along the axis from rank 0 moves by its stride
            assert placement.rank_of({**coords[0], axis: 1}) == placement.strides[axis]


def test_distinct_placements_keep_one_order_per_set_of_groups():
    config = ParallelConfig(cfg=2, ulysses=2, pipefusion=2)
    placements = distinct_placements(config)
    assert placements[0].order == DEFAULT_PLACEMENT
    assert len(placements) == 6  # 3 non-trivial axes, each order gives other groups
    seen = set()
    for placement in placements:
        key = tuple(tuple(sorted(map(tuple, placement.groups(axis)))) for axis in AXES)
        assert key not in seen
        seen.add(key)
    # Every one of the 120 orders is equivalent to one kept placement.
    kept = {tuple(tuple(sorted(map(tuple, p.groups(a)))) for a in AXES) for p in placements}
    for order in itertools.permutations(AXES):
        placement = Placement(config, order)
        assert tuple(tuple(sorted(map(tuple, placement.groups(a)))) for a in AXES) in kept


def test_distinct_placements_merge_orders_of_the_same_shape():
    config = ParallelConfig(ulysses=2, ring=4)
    # One flat domain of 8 (an NVLink node): every order is alike, one placement is enough.
    assert [p.order for p in distinct_placements(config, Hierarchy((8,)))] == [DEFAULT_PLACEMENT]
    # Switches of two in sockets of four: ulysses inside a switch (default) or across sockets.
    assert len(distinct_placements(config, Hierarchy((2, 4)))) == 2
    # Three axes in a flat domain: still one; in switch/socket/node levels of one bit each: all 6.
    three = ParallelConfig(ulysses=2, ring=2, pipefusion=2)
    assert len(distinct_placements(three, Hierarchy((8,)))) == 1
    assert len(distinct_placements(three, Hierarchy((2, 4, 8)))) == 6
    # Two nodes of 4 GPUs alike: ring=2 x dp=2 inside the node, pipefusion=2 across or not.
    mixed = ParallelConfig(ring=2, dp=2, pipefusion=2)
    assert len(distinct_placements(mixed, Hierarchy((4,)))) == 3


def test_hierarchy_signature_counts_bits_per_level():
    hierarchy = Hierarchy((2, 4, 8))
    config = ParallelConfig(ulysses=2, ring=4, dp=4)  # 32 GPUs: 4 nodes
    assert hierarchy.signature(config, ("ulysses", "ring", "dp")) == (
        ("dp", (0, 0, 0, 2)), ("ring", (0, 1, 1, 0)), ("ulysses", (1, 0, 0, 0)))
    assert hierarchy.signature(ParallelConfig(ulysses=3, ring=2), ("ulysses", "ring")) is None
    assert Hierarchy((3,)).signature(config, ("ulysses", "ring", "dp")) is None


def test_single_gpu_and_pure_configs_have_one_placement():
    assert [p.order for p in distinct_placements(ParallelConfig())] == [DEFAULT_PLACEMENT]
    assert [p.order for p in distinct_placements(ParallelConfig(ring=8))] == [DEFAULT_PLACEMENT]


def test_full_order_keeps_default_where_relative_order_is_default():
    config = ParallelConfig(ulysses=2, cfg=2)
    assert full_order(config, ("ulysses", "cfg")) == DEFAULT_PLACEMENT
    assert full_order(config, ("cfg", "ulysses"))[:2] == ("cfg", "ulysses")
    assert sorted(full_order(config, ("cfg", "ulysses"))) == sorted(AXES)


def test_short_config():
    assert short_config(ParallelConfig()) == "serial"
    assert short_config(ParallelConfig(cfg=2, pipefusion=4)) == "cfg=2,pipefusion=4,warmup=1"
    assert short_config(ParallelConfig(ulysses=2, ring=2, pipefusion=2, patches=4, warmup=0)) == \
        "ulysses=2,ring=2,pipefusion=2,patches=4,warmup=0"


def test_patch_counts_leave_room_for_the_sequence_parallel_split():
    assert patch_counts(2, 128, sp=16) == [2, 4, 8]
    assert patch_counts(2, 128, sp=32) == [2, 4]
    assert patch_counts(4, 128, sp=64) == [4]  # nothing fits: kept so that validation says why
