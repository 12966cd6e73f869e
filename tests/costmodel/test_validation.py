"""`validation_table`: predictions against the published rows (the error and ranking bars the cost model is held to)."""
from __future__ import annotations

import pytest

import costmodel
from costmodel.validation import group_summary

# Latte on two L20s under one PCIe switch: published Ulysses 2 at 28 s ahead of Ring 2 at 30 s. Both
# move the same bytes over the same pairwise exchange, so the order rests on how much of Ring's hop
# hides behind the attention of the block in hand (the first fold is only an upcast).
LATTE = ("docs-latte/latte/512x512x16/l20-pcie-8", 2)


@pytest.fixture(scope="module")
def table():
    return costmodel.validation_table()


def test_median_absolute_error_within_15_percent(table):
    priced = table[table["predicted_s"].notna()]
    assert len(table) == 103 and len(priced) == 103
    assert priced["error_pct"].abs().median() <= 15.0


def test_hunyuan_video_rows_within_20_percent(table):
    """Out of sample: the built-in constants are fitted without these rows (BUILTIN_HELD_OUT_MODELS)."""
    rows = table[table["model"] == "hunyuan-video"]
    assert len(rows) == 4
    assert (rows["error_pct"].abs() <= 20.0).all(), rows[["gpus", "ulysses", "error_pct"]]


def test_predicted_best_is_published_best_in_every_group(table):
    groups = group_summary(table)
    assert len(groups) == 27 and groups["best_agrees"].all(), groups[~groups["best_agrees"]]


def test_latte_on_two_l20s_puts_ulysses_ahead_of_ring(table):
    rows = table[(table["scenario"] == LATTE[0]) & (table["gpus"].astype(int) == LATTE[1])]
    by_ulysses = rows.set_index(rows["ulysses"].astype(int))["predicted_s"]
    assert by_ulysses[2] < by_ulysses[1], rows[["ulysses", "ring", "predicted_s", "latency_s"]]


def test_inconsistent_rows_count_in_errors_not_in_the_best(table):
    flagged = table[table["quality"] == "inconsistent"]
    assert len(flagged) == 4 and flagged["error_pct"].notna().all()
    groups = group_summary(table).set_index(["scenario", "gpus"])
    # Fig. 5 at 2048 px: without its two inconsistent PipeFusion rows, Ring 8 is the published best.
    assert groups.loc[("pf-fig5/pixart-alpha/2048/l40-pcie-8", 8), "published_best"].startswith("cfg=1,ulysses=1,ring=8")


def test_end_to_end_rows_add_text_encoding_and_vae(table):
    docs = table[table["source"].str.contains("xDiT docs") & ~table["source"].str.contains("per-step")]
    assert len(docs) and (docs["timed"].dropna() == "end to end").all()
    loop = table.loc[~table.index.isin(docs.index), "timed"].dropna()
    assert (loop == "denoising loop").all()


@pytest.mark.timeout(1800)
def test_leave_one_scenario_out_median_within_20_percent():
    """Each scenario predicted by constants calibrated on all the others (from the datasheet priors)."""
    from costmodel.validation import cross_validated_table

    cross = cross_validated_table()
    assert cross["predicted_s"].notna().sum() == 103
    assert cross["error_pct"].abs().median() <= 20.0


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
