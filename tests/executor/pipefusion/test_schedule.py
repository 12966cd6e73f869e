"""PipeFusion's tick schedule: every message travels after it is made and before it is used, and the
groups every stage posts replay under NCCL's rules, for any stage, patch and warmup count, and any
step at which a second expert takes over (whose first steps are warmup steps again)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from executor.nccl_rules import check_traces
from executor.pipefusion.pipeline import PipelineSchedule, pipeline_items


def _schedule(stages: int, steps: int, warmup: int, patches: int, skips: bool, switch: int = 0) -> PipelineSchedule:
    # skips: HunyuanDiT-like long skips from each early stage to its mirror stage; switch: the step
    # from which a second expert runs (0 or >= steps: one expert throughout).
    targets = [sorted({s + 1} | ({stages - 1 - s} if skips and s < stages - 1 - s - 1 else set())) if s < stages - 1 else []
               for s in range(stages)]
    experts = [0 if i < switch or switch == 0 else 1 for i in range(steps)]
    return PipelineSchedule(pipeline_items(steps, warmup, patches, experts), stages, targets)


def test_a_second_expert_warms_up_from_every_strip_of_the_step_before():
    schedule = _schedule(2, 4, 1, 2, False, switch=2)
    assert [(item.step, item.patch) for item in schedule.items] == [(0, None), (1, 0), (1, 1), (2, None), (3, 0), (3, 1)]
    assert schedule.starts_from[3] == [1, 2]  # both strips of step 1 come back to start step 2 whole
    assert schedule.starts_from[4] == [3] and 5 not in schedule.starts_from  # after a whole step stage 0 holds it all


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(1, 5), steps=st.integers(1, 5), warmup=st.integers(0, 5), patches=st.integers(1, 4),
       skips=st.booleans(), switch=st.integers(0, 5))
def test_messages_travel_between_making_and_use(stages, steps, warmup, patches, skips, switch):
    schedule = _schedule(stages, steps, warmup, patches, skips, switch)
    for message in schedule.messages:
        travels = schedule.travels(message)
        assert travels > schedule.tick[message.source][message.item]
        used_by = message.item if message.target != 0 else schedule.returns[message.item]
        assert travels <= schedule.tick[message.target][used_by]
    for s in range(stages):  # each stage computes its items in order, one per tick
        assert all(a < b for a, b in zip(schedule.tick[s], schedule.tick[s][1:]))


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(2, 5), steps=st.integers(1, 4), warmup=st.integers(0, 4), patches=st.integers(1, 4),
       skips=st.booleans(), switch=st.integers(0, 4))
def test_each_ticks_groups_replay_under_nccl_rules(stages, steps, warmup, patches, skips, switch):
    schedule = _schedule(stages, steps, warmup, patches, skips, switch)
    traces = {s: [{"op": "new_group", "group": "world", "name": "g1", "members": list(range(stages))}] for s in range(stages)}
    for s in range(stages):
        for _, sends, receives, _ in schedule.timeline(s):
            ops = [{"op": "send", "peer": m.target, "group": "g1", "numel": 1 + m.item, "dtype": "float32"} for m in sends]
            ops += [{"op": "recv", "peer": m.source, "group": "g1", "numel": 1 + m.item, "dtype": "float32"} for m in receives]
            if ops:
                traces[s].append({"op": "batch", "ops": ops})
    assert check_traces(traces) == []
