"""Bad files, odd flags and extreme figures: every command answers with status 2 and one message
(never a traceback, a NaN or a late failure), and what it accepts it does not accept silently."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from costmodel.errors import DitplanError
from planner.cli import main

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = (ROOT / "profiles" / "clusters" / "l40-pcie-8.yaml").read_text()
MODEL = (ROOT / "profiles" / "models" / "pixart-alpha.yaml").read_text()
PUBLIC = (ROOT / "profiles" / "validation" / "public.csv").read_text().splitlines()
BATCH_HEADER = "model,height,width,frames,steps,cluster,gpus,config"


def call(argv, capsys):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(argv, capsys, *words):
    code, out, err = call(argv, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---------------------------------------------------------------- NaN and infinity never pass

@pytest.mark.parametrize("key, new, words", [
    ("bandwidth_gbs", "1e-320", "out of range"),
    ("host_op_us", "1e308", "out of range"),
    ("latency_us", "1e308", "out of range"),
    # Counts that would build a topology graph of billions of GPUs: refused, not walked into memory.
    ("gpus_per_switch", "2147483647", "must be <= 64"),
    ("sockets", "100000", "must be <= 16"),
])
def test_extreme_cluster_figures_are_refused_at_loading(tmp_path, capsys, key, new, words):
    text, replaced = re.subn(rf"(\b{key}: )[-+.\w]+", rf"\g<1>{new}", CLUSTER, count=1)
    assert replaced == 1
    cluster = write(tmp_path / "extreme.yaml", text)
    plan = tmp_path / "plan.json"
    refused(["simulate", "--model", "pixart-alpha", "--cluster", cluster, "--config", "ulysses=2"], capsys, key, words)
    refused(["search", "--model", "pixart-alpha", "--cluster", cluster, "--gpus", "2", "--out", plan], capsys, words)
    assert not plan.exists()


def test_an_extreme_model_figure_is_refused_at_loading(tmp_path, capsys):
    model = write(tmp_path / "extreme.yaml", MODEL.replace("mlp_ratio: 4.0", "mlp_ratio: 1e308", 1))
    assert "1e308" in model.read_text()
    refused(["simulate", "--model", model, "--cluster", "l40-pcie-8", "--config", "ulysses=2"], capsys, "mlp_ratio")


def test_a_model_of_billions_of_blocks_is_refused_at_loading(tmp_path, capsys):
    text, replaced = re.subn(r"(\bcount: )\d+", r"\g<1>2147483647", MODEL, count=1)
    assert replaced == 1
    model = write(tmp_path / "deep.yaml", text)
    refused(["simulate", "--model", model, "--cluster", "l40-pcie-8", "--config", "pipefusion=2"], capsys, "count",
            "must be <= 10000")


def test_a_computed_nan_is_refused_at_the_output():
    from costmodel.strict import require_finite

    with pytest.raises(DitplanError, match="latency_s is nan"):
        require_finite({"plans": [{"latency_s": float("nan")}]}, "ditplan search")


def test_a_plan_with_a_nan_figure_is_neither_written_nor_read(tmp_path):
    from costmodel.config import ParallelConfig, Placement
    from planner.plan import Plan

    config = ParallelConfig.parse("cfg=2")
    plan = Plan(model="pixart-alpha", height=1024, width=1024, frames=1, steps=20, cluster="l40-pcie-8", gpus=2,
                config=config, placement=Placement(config), predicted={"latency_s": float("inf")})
    with pytest.raises(DitplanError, match="inf"):
        plan.save(tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()
    good = Plan(**{**plan.__dict__, "predicted": {"latency_s": 1.0}}).save(tmp_path / "good.json")
    write(good, good.read_text().replace('"latency_s": 1.0', '"latency_s": NaN'))
    with pytest.raises(DitplanError, match="NaN"):
        Plan.load(good)


# ---------------------------------------------------------------- messages, not tracebacks

def test_files_in_another_encoding_are_refused_by_name(tmp_path, capsys):
    latin = "id: caf\xe9\n".encode("latin-1")
    refused(["simulate", "--model", write(tmp_path / "m.yaml", latin), "--cluster", "l40-pcie-8", "--config", "cfg=2"],
            capsys, "not UTF-8")
    refused(["simulate", "--batch", write(tmp_path / "rows.csv", b"model\xff\n")], capsys, "not UTF-8")
    refused(["validate", "--published", write(tmp_path / "pub.csv", b"\xfe\xff")], capsys, "not UTF-8")
    refused(["run", "--plan", write(tmp_path / "plan.json", b'{"model": "\xe9"}'), "--out", tmp_path / "o"], capsys,
            "not UTF-8")


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_search_destinations_are_checked_before_the_search(tmp_path, capsys, flag):
    blocker = write(tmp_path / "a-file", "x")
    name = "plan.json" if flag == "--out" else "front.png"
    base = ["search", "--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "2"]
    refused([*base, flag, tmp_path], capsys, "folder")
    refused([*base, flag, blocker / name], capsys, "is a file")


def test_plot_names_its_formats(tmp_path, capsys):
    refused(["search", "--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "2", "--plot", tmp_path / "x.txt"],
            capsys, ".png")


def test_a_batch_row_with_an_extra_field_refuses_the_file_before_any_output(tmp_path, capsys):
    rows = write(tmp_path / "rows.csv", f"{BATCH_HEADER}\npixart-alpha,1024,1024,1,20,l40-pcie-8,2,cfg=2\n"
                                        "pixart-alpha,1024,1024,1,20,l40-pcie-8,2,cfg=2,extra\n")
    code, out, err = call(["simulate", "--batch", rows], capsys)
    assert code == 2 and out == "" and "line 3" in err


@pytest.mark.parametrize("latency, words", [("abc", "not a number"), ("", "not a number"), ("0", "must be > 0"),
                                            ("nan", "not a finite number"), ("-1.5", "must be > 0")])
def test_validate_refuses_a_bad_latency(tmp_path, capsys, latency, words):
    header = PUBLIC[0].split(",")
    row = PUBLIC[1].split(",")
    row[header.index("latency_s")] = latency
    published = write(tmp_path / "pub.csv", PUBLIC[0] + "\n" + ",".join(row) + "\n")
    refused(["validate", "--published", published], capsys, "row 1", "latency_s", words)


def test_validate_refuses_a_header_only_file(tmp_path, capsys):
    refused(["validate", "--published", write(tmp_path / "pub.csv", PUBLIC[0] + "\n")], capsys, "no rows")


@pytest.mark.parametrize("key, value", [("model", 7), ("model", None), ("config", ["cfg=2"]), ("placement", 3),
                                        ("predicted", []), ("explanation", "text")])
def test_plan_fields_of_the_wrong_type_are_refused(tmp_path, capsys, key, value):
    plan = tmp_path / "plan.json"
    assert call(["search", "--model", "tiny-pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "2", "--out", plan],
                capsys)[0] == 0
    data = json.loads(plan.read_text())
    data[key] = value
    write(plan, json.dumps(data))
    refused(["run", "--plan", plan, "--nproc", "2", "--out", tmp_path / "out"], capsys, key)


def test_profile_out_is_checked_before_measuring(tmp_path, capsys):
    blocker = write(tmp_path / "a-file", "x")
    refused(["profile", "--out", blocker / "this-machine.yaml"], capsys, "is a file")
    refused(["profile", "--out", tmp_path], capsys, "folder")


# ---------------------------------------------------------------- early, precise failures

def test_run_out_that_cannot_be_written_is_refused_before_loading(tmp_path, capsys):
    blocker = write(tmp_path / "a-file", "x")
    refused(["run", "--model", "tiny-pixart-alpha", "--plan", "cfg=1", "--out", blocker / "out"], capsys,
            "--out", "is a file")
    refused(["run", "--model", "tiny-pixart-alpha", "--plan", "cfg=1", "--out", blocker], capsys, "not an earlier run")


def test_a_folder_given_as_cluster_or_model_is_called_a_folder(capsys):
    refused(["simulate", "--model", "pixart-alpha", "--cluster", ROOT / "profiles", "--config", "cfg=2"], capsys,
            "is a folder")
    refused(["simulate", "--model", ROOT / "profiles", "--cluster", "l40-pcie-8", "--config", "cfg=2"], capsys,
            "is a folder")


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path, capsys):
    rows = f"{BATCH_HEADER}\npixart-alpha,1024,1024,1,20,l40-pcie-8,2,cfg=2\n"
    plain = call(["simulate", "--batch", write(tmp_path / "plain.csv", rows)], capsys)
    with_bom = call(["simulate", "--batch", write(tmp_path / "bom.csv", "\ufeff" + rows)], capsys)
    assert plain == with_bom and plain[0] == 0


def test_a_gpu_range_beyond_the_cluster_is_named_as_given(capsys):
    err = refused(["search", "--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "1-16"], capsys,
                  "--gpus 1-16", "has 8 GPUs", "--gpus 1-8")
    assert "--gpus 9" not in err


def test_an_oversized_configuration_is_blamed_on_itself_not_on_gpus(capsys):
    err = refused(["simulate", "--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "ulysses=100000"],
                  capsys, "needs 100000 GPUs")
    assert "--gpus" not in err


def test_validate_with_an_unknown_model_is_refused(tmp_path, capsys):
    published = write(tmp_path / "pub.csv", PUBLIC[0] + "\n" + PUBLIC[1].replace(",pixart-alpha,", ",no-such-model,", 1) + "\n")
    refused(["validate", "--published", published], capsys, "no-such-model")


# ---------------------------------------------------------------- first contact

def test_a_misspelled_tiny_model_is_refused_up_front_naming_the_valid_ones(tmp_path, capsys):
    refused(["run", "--model", "tiny-pixart-alfa", "--plan", "cfg=1", "--out", tmp_path / "o"], capsys,
            "tiny-pixart-alfa", "tiny-pixart-alpha")
    refused(["run", "--model", "pixart-alpha", "--plan", "cfg=1", "--out", tmp_path / "o"], capsys,
            "not a pipeline to load")


def test_plot_over_one_gpu_count_says_so(tmp_path, capsys):
    code, out, _ = call(["search", "--model", "tiny-pixart-alpha", "--cluster", "l40-pcie-8", "--gpus", "2",
                         "--plot", tmp_path / "front.png"], capsys)
    assert code == 0 and "one GPU count" in out and (tmp_path / "front.png").is_file()


def test_the_search_table_defines_eff(capsys):
    code, out, _ = call(["search", "--model", "flux-dev", "--cluster", "h100-sxm-nvlink-8", "--gpus", "4", "--top", "3"],
                        capsys)
    assert code == 0 and "eff.: one GPU's GPU-seconds per image" in out


def test_percentages_have_one_decimal(capsys):
    code, out, _ = call(["simulate", "--model", "pixart-alpha", "--cluster", "l40-pcie-8", "--config", "cfg=2,pipefusion=4"],
                        capsys)
    lines = out[out.index("breakdown"):].splitlines()[2:6]
    assert code == 0 and all(len(line.split()[-1].partition(".")[2]) == 1 for line in lines), lines


# ---------------------------------------------------------------- nothing accepted silently

def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    cluster = write(tmp_path / "twice.yaml", CLUSTER + "nodes: 2\n")
    refused(["simulate", "--model", "pixart-alpha", "--cluster", cluster, "--config", "cfg=2"], capsys,
            "'nodes' is given twice")


def test_batch_with_single_run_flags_is_refused(tmp_path, capsys):
    rows = write(tmp_path / "rows.csv", f"{BATCH_HEADER}\npixart-alpha,1024,1024,1,20,l40-pcie-8,2,cfg=2\n")
    refused(["simulate", "--batch", rows, "--model", "flux-dev", "--config", "cfg=1"], capsys, "--model", "--config")


def test_a_read_only_profile_is_not_replaced(tmp_path, capsys):
    from costmodel.files import write_atomically

    target = write(tmp_path / "this-machine.yaml", "old")
    os.chmod(target, 0o444)
    refused(["profile", "--out", target], capsys, "read-only")
    with pytest.raises(DitplanError, match="read-only"):
        write_atomically(target, "new", "--out")
    assert target.read_text() == "old" and stat.S_IMODE(target.stat().st_mode) == 0o444


def test_a_replaced_file_keeps_its_mode(tmp_path):
    from costmodel.files import write_atomically

    target = write(tmp_path / "plan.json", "old")
    os.chmod(target, 0o640)
    write_atomically(target, "new", "--out")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_sizes_print_width_by_height_everywhere(capsys):
    size = ["--model", "pixart-alpha", "--height", "512", "--width", "1024", "--cluster", "l40-pcie-8"]
    simulated = call(["simulate", *size, "--config", "cfg=2"], capsys)[1]
    searched = call(["search", *size, "--gpus", "2"], capsys)[1]
    assert "1024x512" in simulated and "1024x512" in searched
    assert "512x1024" not in simulated + searched
