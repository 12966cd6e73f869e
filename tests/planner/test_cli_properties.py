"""Generated junk for every reader (model, cluster, hardware, profile, plan, measurements and batch CSV)
and every command: the answer is status 0 or 2, never a traceback, never a NaN or infinite figure.

Commands run in this process through the CLI's main function (fast); each generated file gets a new
name, since the profile loaders cache by path.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costmodel.errors import DitplanError
from planner.cli import main

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_TEXT = (ROOT / "profiles" / "clusters" / "l40-pcie-8.yaml").read_text()
MODEL_TEXT = (ROOT / "profiles" / "models" / "tiny-pixart-alpha.yaml").read_text()
PUBLIC_LINES = (ROOT / "profiles" / "validation" / "public.csv").read_text().splitlines()
BATCH_TEXT = ("model,height,width,frames,steps,cluster,gpus,config\n"
              "tiny-pixart-alpha,256,256,1,4,l40-pcie-8,2,cfg=2\n"
              "pixart-alpha,1024,1024,1,20,l40-pcie-8,4,ulysses=2,ring=2\n")
WORKDIR = Path(tempfile.mkdtemp(prefix="ditplan-properties-"))
_names = itertools.count()
NOT_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], database=None)

# Values a careless or hostile file may hold where a figure is expected.
JUNK_SCALARS = st.one_of(
    st.sampled_from(["1e308", "-1e308", "1e-320", "0", "-1", "-0.0", ".nan", ".inf", "-.inf", "nan", "abc", "''",
                     "[]", "{}", "null", "true", "[1, 2]", "99999999999999999999999999", "1e400", "0x10", "~"]),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


def new_file(text: str | bytes, suffix: str) -> str:
    path = WORKDIR / f"junk-{next(_names)}{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return str(path)


def run(argv: list[str], capsys, echoes_input: bool = False) -> tuple[int, str, str]:
    """Run one command; a traceback (any exception but the CLI's own handling) fails the test. Output
    that `echoes_input` (a batch table repeats its input cells) is checked by the caller instead."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    if code == 0:
        assert echoes_input or not NOT_FINITE.search(out), (argv, out)
    else:
        assert err.startswith("ditplan ") and "Traceback" not in err, (argv, err)
    return code, out, err


@st.composite
def mutated_yaml(draw, text: str) -> str:
    """A profile with some `key: value` lines' values replaced by junk, lines dropped or doubled."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["value", "drop", "double", "value"]))
        line = lines[index]
        if action == "value" and re.match(r"\s*[\w-]+:\s*\S", line) and not line.strip().startswith("#"):
            key = line.split(":", 1)[0]
            lines[index] = f"{key}: {draw(JUNK_SCALARS)}"
        elif action == "drop":
            del lines[index]
        elif action == "double":
            lines.insert(index, line)
    return "\n".join(lines) + "\n"


any_bytes = st.binary(max_size=200)
NUMBER = re.compile(r"(?<=[:\s,\[])-?\d+(?:\.\d+)?(?:e-?\d+)?(?=[,\s\]}])")
EXTREMES = st.sampled_from(["1e308", "1e-320", "1e300", "1e-300", "1e200", "4e15", "1e-15", "1e15", "0", "-0.0"])


@st.composite
def extreme_numbers(draw, text: str) -> str:
    """A profile with one to three of its figures replaced by extreme but finite values."""
    spans = [match.span() for match in NUMBER.finditer(text)]
    chosen = sorted(draw(st.sets(st.sampled_from(spans), min_size=1, max_size=3)), reverse=True)
    for start, end in chosen:
        text = text[:start] + draw(EXTREMES) + text[end:]
    return text


@SETTINGS
@given(st.one_of(mutated_yaml(CLUSTER_TEXT), extreme_numbers(CLUSTER_TEXT), any_bytes, st.text(max_size=200)))
def test_junk_cluster_files(capsys, content):
    cluster = new_file(content, ".yaml")
    run(["simulate", "--model", "pixart-alpha", "--cluster", cluster, "--config", "cfg=2,pipefusion=2,ulysses=2"], capsys)
    run(["search", "--model", "tiny-pixart-alpha", "--cluster", cluster, "--gpus", "2", "--top", "2"], capsys)


@SETTINGS
@given(st.one_of(mutated_yaml(MODEL_TEXT), extreme_numbers(MODEL_TEXT), any_bytes, st.text(max_size=200)))
def test_junk_model_files(capsys, content):
    model = new_file(content, ".yaml")
    run(["simulate", "--model", model, "--cluster", "l40-pcie-8", "--config", "pipefusion=2"], capsys)


def _profile_text() -> str:
    data = yaml.safe_load(CLUSTER_TEXT)
    data["id"] = "this-machine"
    data["hardware"] = yaml.safe_load((ROOT / "profiles" / "hardware" / "l40.yaml").read_text())
    data["measured"] = {"source": "generated", "communication": [
        {"pattern": "all_to_all", "ranks": 2, "points": [[1000000.0, 0.001], [100000000.0, 0.1]]}]}
    return yaml.safe_dump(data, sort_keys=False)


@SETTINGS
@given(st.one_of(mutated_yaml(_profile_text()), extreme_numbers(_profile_text())))
def test_junk_machine_profiles_with_inline_hardware_and_measured_tables(capsys, content):
    profile = new_file(content, ".yaml")
    run(["simulate", "--model", "tiny-pixart-alpha", "--cluster", profile, "--config", "ulysses=2"], capsys)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


def _plan_dict() -> dict:
    path = WORKDIR / "base-plan.json"
    if not path.exists():
        assert main(["search", "--model", "tiny-pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "2",
                     "--out", str(path)]) == 0
    return json.loads(path.read_text())


@st.composite
def junk_plans(draw) -> str | bytes:
    kind = draw(st.sampled_from(["field", "drop", "extra", "bytes"]))
    if kind == "bytes":
        return draw(any_bytes)
    data = _plan_dict()
    key = draw(st.sampled_from(sorted(data)))
    if kind == "field":
        data[key] = draw(json_values)
    elif kind == "drop":
        del data[key]
    else:
        data[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(data)  # NaN and Infinity included, as Python writes them


@SETTINGS
@given(junk_plans())
def test_junk_plan_files(capsys, content):
    from executor.launch import build_parser, preflight

    plan = new_file(content, ".json")
    args = build_parser().parse_args(["--plan", plan, "--nproc", "2", "--out", str(WORKDIR / f"out-{next(_names)}")])
    try:
        preflight(args)  # refuses, or accepts a plan the workers could run; nothing starts here
    except DitplanError as error:
        assert str(error)


@st.composite
def junk_csv(draw, lines: list[str]) -> str | bytes:
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(any_bytes)
    rows = [line.split(",") for line in lines]
    for _ in range(draw(st.integers(1, 3))):
        row = draw(st.integers(0, len(rows) - 1))
        action = draw(st.sampled_from(["cell", "cell", "extra", "short", "drop"]))
        if action == "cell":
            rows[row][draw(st.integers(0, len(rows[row]) - 1))] = draw(JUNK_SCALARS | st.text(max_size=6))
        elif action == "extra":
            rows[row].append(draw(st.text(max_size=4)))
        elif action == "short" and len(rows[row]) > 1:
            rows[row].pop()
        elif action == "drop" and len(rows) > 1:
            del rows[row]
    prefix = "\ufeff" if draw(st.booleans()) else ""
    return prefix + "\n".join(",".join(row) for row in rows) + "\n"


@SETTINGS
@given(junk_csv(BATCH_TEXT.splitlines()))
def test_junk_batch_files(capsys, content):
    code, out, _ = run(["simulate", "--batch", new_file(content, ".csv")], capsys, echoes_input=True)
    if code == 0:
        table = csv.DictReader(io.StringIO(out))
        assert "latency_s" in (table.fieldnames or []), out
        for row in table:
            for column in ("latency_s", "memory_gib"):
                assert row[column] == "" or math.isfinite(float(row[column])), (column, row)


@settings(SETTINGS, max_examples=25)
@given(junk_csv(PUBLIC_LINES[:4]))
def test_junk_measurement_files(capsys, content):
    run(["validate", "--published", new_file(content, ".csv")], capsys)


flag_numbers = st.one_of(st.integers(-5, 5000), st.sampled_from([10**12, 2**63, -(2**63)]))
config_text = st.one_of(
    st.sampled_from(["cfg=2", "ulysses=2", "ring=2", "pipefusion=2,patches=4", "dp=2", "cfg=3", "ulysses=0",
                     "ulysses=99999999999", "pipefusion=2,warmup=-1", "tp=2", "", ",", "cfg", "=2", "cfg=2,cfg=2"]),
    st.text(max_size=20))


@SETTINGS
@given(height=flag_numbers, width=flag_numbers, steps=flag_numbers, config=config_text,
       gpus=st.one_of(st.none(), flag_numbers), nodes=st.one_of(st.none(), flag_numbers),
       placement=st.one_of(st.none(), st.sampled_from(["ring,ulysses", "dp", "cfg,cfg", "", "tp"]), st.text(max_size=12)),
       cluster=st.sampled_from(["l40-pcie-8", "l40-pcie-8x2-eth"]))
def test_junk_simulate_flags(capsys, height, width, steps, config, gpus, nodes, placement, cluster):
    argv = ["simulate", "--model", "tiny-pixart-alpha", "--cluster", cluster, "--config", config,
            "--height", str(height), "--width", str(width), "--steps", str(steps)]
    for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--placement", placement)):
        argv += [] if value is None else [f"{flag}={value}"]
    run(argv, capsys)


@settings(SETTINGS, max_examples=30)
@given(gpus=st.one_of(st.sampled_from(["1", "2", "1-2", "2,1", "0", "-1", "1-0", "abc", "", "1-99999", "4-2", ","]),
                      st.text(max_size=6)),
       steps=st.integers(-2, 30), top=st.integers(-2, 3))
def test_junk_search_flags(capsys, gpus, steps, top):
    run(["search", "--model", "tiny-pixart-alpha", "--cluster", "l40-pcie-8", f"--gpus={gpus}", "--steps", str(steps),
         "--top", str(top), "--format", "json"], capsys)


@settings(SETTINGS, max_examples=30)
@given(nproc=st.text(max_size=8))
def test_junk_profile_flags_are_refused_before_measuring(capsys, nproc):
    blocked = new_file("a file, so nothing can be created under it", ".txt")
    code, _, _ = run(["profile", f"--nproc={nproc}", "--out", f"{blocked}/this-machine.yaml"], capsys)
    assert code == 2


def test_listing_commands_print_finite_figures(capsys):
    for command in (["models"], ["clusters"], ["models", "--format", "json"], ["clusters", "--format", "json"]):
        assert run(command, capsys)[0] == 0


def test_json_output_never_holds_a_non_finite_number(capsys):
    code, out, _ = run(["search", "--model", "tiny-pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "1-2",
                        "--format", "json"], capsys)

    def walk(value):
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json.loads(out, parse_constant=lambda name: float(name)))
    assert code == 0
