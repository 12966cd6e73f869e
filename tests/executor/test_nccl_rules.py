"""The NCCL rule checker (executor.nccl_rules) on hand-written traces and on a recorded one.

The recorded trace is PipeFusion (pipefusion=2, patches=2, warmup=1, tiny PixArt, 3 steps) as the
executor ran it before its point-to-point calls were grouped: every stage posted its receives
ahead, ungrouped, before any send. Gloo completed it; under NCCL both ranks wait in a receive.
Live runs of every method and hybrid are checked where the multi-rank tests record them
(test_parallel_pipelines.py, pipefusion/test_pipelines.py, sp/test_sp_transformers.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from costmodel.errors import DitplanError
from executor.nccl_rules import check, check_traces, main

TRACES = Path(__file__).parent / "traces"


def _tensor(numel: int = 16, dtype: str = "float32") -> dict:
    return {"numel": numel, "dtype": dtype, "device": "cpu", "contiguous": True}


def send(peer: int, numel: int = 16, group: str = "g1") -> dict:
    return {"op": "send", "peer": peer, "group": group, **_tensor(numel)}


def recv(peer: int, numel: int = 16, group: str = "g1") -> dict:
    return {"op": "recv", "peer": peer, "group": group, **_tensor(numel)}


def batch(*ops: dict) -> dict:
    return {"op": "batch", "ops": list(ops)}


def new_group(name: str, members: list[int]) -> dict:
    return {"op": "new_group", "group": "world", "name": name, "members": members}


def collective(op: str, group: str = "g1", numel: int = 16, dtype: str = "float32") -> dict:
    return {"op": op, "group": group, **_tensor(numel, dtype), "devices": ["cpu"]}


def pair(first: list[dict], second: list[dict], members: tuple[int, ...] = (0, 1)) -> dict[int, list[dict]]:
    return {0: [new_group("g1", list(members)), *first], 1: [new_group("g1", list(members)), *second]}


def test_todays_pipefusion_trace_deadlocks_under_nccl_rules() -> None:
    findings = check(TRACES / "pipefusion2_recv_ahead")
    assert len(findings) == 1 and findings[0].startswith("deadlock"), findings
    assert "rank 0 call 2: ungrouped [recv from 1" in findings[0] and "rank 1 call 2: ungrouped [recv from 0" in findings[0]


def test_ungrouped_receives_posted_before_sends_deadlock() -> None:
    findings = check_traces(pair([recv(1), send(1)], [recv(0), send(0)]))
    assert findings and findings[0].startswith("deadlock")


def test_ungrouped_sends_on_both_sides_deadlock_but_grouped_exchanges_complete() -> None:
    assert check_traces(pair([send(1), recv(1)], [send(0), recv(0)]))[0].startswith("deadlock")
    assert check_traces(pair([batch(send(1), recv(1))], [batch(send(0), recv(0))])) == []


def test_matched_ungrouped_send_and_receive_complete() -> None:
    assert check_traces(pair([send(1), recv(1)], [recv(0), send(0)])) == []


def test_a_group_needs_every_counterpart_in_the_peers_group() -> None:
    # Rank 1 groups one receive where rank 0's group sends two messages: the group cannot complete.
    findings = check_traces(pair([batch(send(1), send(1))], [batch(recv(0)), batch(recv(0))]))
    assert findings[0].startswith("deadlock")


def test_sizes_and_dtypes_of_matched_calls_must_agree() -> None:
    findings = check_traces(pair([send(1, numel=16)], [recv(0, numel=8)]))
    assert findings == [findings[0]] and findings[0].startswith("size mismatch")
    findings = check_traces(pair([collective("all_gather", dtype="bfloat16")], [collective("all_gather", dtype="float32")]))
    assert findings[0].startswith("collective mismatch") and "dtype" in findings[0]


def test_calls_on_different_communicators_do_not_overtake_each_other() -> None:
    # Rank 0 all-gathers on g1 before sending on g2; rank 1 waits for the message before its all-gather.
    traces = {r: [new_group("g1", [0, 1]), new_group("g2", [0, 1])] for r in (0, 1)}
    traces[0] += [collective("all_gather"), send(1, group="g2")]
    traces[1] += [recv(0, group="g2"), collective("all_gather")]
    assert check_traces(traces)[0].startswith("deadlock")


def test_groups_created_in_a_different_order_are_found() -> None:
    traces = {0: [new_group("g1", [0, 1]), new_group("g2", [0])], 1: [new_group("g1", [0]), new_group("g2", [0, 1])]}
    assert check_traces(traces)[0].startswith("collective mismatch")


def test_a_lazily_created_communicator_waits_for_all_its_members() -> None:
    # Three stages: 0 sends to 1 in a group on a three-rank communicator whose third member first
    # waits on a world collective that ranks 0 and 1 only reach afterwards.
    traces = {r: [new_group("g1", [0, 1, 2])] for r in range(3)}
    traces[0] += [batch(send(1)), collective("barrier", group="world")]
    traces[1] += [batch(recv(0)), collective("barrier", group="world")]
    traces[2] += [collective("barrier", group="world"), batch(recv(1))]
    findings = check_traces(traces)
    assert findings[0].startswith("deadlock") and "waiting for its communicator's other members" in findings[0]
    eager = {r: [{"op": "init", "backend": "nccl", "device_id": f"cuda:{r}"}, *ops] for r, ops in traces.items()}
    eager[1].append(batch(send(2)))
    assert check_traces(eager) == []


def test_tensors_off_the_cpu_in_object_collectives_and_non_contiguous_tensors_are_found() -> None:
    gather = {"op": "gather_object", "group": "world", "object_devices": ["cuda"]}
    strided = {**collective("all_reduce"), "contiguous": False}
    findings = check_traces({0: [gather, strided], 1: [{**gather, "object_devices": []}, collective("all_reduce")]})
    assert any("object collective" in f and "cuda" in f for f in findings)
    assert any("non-contiguous" in f for f in findings)


def test_command_line_prints_the_findings_and_fails(capsys, tmp_path) -> None:
    assert main([str(TRACES / "pipefusion2_recv_ahead")]) == 1
    assert "deadlock" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2
    with pytest.raises(DitplanError, match="no rank-<R>.jsonl"):
        check(tmp_path)
