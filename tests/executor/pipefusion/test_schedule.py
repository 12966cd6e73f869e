"""PipeFusion's tick schedule: every message travels after it is made and before it is used, and the
groups every stage posts replay under NCCL's rules, for any stage, patch and warmup count."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from executor.nccl_rules import check_traces
from executor.pipefusion.pipeline import PipelineSchedule, pipeline_items


def _schedule(stages: int, steps: int, warmup: int, patches: int, skips: bool) -> PipelineSchedule:
    # skips: HunyuanDiT-like long skips from each early stage to its mirror stage.
    targets = [sorted({s + 1} | ({stages - 1 - s} if skips and s < stages - 1 - s - 1 else set())) if s < stages - 1 else []
               for s in range(stages)]
    return PipelineSchedule(pipeline_items(steps, warmup, patches), stages, targets)


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(1, 5), steps=st.integers(1, 5), warmup=st.integers(0, 5), patches=st.integers(1, 4),
       skips=st.booleans())
def test_messages_travel_between_making_and_use(stages, steps, warmup, patches, skips):
    schedule = _schedule(stages, steps, warmup, patches, skips)
    for message in schedule.messages:
        travels = schedule.travels(message)
        assert travels > schedule.tick[message.source][message.item]
        used_by = message.item if message.target != 0 else schedule.returns[message.item]
        assert travels <= schedule.tick[message.target][used_by]
    for s in range(stages):  # each stage computes its items in order, one per tick
        assert all(a < b for a, b in zip(schedule.tick[s], schedule.tick[s][1:]))


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(2, 5), steps=st.integers(1, 4), warmup=st.integers(0, 4), patches=st.integers(1, 4),
       skips=st.booleans())
def test_each_ticks_groups_replay_under_nccl_rules(stages, steps, warmup, patches, skips):
    schedule = _schedule(stages, steps, warmup, patches, skips)
    traces = {s: [{"op": "new_group", "group": "world", "name": "g1", "members": list(range(stages))}] for s in range(stages)}
    for s in range(stages):
        for _, sends, receives, _ in schedule.timeline(s):
            ops = [{"op": "send", "peer": m.target, "group": "g1", "numel": 1 + m.item, "dtype": "float32"} for m in sends]
            ops += [{"op": "recv", "peer": m.source, "group": "g1", "numel": 1 + m.item, "dtype": "float32"} for m in receives]
            if ops:
                traces[s].append({"op": "batch", "ops": ops})
    assert check_traces(traces) == []
