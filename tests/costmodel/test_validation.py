"""`validation_table`: predictions against the published rows (the must-show bar)."""
from __future__ import annotations

import pytest

import costmodel
from costmodel.validation import scenario_summary

DISPUTED = "pf-fig5/pixart-alpha/4096/l40-pcie-8"


@pytest.fixture(scope="module")
def table():
    return costmodel.validation_table()


def test_median_absolute_error_within_25_percent(table):
    assert len(table) == 30 and table["predicted_s"].notna().all()
    assert table["error_pct"].abs().median() <= 25.0


def test_predicted_best_is_published_best(table):
    summary = scenario_summary(table).set_index("scenario")
    agreeing = summary.drop(index=DISPUTED)
    assert agreeing["best_agrees"].all(), agreeing[~agreeing["best_agrees"]]


@pytest.mark.xfail(strict=True, reason=(
    "Fig. 5's PipeFusion rows at 4096 px (28.6 s for cfg=2,pipefusion=4 with warmup=1) are below "
    "one GPU's 244.89 s / 8 = 30.6 s, leaving no room for the synchronous full-image warmup step "
    "(~6 s) that Table 3 shows costing a full step; the model keeps the warmup and so ranks ring=8 "
    "(37.1 s) ahead of cfg=2,pipefusion=4 (38.9 s). With warmup=0 it ranks them as published."))
def test_disputed_scenario_best(table):
    summary = scenario_summary(table).set_index("scenario")
    assert summary.loc[DISPUTED, "best_agrees"]


def test_end_to_end_rows_add_text_encoding_and_vae(table):
    docs = table[table["source"].str.contains("xDiT docs")]
    assert (docs["timed"] == "end to end").all()
    assert (table.loc[~table.index.isin(docs.index), "timed"] == "denoising loop").all()


def test_rows_faster_than_perfect_scaling_are_flagged(tmp_path):
    from costmodel.validation import superlinear_notes, validation_table

    header = "scenario,model,height,width,frames,steps,cluster,gpus,cfg,ulysses,ring,pipefusion,patches,warmup,dp,latency_s,quality,source"
    rows = [
        "s,pixart-alpha,1024,1024,1,20,l40-pcie-8,1,1,1,1,1,,,1,8.0,exact,test",
        "s,pixart-alpha,1024,1024,1,20,l40-pcie-8,8,1,1,8,1,,,1,0.9,exact,test",  # 8.0 / 8 = 1.0 > 0.9
        "s,pixart-alpha,1024,1024,1,20,l40-pcie-8,8,1,1,1,8,,1,1,1.1,exact,test",
        "t,pixart-alpha,1024,1024,1,20,l40-pcie-8,8,1,8,1,1,,,1,0.1,exact,test",  # no one-GPU row: no bound
    ]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    table = validation_table(path)
    assert list(table["beats_linear"]) == [False, True, False, False]
    notes = superlinear_notes(table)
    assert len(notes) == 1 and "8 s / 8 = 1.00 s" in notes[0]
