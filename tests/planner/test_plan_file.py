"""Plan files: round trip, strict loading, atomic writes."""
import json

import pytest

from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from planner.plan import SCHEMA, Plan


def make_plan(**overrides) -> Plan:
    config = ParallelConfig.parse("cfg=2,pipefusion=2,patches=4")
    fields = dict(model="pixart-alpha", height=1024, width=1024, frames=1, steps=20, cluster="l40-pcie-8",
                  gpus=4, config=config, placement=Placement(config), predicted={"latency_s": 1.5})
    fields.update(overrides)
    return Plan(**fields)


def test_round_trip(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["config"] == str(plan.config)
    assert data["ranks"][3] == {"rank": 3, "ulysses": 0, "ring": 0, "pipefusion": 1, "cfg": 1, "dp": 0}
    assert Plan.load(path) == plan


def test_gpu_count_must_match_the_config():
    with pytest.raises(DitplanError, match="uses 4 GPUs but the plan is for gpus=8"):
        make_plan(gpus=8)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.pop("config"), "missing key"),
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d.update(schema="ditplan.plan/0"), "not supported"),
        (lambda d: d.update(steps=0), "steps=0"),
        (lambda d: d["ranks"].reverse(), "does not match the placement"),
    ],
)
def test_bad_files_are_refused_with_the_key(tmp_path, edit, words):
    data = make_plan().to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DitplanError, match=words):
        Plan.load(path)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(DitplanError, match="cannot read"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DitplanError, match="not valid JSON"):
        Plan.load(bad)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("costmodel.files.os.replace", explode)
    with pytest.raises(DitplanError, match="No space left"):
        make_plan().save(tmp_path / "plan.json")
    assert list(tmp_path.iterdir()) == []
