"""`ditplan calibrate`: a cluster file every command takes, the report, and one-paragraph errors (exit 2)."""
from __future__ import annotations

import json

import pytest
import yaml

from costmodel.validation import PUBLIC_CSV
from planner.cli import main


def call(argv, capsys):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(600)
def test_calibrated_cluster_file_is_written_reported_and_taken_by_simulate(tmp_path, capsys):
    out = tmp_path / "my-t4.yaml"
    code, text, err = call(["calibrate", "--measurements", str(PUBLIC_CSV), "--cluster", "t4-pcie-4", "--out", str(out)],
                           capsys)
    assert code == 0, err
    assert "t4.matmul_efficiency" in text and "residual %" in text
    assert "leave-one-scenario-out median absolute error" in text and f"wrote {out}" in text
    document = yaml.safe_load(out.read_text())
    assert document["hardware"]["calibration"]["prior"]["matmul_efficiency"] == 0.5  # the datasheet-based start
    assert "ditplan calibrate" in document["source"]
    code, text, err = call(["simulate", "--model", "pixart-alpha", "--height", "512", "--width", "512", "--steps", "20",
                            "--cluster", str(out), "--config", "pipefusion=4", "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(text)["latency_s"] > 0


@pytest.mark.timeout(600)
def test_json_report_names_every_parameter_with_its_bound(tmp_path, capsys):
    code, text, err = call(["calibrate", "--measurements", str(PUBLIC_CSV), "--cluster", "a100-pcie-4", "--out",
                            str(tmp_path / "a.yaml"), "--no-cross-validate", "--format", "json"], capsys)
    assert code == 0, err
    report = json.loads(text)
    assert report["parameters"] and all(p["low"] <= p["value"] <= p["high"] for p in report["parameters"])
    assert {r["scenario"] for r in report["residuals"]} == {"pf-legacy/pixart-alpha/2048/a100-pcie-4"}


def test_input_mistakes_exit_2_with_one_paragraph(tmp_path, capsys):
    code, _, err = call(["calibrate", "--measurements", str(tmp_path / "none.csv"), "--cluster", "l40-pcie-8",
                         "--out", str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and "none.csv: cannot read it" in err and "Traceback" not in err
    code, _, err = call(["calibrate", "--measurements", str(PUBLIC_CSV), "--builtin", "--cluster", "l40-pcie-8"], capsys)
    assert code == 2 and "not both" in err
    bad = tmp_path / "bad.csv"
    bad.write_text(PUBLIC_CSV.read_text().splitlines()[0] + "\n"
                   "s,pixart-alpha,1024,1024,1,20,l40-pcie-8,1,1,1,1,1,,,1,abc,exact,x\n")
    code, _, err = call(["calibrate", "--measurements", str(bad), "--cluster", "l40-pcie-8", "--out",
                         str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and "row 1.latency_s: 'abc' is not a number" in err
    code, _, err = call(["calibrate", "--measurements", str(PUBLIC_CSV), "--cluster", "rtx4090-pcie-8", "--out",
                         str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and "nothing to calibrate" in err
