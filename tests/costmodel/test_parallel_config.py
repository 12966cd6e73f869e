"""ParallelConfig's text form and Placement's rank <-> coordinates map."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.config import AXES, ParallelConfig, Placement
from costmodel.errors import DitplanError


def test_text_form_round_trips_and_fills_defaults():
    config = ParallelConfig.parse("ulysses=2, cfg=2")
    assert str(config) == "cfg=2,ulysses=2,ring=1,pipefusion=1,patches=1,warmup=1,dp=1"
    assert ParallelConfig.parse(str(config)) == config
    assert ParallelConfig.parse("pipefusion=4").patches == 4
    assert config.world_size == 4 and config.sp == 2


@pytest.mark.parametrize(
    "text, words",
    [
        ("cfg=3", "cfg must be 1 or 2"),
        ("ulysses=0", "integer >= 1"),
        ("tp=2", "unknown key 'tp'"),
        ("ulysses=two", "not an integer"),
        ("ulysses=2,ulysses=2", "given twice"),
        ("ulysses", "not key=value"),
        ("pipefusion=4,patches=2", "patches must be >= pipefusion"),
        ("warmup=-1", "warmup"),
        ("", "empty"),
    ],
)
def test_bad_text_names_the_value_and_rule(text, words):
    with pytest.raises(DitplanError, match=words):
        ParallelConfig.parse(text)


def test_default_placement_puts_ulysses_on_nearest_ranks():
    placement = Placement(ParallelConfig(cfg=2, ulysses=2, pipefusion=2))
    assert placement.groups("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert placement.groups("pipefusion") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert placement.groups("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert placement.group_of(5, "cfg") == [1, 5]


def test_placement_must_list_every_axis_once():
    with pytest.raises(DitplanError, match="exactly once"):
        Placement(ParallelConfig(), ("ulysses", "ring", "cfg", "dp"))
    with pytest.raises(DitplanError, match="exactly once"):
        Placement(ParallelConfig(), (None,) * 5)


degrees = st.sampled_from([1, 2, 3, 4])


@given(cfg=st.sampled_from([1, 2]), ulysses=degrees, ring=degrees, pipefusion=degrees, dp=degrees,
       order=st.permutations(AXES))
@settings(deadline=None)  # up to 384 ranks per case; the shared test machine's load varies
def test_groups_partition_the_world_and_coordinates_invert(cfg, ulysses, ring, pipefusion, dp, order):
    config = ParallelConfig(cfg=cfg, ulysses=ulysses, ring=ring, pipefusion=pipefusion, dp=dp)
    placement = Placement(config, tuple(order))
    for rank in range(config.world_size):
        assert placement.rank_of(placement.coordinates(rank)) == rank
    for axis in AXES:
        groups = placement.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(config.world_size))
        assert all(len(g) == config.degree(axis) for g in groups)
    # the innermost axis of degree > 1 always gets consecutive ranks
    inner = next((a for a in order if config.degree(a) > 1), None)
    if inner is not None:
        for group in placement.groups(inner):
            assert group == list(range(group[0], group[0] + len(group)))
