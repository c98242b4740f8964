"""Study report: collect -> analyse -> render. Arithmetic of the tables, Table 1 selection, the
headline, identical rows, learning curves, figures, pending cells, files; most on a study folder
written by hand (seconds, no training), one on real tiny cells."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import expensive, make_fake_study, make_spec, make_study_inputs

from pipeline import metrics, study, study_spec
from pipeline.artefacts import read_json, write_json_atomic
from pipeline.report import analysis as report
from pipeline.report import collect, figures, results, write_report
from pipeline.report import render as report_render


def _records(values: dict[str, dict[str, list]], n_folds: int = 3) -> pd.DataFrame:
    """Crafted per-fold records: config -> {protocol: [(c, auc, sel), ...]}; missing = pending."""
    rows = []
    for name in [c.name for c in study_spec.configurations()]:
        conf = study_spec.Configuration.from_name(name)
        for proto in ("paper", "inner"):
            folds = values.get(name, {}).get(proto, [])
            for k in range(n_folds):
                done = k < len(folds)
                c, a, s = folds[k] if done else (np.nan, np.nan, np.nan)
                rows.append(
                    {
                        "config": name,
                        "group": conf.group,
                        "d": conf.d_label,
                        "fold": k,
                        "protocol": proto,
                        "done": done,
                        "c_index": c,
                        "auc_1y": a,
                        "selection_c_index": s,
                    }
                )
    return pd.DataFrame(rows)


def test_summary_means_sds_best_d_and_deltas_are_computed_from_the_records():
    nan = float("nan")
    vals = {
        "baseline": {
            "paper": [(0.60, 0.70, 0.6), (0.62, 0.66, 0.6), (0.64, nan, 0.6)],
            "inner": [(0.58, 0.60, 0.55), (0.60, 0.62, 0.55), (0.62, 0.64, 0.55)],
        },
        # Under the paper protocol ct-d128 has the best outer mean; under the inner protocol
        # ct-d64 has the best inner-validation mean although its outer mean is lower.
        "ct-d64": {
            "paper": [(0.70, 0.7, 0.9), (0.70, 0.7, 0.9), (0.70, 0.7, 0.9)],
            "inner": [(0.61, 0.65, 0.80), (0.63, 0.67, 0.80), (0.65, 0.69, 0.80)],
        },
        "ct-d128": {
            "paper": [(0.80, 0.8, 0.5), (0.70, 0.9, 0.5), (0.75, 0.85, 0.5)],
            "inner": [(0.70, 0.7, 0.60), (0.70, 0.7, 0.60), (0.70, 0.7, 0.60)],
        },
        # Better than everything but only 2 of 3 folds finished: must not win Table 1.
        "ct-d256": {"paper": [(0.95, 0.9, 0.99), (0.95, 0.9, 0.99)], "inner": [(0.9, 0.9, 0.99)] * 2},
        "pet-dorig": {"paper": [(0.66, 0.7, 0.7)] * 3, "inner": [(0.64, 0.7, 0.7)] * 3},
    }
    summary = report.summarise_records(_records(vals), n_folds=3)
    s = summary.set_index(["protocol", "config"])
    b = s.loc[("paper", "baseline")]
    assert b["c_mean"] == pytest.approx(0.62) and b["c_sd"] == pytest.approx(0.02)  # sample SD
    assert b["auc_mean"] == pytest.approx(0.68) and b["auc_sd"] == pytest.approx(np.std([0.70, 0.66], ddof=1))
    assert b["auc_n"] == 2 and b["c_n"] == 3 and b["n_done"] == 3
    assert s.loc[("paper", "ct-d256"), "n_done"] == 2
    assert math.isnan(s.loc[("paper", "ctpet-d64"), "c_mean"]) and s.loc[("paper", "ctpet-d64"), "n_done"] == 0

    t_paper = report.table1(summary, "paper").set_index("group")
    assert t_paper.loc["ct", "config"] == "ct-d128"
    assert t_paper.loc["ct", "c_mean"] == pytest.approx(0.75)
    assert t_paper.loc["ct", "delta_c"] == pytest.approx(0.75 - 0.62)
    assert t_paper.loc["ct", "delta_auc"] == pytest.approx(0.85 - 0.68)
    assert t_paper.loc["pet", "d"] == "orig" and t_paper.loc["pet", "delta_c"] == pytest.approx(0.04)
    assert t_paper.loc["ctpet", "status"] == "pending"

    t_inner = report.table1(summary, "inner").set_index("group")
    assert t_inner.loc["ct", "config"] == "ct-d64"  # chosen by the inner-validation mean
    assert t_inner.loc["ct", "c_mean"] == pytest.approx(0.63)
    assert t_inner.loc["ct", "delta_c"] == pytest.approx(0.63 - 0.60)

    disp = report_render.table1_display(report.table1(summary, "paper"), "paper").set_index("configuration")
    assert disp.loc["+ CT", "C-index"] == "0.750 ± 0.050"
    assert disp.loc["DeepMTS+DAFT baseline", "1-year AUROC"] == "0.680 ± 0.028 (2/3)"
    assert disp.loc["+ CT", "Δ C-index"] == "+0.130"
    assert disp.loc["+ CT+PET", "C-index"] == "pending"
    table = report_render.ablation_table(summary).set_index(["model", "embeddings", "d"]).loc["DeepMTS+DAFT"]
    assert table.loc[("CT", "256"), "folds done"] == "2/3"
    assert table.loc[("CT", "256"), "C-index (paper)"] == "0.950 ± 0.000 (2/3)"
    assert table.loc[("CT+PET", "64"), "C-index (unbiased)"] == "pending"


def test_format_of_mean_sd_and_of_clipped_intervals():
    assert report_render.fmt_mean_sd(0.7123, 0.1) == "0.712 ± 0.100"
    assert report_render.fmt_mean_sd(0.7, None, 1, 5) == "0.700 ± n/a (1/5)"
    assert report_render.fmt_mean_sd(None, None, 0, 5) == "pending"
    assert report_render.fmt_ci(0.9, 0.6, 1.0, 2, 3, np.bool_(True)) == "0.900 [0.600, 1.000] † (2/3)"
    assert report_render.fmt_ci(0.9, 0.8, 0.95, 3, 3, False) == "0.900 [0.800, 0.950]"


def test_fold_intervals_of_bounded_metrics_stay_in_0_1_and_say_so():
    # Two AUROC folds give a t-interval of mean +- 12.7 SE: far outside [0, 1] unclipped.
    vals = {"baseline": {"paper": [(0.60, 0.55, 0.6), (0.62, 0.99, 0.6)], "inner": [(0.6, 0.7, 0.6)] * 2}}
    s = report.summarise_records(_records(vals, n_folds=2), n_folds=2).set_index(["protocol", "config"])
    b = s.loc[("paper", "baseline")]
    assert b["auc_low"] == 0.0 and b["auc_high"] == 1.0 and bool(b["auc_clipped"])
    assert 0 < b["c_low"] < b["c_high"] < 1 and not bool(b["c_clipped"])
    assert not bool(s.loc[("inner", "baseline"), "auc_clipped"])  # zero SD: a point interval


@pytest.fixture(scope="module")
@expensive
def finished_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_study_inputs(root / "inputs")
    spec = make_spec(inputs, root / "study", configs=("baseline", "ct-d64", "ctpet-dorig"), n_folds=2)
    study.prepare_study(
        spec, info={"synthetic": True, "data_source": "tiny test cohort", "oracle_c_index": 0.8123, "settings": "test"}
    )
    for cell in (
        study_spec.Cell(study_spec.Configuration(), 0),
        study_spec.Cell(study_spec.Configuration(), 1),
        study_spec.Cell(study_spec.Configuration("ct", 64), 0),
    ):
        study.run_cell(spec, cell)
    return spec


@pytest.mark.slow
def test_report_from_real_cells_shows_pending_and_writes_every_file(finished_study, tmp_path):
    spec = finished_study
    md_path = write_report(spec.study_dir, tmp_path / "rep")
    out = md_path.parent
    md = md_path.read_text()
    for name in ("report.html", "results.csv", "results.json", "figure2_c_index.png", "figure3_auc_1y.png"):
        assert (out / name).is_file(), name
    # Figures are real PNGs, linked relatively from the Markdown and embedded in the HTML.
    png = (out / "figure2_c_index.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "](figure2_c_index.png)" in md and "](figure3_auc_1y.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6  # Figures 2-7
    embedded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html).group(1)
    assert base64.b64decode(embedded) == png

    assert "RANDOMLY INITIALISED" in md and "SYNTHETIC" in md
    assert "0.812" in md and "tiny test cohort" in md
    assert "3 of 6 cells finished" in md
    assert "paper protocol (optimistic)" in md and "unbiased inner selection" in md
    # Per-fold values in results.csv are the cells' own done.json values.
    res = pd.read_csv(out / "results.csv")
    assert set(res["kind"]) == {"cnn", "peer"}  # peers listed (pending: none has run here)
    assert not res.loc[res["kind"] == "peer", "done"].any()
    res = res[res["kind"] == "cnn"]
    assert len(res) == 6 * 2 and res["done"].sum() == 3 * 2
    done = read_json(study_spec.cell_dir(spec, study_spec.Cell(study_spec.Configuration(), 1)) / "done.json")
    row = res[(res.config == "baseline") & (res.fold == 1) & (res.protocol == "paper")].iloc[0]
    assert row["c_index"] == pytest.approx(done["protocols"]["paper"]["c_index"])
    # The ablation table marks the partial and the pending configuration.
    summary = report.summarise_records(collect.collect_records(spec), spec.n_folds)
    s = summary.set_index(["protocol", "config"])
    assert s.loc[("paper", "ct-d64"), "n_done"] == 1 and s.loc[("paper", "ctpet-dorig"), "n_done"] == 0
    assert "| DeepMTS+DAFT | CT | 64 | 1/2 |" in md and "| DeepMTS+DAFT | CT+PET | orig | 0/2 | pending |" in md
    # Baseline mean in the report equals the mean of its two folds.
    c = [
        read_json(study_spec.cell_dir(spec, study_spec.Cell(study_spec.Configuration(), k)) / "done.json")["protocols"][
            "paper"
        ]["c_index"]
        for k in (0, 1)
    ]
    assert s.loc[("paper", "baseline"), "c_mean"] == pytest.approx(np.mean(c))
    js = read_json(out / "results.json")
    assert js["cells"] == {"total": 6, "done": 3}
    assert js["study"]["embeddings"]["random_init"] is True
    # PET was not requested: no Table 1 row says "pending" for it, the text names it as not part of the study.
    assert {r["group"] for r in js["table1"]["paper"]} == {
        "baseline",
        "ct",
        "ctpet",
        "clinical",
        "radiomics",
        "head-ct",
        "head-ctpet",
    }
    assert "| DeepMTS+DAFT + PET |" not in md and "| + PET |" not in md
    assert md.count("Not part of this study: DeepMTS+DAFT + PET (not requested") == 3  # headline, Table 1 x2
    # Integers, not "2.0 of 2.0 folds"; a baseline of 2 epochs x 2 steps is called barely trained.
    assert not re.search(r"\d\.0 of \d\.0 folds", md)
    assert "the baseline barely trained (mean train C-index" in md and "after 4 optimiser steps" in md
    assert {r["status"] for r in js["table1"]["paper"] if r["group"].startswith(("head", "clin", "rad"))} == {"pending"}


@pytest.mark.slow
def test_report_cli_report_only(finished_study, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.study import run_study

    res = CliRunner().invoke(
        run_study, ["--out", finished_study.study_dir, "--report-only", "--report-dir", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(f"report: {tmp_path / 'r' / 'report.md'}")


# --- a finished study made by hand (helpers.make_fake_study) ------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A hand-made finished study (one cell pending, one in the old format) and its report."""
    root = tmp_path_factory.mktemp("fake")
    spec = make_fake_study(root, pending=("ctpet-dorig/fold_2",), old_format=("pet-d256/fold_0",))
    md = write_report(spec.study_dir, root / "report")
    return {"spec": spec, "md": md, "text": md.read_text(), "js": read_json(md.parent / "results.json")}


def _md_table(text: str, after: str) -> pd.DataFrame:
    """The first Markdown table after the line starting with ``after``, as strings."""
    lines = text.split("\n" + after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_report_opens_with_the_headline_and_its_values_equal_the_full_tables(fake):
    text, js = fake["text"], fake["js"]
    # The first table of the report is the headline, unbiased protocol first.
    first_table = text[text.index("\n|") :].strip().splitlines()[0]
    assert first_table.startswith("| model | d (unbiased) | C-index (unbiased) | Δ vs baseline [95 % CI] (unbiased) |")
    assert first_table.index("(unbiased)") < first_table.index("(paper)")
    head = _md_table(text, "## Headline").set_index("model")
    assert head.loc["oracle: true risk of the synthetic cohort", "C-index (unbiased)"] == "0.778"
    assert head.loc["DeepMTS+DAFT + CT+PET", "C-index (unbiased)"] == "pending"  # a fold is pending
    for proto, short, t1_head in (
        ("inner", "unbiased", "## Table 1 - unbiased"),
        ("paper", "paper", "## Table 1 - paper"),
    ):
        t1 = _md_table(text, t1_head).set_index("configuration")
        paired = _md_table(text, f"### {report.PROTOCOL_LABELS[proto]}").set_index("model")
        ablation = _md_table(text, "## Full projection ablation")
        for row in js["headline"]["rows"][proto]:
            if row["status"] != "done":
                continue
            label = row["label"].replace("DeepMTS+DAFT + ", "+ ")
            c = head.loc[row["label"], f"C-index ({short})"]
            assert c == t1.loc[label, "C-index"]
            full = ablation[
                ablation["d"].str.split(" = ").apply(lambda ds, d=row["d"]: d in ds)
                & ablation["model"].eq(report_render.model_label(row["group"]))
                & ablation["embeddings"].eq(report_render.embedding_label(row["group"]))
            ]
            assert full[f"C-index ({short})"].tolist() == [c]
            if row["group"] != "baseline":
                label = next(m.label for m in collect.study_models(fake["spec"]) if m.name == row["config"])
                stem, _, d = label.partition(", d = ")
                match = [
                    k
                    for k in paired.index
                    if k.partition(", d = ")[0] == stem and (not d or d in k.partition(", d = ")[2].split(" = "))
                ]
                assert (
                    head.loc[row["label"], f"Δ vs baseline [95 % CI] ({short})"]
                    == paired.loc[match, "Δ C-index [95 % CI]"].tolist()[0]
                    and len(match) == 1
                )
    # The generated sentences follow the table and state what the numbers cannot show.
    sentences = " ".join(js["headline"]["sentences"])
    assert text.index(sentences) < text.index("## Data and settings")
    assert "randomly initialised" in sentences and "synthetic" in sentences and "0.778" in sentences


def test_each_protocols_rows_show_that_protocols_own_values(fake):
    """Unbiased (inner) and paper rows each carry their own protocol's fold values, recomputed here
    from every fold's oof.csv (C-index, lifelines) and done.json (1-year AUROC); in this study the
    two protocols' baselines differ (about 0.56 vs 0.68), so rows filled from the other protocol fail."""
    from lifelines.utils import concordance_index

    spec, js, text = fake["spec"], fake["js"], fake["text"]
    shown = {}
    for proto in ("inner", "paper"):
        c, auc = [], []
        for k in range(spec.n_folds):
            folder = study_spec.cell_dir(spec, study_spec.Cell(study_spec.Configuration(), k))
            oof = pd.read_csv(folder / "oof.csv")
            part = oof[oof["protocol"] == proto]
            c.append(concordance_index(part["time"], -part["risk"], part["event"]))
            auc.append(read_json(folder / "done.json")["protocols"][proto]["auc_1y"])
        row = {r["group"]: r for r in js["table1"][proto]}["baseline"]
        assert row["c_mean"] == pytest.approx(np.mean(c)) and row["c_sd"] == pytest.approx(np.std(c, ddof=1))
        assert row["auc_mean"] == pytest.approx(np.mean(auc)) and row["auc_sd"] == pytest.approx(np.std(auc, ddof=1))
        t1 = _md_table(text, f"## Table 1 - {'unbiased' if proto == 'inner' else 'paper'}").set_index("configuration")
        assert t1.loc["DeepMTS+DAFT baseline", "C-index"] == f"{np.mean(c):.3f} ± {np.std(c, ddof=1):.3f}"
        assert t1.loc["DeepMTS+DAFT baseline", "1-year AUROC"] == f"{np.mean(auc):.3f} ± {np.std(auc, ddof=1):.3f}"
        records = pd.DataFrame(js["records"])
        mine = records[
            (records["config"] == "baseline") & (records["protocol"] == proto) & (records["kind"] == "cnn")
        ].sort_values("fold")
        np.testing.assert_allclose(mine["c_index"], c)
        np.testing.assert_allclose(mine["auc_1y"], auc)
        shown[proto] = np.mean(c)
    assert shown["paper"] - shown["inner"] > 0.05  # the fixture keeps the protocols apart


def test_sentences_follow_the_numbers():
    def row(group, delta, lo, hi):
        return {
            "group": group,
            "label": report.group_label(group),
            "status": "done",
            "d": "64",
            "c_mean": 0.6,
            "paired_status": "done",
            "delta": delta,
            "ci_low": lo,
            "ci_high": hi,
        }

    base = {
        "group": "baseline",
        "label": "DeepMTS+DAFT baseline",
        "status": "done",
        "c_mean": 0.61,
        "paired_status": "reference",
    }
    head = {
        "protocols": ["inner"],
        "oracle_c_index": None,
        "rows": {"inner": [base, row("ct", 0.05, 0.01, 0.09), row("pet", -0.01, -0.05, 0.03)]},
    }
    real = report.headline_sentences(
        head, {"random_init": False, "synthetic": False, "n_cases": 500, "n_events": 400, "n_folds": 5}
    )
    assert len(real) == 2 and "0.610" in real[0] and "CT (d = 64) +0.050 [+0.010, +0.090]" in real[0]
    assert "excludes 0 only for DeepMTS+DAFT + CT (d = 64) (above the baseline)" in real[1]
    assert "randomly" not in real[1] and "too few" not in real[1]
    demo = report.headline_sentences(
        head | {"rows": {"inner": [base, row("pet", -0.01, -0.05, 0.03)]}},
        {"random_init": True, "synthetic": True, "n_cases": 100, "n_events": 40, "n_folds": 5, "baseline_sd": 0.08},
    )
    assert "randomly initialised" in demo[-1] and "20 cases and 8 events" in demo[-1] and "0.080" in demo[-1]
    assert "every difference from the baseline lies inside its 95 % CI" in demo[-1]
    pending = report.headline_sentences(head | {"rows": {"inner": [base | {"status": "pending"}]}}, {})
    assert pending == [
        "The DeepMTS+DAFT baseline has not finished all folds yet, so no difference from it can be stated."
    ]


def test_identical_heads_are_shown_once_with_the_reason(fake):
    text, js = fake["text"], fake["js"]
    groups = {g["group"]: g for g in js["identical"]}
    # 60 cases in 3 folds: 40 training cases, so d = 64 and d = 128 both keep 39 PCA components.
    assert set(groups) == {"head-ct"} and groups["head-ct"]["configs"] == ["head-ct-d64", "head-ct-d128"]
    assert "39 components" in groups["head-ct"]["reason"] and "training-fold size" in groups["head-ct"]["reason"]
    ablation = _md_table(text, "## Full projection ablation")
    heads = ablation[ablation["model"] == "peer: CT embedding head"]
    assert heads["d"].tolist() == ["64 = 128"]
    assert text.count("peer: CT embedding head, d = 64 = 128") >= 3  # paired (x3 tables) and LOCO
    assert "peer: CT embedding head, d = 128 " not in text
    # The CNN rows at the same d differ, so they stay apart.
    cnn = ablation[(ablation["model"] == "DeepMTS+DAFT") & (ablation["embeddings"] == "CT")]
    assert cnn["d"].tolist() == ["64", "128"]
    # The grouping is a property of the numbers: a changed fold separates the rows.
    rec = pd.DataFrame(js["records"])
    rec.loc[(rec["config"] == "head-ct-d128") & (rec["fold"] == 0), "c_index"] += 0.01
    assert report.identical_groups(rec) == []


def test_learning_curves_average_folds_per_epoch_and_start_before_training():
    curves = pd.DataFrame(
        {
            "split": "cv0",
            "config": ["a"] * 5 + ["b"] * 2,
            "fold": [0, 0, 0, 1, 1, 0, 0],
            "epoch": [0, 1, 2, 0, 1, 0, 1],
            "dice": [0.9, 0.8, 0.7, 0.7, 0.6, 0.5, 0.4],
            "train_c_index": [0.6, 0.7, 0.8, 0.5, 0.6, 0.5, 0.5],
        }
    )
    cells = pd.DataFrame(
        {
            "split": "cv0",
            "config": ["a", "a", "b"],
            "fold": [0, 1, 0],
            "done": True,
            "start_train_c_index": [0.50, 0.40, np.nan],
        }
    )
    got = report.learning_curves(curves, cells)
    assert got["columns"] == ["dice", "train_c_index"]  # the columns present, in a fixed order
    a, b = got["configs"]
    assert a["x"] == [0, 1, 2, 3] and a["n_folds"] == [2, 2, 2, 1]
    assert a["train_c_index"] == pytest.approx([0.45, 0.55, 0.65, 0.8])
    assert math.isnan(a["dice"][0]) and a["dice"][1:] == pytest.approx([0.8, 0.7, 0.7])  # no loss before step 1
    assert math.isnan(b["train_c_index"][0])  # a start value not recorded (older run)


def test_cells_report_dice_at_start_and_end_and_old_runs_read(fake):
    js, text = fake["js"], fake["text"]
    cells = {(c["config"], c["fold"]): c for c in js["training"]["cells"]}
    assert len(cells) == 14  # every finished cell, the pending one left out
    assert cells[("baseline", 1)]["dice_start"] == pytest.approx(0.05) and cells[("baseline", 1)][
        "dice_end"
    ] == pytest.approx(0.5)
    old = cells[("pet-d256", 0)]  # written without the new curve columns and start record
    assert old["dice_start"] is None and old["dice_end"] is None and old["train_c_end"] is None
    dice = _md_table(text, "## Training").set_index("configuration")
    assert (
        dice.loc["pet-d256", "fold 0"] == "n/a → n/a (4 ep)" and dice.loc["baseline", "fold 2"] == "0.05 → 0.50 (4 ep)"
    )
    assert dice.loc["ctpet-dorig", "fold 2"] == "pending"
    curves = {c["config"]: c for c in js["training"]["curves"]["configs"]}
    # pet-d256: fold 0 has no train C-index, so epoch means use folds 1-2 only.
    assert curves["pet-d256"]["train_c_index"][1:] == pytest.approx([0.6, 0.65, 0.7, 0.75])
    assert curves["pet-d256"]["n_folds"] == [3, 3, 3, 3, 3]
    assert "picked the last epoch in 14 of 14 cells" in text


def _red_pixels(png: Path, rows: slice) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[rows, :, :3]
    return int(((img[..., 0] > 0.55) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)).sum())


def test_every_figure_carries_the_stamp_and_a_real_study_none(fake, tmp_path):
    out = fake["md"].parent
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(
        [
            *figures.FIGURES.values(),
            figures.FIGURE_CALIBRATION,
            figures.FIGURE_KM,
            figures.FIGURE_PAIRED,
            figures.FIGURE_CURVES,
        ]
    )
    assert fake["js"]["stamp"].startswith("RANDOM-INIT ENCODERS + SYNTHETIC COHORT")
    clean = dict(fake["js"], stamp=None)
    report_render.render_report(clean, tmp_path)
    for name in names:
        # The red footer line is drawn into the bottom strip of every stamped figure only.
        assert _red_pixels(out / name, slice(-25, None)) > 200, name
        assert _red_pixels(tmp_path / name, slice(-25, None)) == 0, name


def test_report_renders_from_results_json_alone(fake, tmp_path):
    js = json.loads((fake["md"].parent / "results.json").read_text())
    assert js["schema"] == results.RESULTS_SCHEMA
    md = report_render.render_report(js, tmp_path)
    assert md.read_text() == fake["text"]
    for key in ("headline", "summary", "table1", "paired_vs_baseline", "loco", "survival", "training", "identical"):
        assert js[key], key
    res = pd.read_csv(fake["md"].parent / "results.csv")
    assert len(res) == len(js["records"]) and set(res["kind"]) == {"cnn", "peer"}


def test_console_headline_lists_the_unbiased_rows(fake):
    text = report_render.headline_text(fake["js"])
    lines = text.splitlines()
    assert lines[0].startswith("headline (unbiased inner selection")
    base = next(r for r in fake["js"]["headline"]["rows"]["inner"] if r["group"] == "baseline")
    assert lines[1].split() == ["model", "C-index", "1-year", "AUROC", "Δ", "C-index"]
    assert report_render.fmt_mean_sd(base["c_mean"], base["c_sd"], base["c_n"], base["n_folds"]) in lines[2]
    assert report_render.fmt_mean_sd(base["auc_mean"], base["auc_sd"], base["auc_n"], base["n_folds"]) in lines[2]
    assert "oracle: true risk" in text and fake["js"]["headline"]["sentences"][0] in text


def test_undefined_fold_metrics_are_counted_by_reason_and_worded():
    rows = [  # two CNN protocols, one peer repeated under both, one pending and one LOCO row
        {
            "kind": "cnn",
            "split": "cv0",
            "config": "baseline",
            "fold": 0,
            "protocol": "paper",
            "done": True,
            "c_index": 0.7,
            "c_index_reason": None,
            "auc_1y": np.nan,
            "auc_1y_reason": "no_event_before_horizon",
        },
        {
            "kind": "cnn",
            "split": "cv0",
            "config": "baseline",
            "fold": 0,
            "protocol": "inner",
            "done": True,
            "c_index": np.nan,
            "c_index_reason": "no valid epoch",
            "auc_1y": np.nan,
            "auc_1y_reason": "no valid epoch",
        },
        {
            "kind": "cnn",
            "split": "cv0",
            "config": "baseline",
            "fold": 1,
            "protocol": "paper",
            "done": False,
            "c_index": np.nan,
            "c_index_reason": None,
            "auc_1y": np.nan,
            "auc_1y_reason": None,
        },
        {
            "kind": "cnn",
            "split": "loco",
            "config": "baseline",
            "fold": 0,
            "protocol": "paper",
            "done": True,
            "c_index": np.nan,
            "c_index_reason": "no_events",
            "auc_1y": np.nan,
            "auc_1y_reason": "no_events",
        },
    ] + [
        {
            "kind": "peer",
            "split": "cv0",
            "config": "clinical-cox",
            "fold": 0,
            "protocol": p,
            "done": True,
            "c_index": 0.6,
            "c_index_reason": None,
            "auc_1y": np.nan,
            "auc_1y_reason": "horizon_beyond_followup",
        }
        for p in ("paper", "inner")
    ]
    got = {u["metric"]: u for u in report.undefined_metrics(pd.DataFrame(rows))}
    assert got["c_index"] == {"metric": "c_index", "n_results": 3, "n_undefined": 1, "reasons": {"no valid epoch": 1}}
    assert got["auc_1y"]["n_undefined"] == 3 and got["auc_1y"]["reasons"] == {
        "no_event_before_horizon": 1,
        "no valid epoch": 1,
        "horizon_beyond_followup": 1,
    }
    text = report_render.undefined_sentence(list(got.values()))
    assert "C-index in 1 of 3 (no valid epoch: 1)" in text
    assert "1-year AUROC in 3 of 3 (" in text and "no event before 365 d: 1" in text
    assert "no follow-up beyond 365 d: 1" in text and "_" not in text
    assert (
        report_render.undefined_sentence([{"metric": "c_index", "n_results": 3, "n_undefined": 0, "reasons": {}}]) == ""
    )


def test_c_index_reason_of_runs_written_before_the_reason_was_kept():
    held = pd.DataFrame({"time": [100.0, 200.0, 300.0], "event": [0, 0, 0]})
    assert collect.c_undefined_reason(held) == "no_events"
    assert collect.c_undefined_reason(held.assign(event=[1, 1, 1], time=[5.0, 5.0, 5.0])) == "no_comparable_pair"
    assert collect.c_undefined_reason(held.assign(event=[1, 0, 1])) == "no valid epoch"
    assert collect.c_undefined_reason(held.iloc[:0]) == "unknown"


def test_fold_ibs_reports_undefined_folds_by_reason_code():
    train = pd.DataFrame({"time": [100.0, 200, 300, 400], "event": [1, 0, 1, 1], "risk": [0.1, 0.2, 0.3, 0.4]})
    held_out = pd.DataFrame({"time": [150.0, 250, 350], "event": [1, 0, 1], "risk": [0.1, 0.2, 0.3]})
    ok = report._fold_ibs("cv0", 0, held_out, train)
    assert 0 < ok["ibs"] < 1 and 0 < ok["ibs_null"] < 1 and "reason" not in ok
    late = held_out.assign(time=[500.0, 600, 700])  # follow-ups do not overlap
    assert report._fold_ibs("cv0", 0, late, train)["reason"] == metrics.TOO_FEW_VALID_TIMES
    no_event = report._fold_ibs("cv0", 0, held_out, train.assign(event=0))
    assert no_event["ibs"] is None and no_event["reason"] == metrics.NO_TRAINING_EVENT
    assert metrics.reason_text(no_event["reason"]) == "no event in the training fold"
    with pytest.raises(ValueError, match="NaN or infinite"):  # malformed input still raises, not a reason
        report._fold_ibs("cv0", 0, held_out, train.assign(time=[100.0, 200, 300, float("nan")]))


# --- small-study wording, figures, environments -----------------------------------------------------


def test_a_difference_from_a_baseline_that_barely_trained_says_so():
    cells = [
        {"config": "baseline", "train_c_end": 0.50, "epochs_run": 2.0},
        {"config": "baseline", "train_c_end": 0.506, "epochs_run": 3.0},
        {"config": "ct-d64", "train_c_end": 0.9, "epochs_run": 1.0},
    ]
    barely = report.baseline_training(cells, {"steps_per_epoch": 4})
    assert barely == {"baseline_train_c": pytest.approx(0.503), "baseline_steps": 8, "baseline_barely_trained": True}
    trained = report.baseline_training(
        [{"config": "baseline", "train_c_end": 0.7, "epochs_run": 10.0}], {"steps_per_epoch": 15}
    )
    assert trained["baseline_barely_trained"] is False and trained["baseline_steps"] == 150
    # Few steps alone, or a flat train C-index alone, is enough.
    assert (
        report.baseline_training(
            [{"config": "baseline", "train_c_end": 0.8, "epochs_run": 2.0}], {"steps_per_epoch": 4}
        )["baseline_barely_trained"]
        is True
    )
    assert (
        report.baseline_training(
            [{"config": "baseline", "train_c_end": 0.52, "epochs_run": 50.0}], {"steps_per_epoch": 15}
        )["baseline_barely_trained"]
        is True
    )
    assert report.baseline_training([c for c in cells if c["config"] != "baseline"], {}) == {}

    base = {
        "group": "baseline",
        "label": "DeepMTS+DAFT baseline",
        "status": "done",
        "c_mean": 0.503,
        "paired_status": "reference",
    }
    ct = {
        "group": "ct",
        "label": report.group_label("ct"),
        "status": "done",
        "d": "64",
        "c_mean": 0.6,
        "paired_status": "done",
        "delta": 0.1,
        "ci_low": 0.02,
        "ci_high": 0.18,
    }
    head = {"protocols": ["inner"], "oracle_c_index": None, "rows": {"inner": [base, ct]}}
    facts = {"n_cases": 500, "n_events": 400, "n_folds": 5}
    flagged = " ".join(report.headline_sentences(head, facts | barely))
    assert (
        "excludes 0 only for DeepMTS+DAFT + CT (d = 64) (above the baseline), but against a baseline that "
        "barely trained" in flagged
    )
    assert "the baseline barely trained (mean train C-index 0.503 after 8 optimiser steps)" in flagged
    plain = " ".join(report.headline_sentences(head, facts | trained))
    assert "excludes 0 only for DeepMTS+DAFT + CT (d = 64) (above the baseline)." in plain and "barely" not in plain


def test_identical_rows_name_a_cause_or_say_plainly_that_none_is_recorded():
    constant = report._identical_reason(["ct-d64", "ct-d128"], ["64", "128"], None, pd.Series([0.5, 0.5, 0.5]))
    assert "C-index 0.500" in constant and "predicted risk was constant" in constant
    other = report._identical_reason(["ct-d64", "ct-d128"], ["64", "128"], None, pd.Series([0.61, 0.58]))
    assert "d = 64, 128 gave the same C-index and 1-year AUROC on every fold" in other
    assert "no recorded cause" not in other and "constant" not in other


def test_calibration_axes_fit_the_data():
    def cal(*high):
        return {
            "groups": [
                {"followed_to_horizon": True, "pred_mean": 0.1, "observed": 0.15, "observed_high": h} for h in high
            ],
            "overall": {"pred_mean": 0.12, "observed": 0.14},
        }

    assert figures.calibration_limit([cal(0.2, 0.26)]) == pytest.approx(0.3)  # 0.26 * 1.1 -> 0.3
    assert figures.calibration_limit([cal(0.2), cal(0.55)]) == pytest.approx(0.7)  # shared by every panel
    assert figures.calibration_limit([cal(0.95)]) == 1.0
    assert figures.calibration_limit([]) == 1.0


def test_figures_are_numbered_in_reading_order_and_the_stamp_leaves_the_panels_free(fake):
    text, out = fake["text"], fake["md"].parent
    links = re.findall(r"!\[(Figure (\d+)[^\]]*)\]\((figure(\d+)_[^)]+\.png)\)", text)
    assert [int(n) for _, n, _, _ in links] == [2, 3, 4, 5, 6, 7]
    assert all(caption_n == file_n for _, caption_n, _, file_n in links)
    for name in ("figure2_c_index.png", figures.FIGURE_CALIBRATION, figures.FIGURE_CURVES):
        # Red, even faint (a translucent watermark), only in the footer band: none over the data.
        assert _reddish_pixels(out / name, slice(None, -30)) == 0, name
    # cv0 is explained where it first appears.
    assert text.index("cv0") == text.index("cv0..cv1 (one per CV repeat; cv0 the first)")


def _reddish_pixels(png: Path, rows: slice) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[rows, :, :3]
    return int(((img[..., 0] - img[..., 1] > 0.08) & (img[..., 0] - img[..., 2] > 0.08)).sum())


@pytest.mark.slow
def test_runs_environments_are_gathered_and_named(finished_study, tmp_path):
    import torch

    spec = finished_study
    # Every finished cell records its environment in done.json: one environment here.
    md_path = write_report(spec.study_dir, tmp_path / "one")
    table = _md_table(md_path.read_text(), "## What can still change these numbers").set_index("field")
    assert table.loc["torch"].tolist() == [torch.__version__]
    assert table.loc["threads"].tolist() == ["1"] and table.loc["deterministic"].tolist() == ["True"]
    assert list(table.columns) == ["2 runs"]  # cv0/baseline (2 folds) and cv0/ct-d64
    # A fold finished elsewhere (another thread count) is named as a second environment.
    done = study_spec.cell_layout(spec, study_spec.Cell(study_spec.Configuration("ct", 64), 0)).done(0)
    before = done.read_text()
    try:
        record = read_json(done)
        write_json_atomic(done, record | {"environment": record["environment"] | {"threads": 8}})
        envs = collect.collect_environments(spec)
        assert [(e["environment"]["threads"], e["runs"]) for e in envs] == [(1, ["cv0/baseline"]), (8, ["cv0/ct-d64"])]
        md_path = write_report(spec.study_dir, tmp_path / "two")
        js = read_json(md_path.parent / "results.json")
        assert [e["environment"]["threads"] for e in js["environment"]] == [1, 8]
        table = _md_table(md_path.read_text(), "## What can still change these numbers").set_index("field")
        assert table.loc["threads"].tolist() == ["1", "8"]
        assert list(table.columns) == ["environment 1 (1 run)", "environment 2 (1 run)"]
    finally:
        done.write_text(before)


def test_results_round_trip_through_json_and_refuse_a_foreign_file(fake):
    js = fake["js"]
    typed = results.Results.from_json(js)
    assert typed.cells.done < typed.cells.total and typed.survival.protocol == "inner"
    assert typed.to_json() == js  # results.json is exactly the typed object's JSON
    old = {k: v for k, v in js.items() if k != "environment"}  # written before environments were recorded
    assert results.Results.from_json(old).environment == []
    with pytest.raises(ValueError, match="not a report results object: missing \\['analyses'"):
        results.Results.from_json({"schema": 2})


def _undeclared_keys(value, tp, path: str = "") -> list[str]:
    """Keys of ``value`` that its TypedDict ``tp`` (reached through lists, maps and unions)
    does not declare, and declared required keys it lacks."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return min((_undeclared_keys(value, arm, path) for arm in args if arm is not type(None)), key=len)
    if typing.is_typeddict(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        out = [f"{path}.{k} (undeclared in {tp.__name__})" for k in value if k not in hints]
        out += [f"{path}.{k} (required by {tp.__name__})" for k in tp.__required_keys__ if k not in value]
        return out + [e for k, v in value.items() if k in hints for e in _undeclared_keys(v, hints[k], f"{path}.{k}")]
    if origin is list and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _undeclared_keys(v, args[0], f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict) and args:
        return [e for k, v in value.items() for e in _undeclared_keys(v, args[1], f"{path}[{k!r}]")]
    return []


def test_every_section_of_results_json_has_the_keys_its_type_declares(fake, seeded):
    """The types of :class:`pipeline.report.results.Results` name every key the analyses write
    (a new key is added to its TypedDict, or this fails naming it)."""
    import dataclasses
    import typing

    for js in (fake["js"], seeded["js"]):
        typed = results.Results.from_json(js)
        errors = []
        for f in dataclasses.fields(results.Results):
            value, tp = getattr(typed, f.name), typing.get_type_hints(results.Results)[f.name]
            if dataclasses.is_dataclass(value):
                hints = typing.get_type_hints(type(value))
                errors += [
                    e
                    for g in dataclasses.fields(value)
                    for e in _undeclared_keys(getattr(value, g.name), hints[g.name], f"{f.name}.{g.name}")
                ]
            else:
                errors += _undeclared_keys(value, tp, f.name)
        assert not errors, errors[:10]


def test_table1_rows_read_their_own_protocol_out_of_fold_risks(fake):
    """Each protocol's Table 1 baseline row equals the mean over folds of the C-index (Harrell,
    lifelines) and 1-year AUROC of that protocol's own out-of-fold risks, read from oof.csv; the
    fake study gives the two protocols different risks, so a row filled from the other protocol
    (e.g. the unbiased row carrying the paper protocol's 0.681 instead of its own 0.559) fails."""
    from lifelines.utils import concordance_index

    from pipeline.metrics import fold_metrics

    runs = Path(fake["spec"].study_dir) / "runs" / "baseline"
    oof = pd.concat(pd.read_csv(runs / f"fold_{k}" / "oof.csv") for k in range(3))
    expected = {}
    for proto in ("paper", "inner"):
        c, auc = [], []
        for k in range(3):
            held = oof[(oof["protocol"] == proto) & (oof["fold"] == k)]
            c.append(concordance_index(held["time"], -held["risk"], held["event"]))
            train = pd.read_csv(runs / f"fold_{k}" / f"train_risk_{proto}.csv")
            auc.append(
                fold_metrics(
                    held[["case_id", "fold", "risk", "time", "event"]],
                    train_survival={k: (train["time"], train["event"])},
                ).iloc[0]["auroc"]
            )
        expected[proto] = (np.mean(c), np.nanmean(auc))
        row = next(r for r in fake["js"]["table1"][proto] if r["group"] == "baseline")
        assert row["c_mean"] == pytest.approx(expected[proto][0], abs=1e-9), proto
        assert row["auc_mean"] == pytest.approx(expected[proto][1], abs=1e-9), proto
    assert abs(expected["inner"][0] - expected["paper"][0]) > 0.05  # the test can tell them apart


# --- training noise (seeds) and checkpoint ties -----------------------------------------------------


def test_a_tie_decides_the_checkpoint_only_against_an_earlier_selectable_epoch():
    from pipeline.report.noise import selection_ties, tie_decided

    nan = float("nan")
    assert tie_decided([0, 1, 2], [0.5, 0.6, 0.6], selected=2)
    assert not tie_decided([0, 1, 2], [0.5, 0.6, 0.6], selected=2, select_from=2)  # epoch 1 not selectable
    assert tie_decided([0, 1, 2], [0.6, 0.5, 0.6], selected=2) and not tie_decided([0, 1, 2], [0.6, 0.5, 0.6], 2, 1)
    assert not tie_decided([0, 1, 2, 3], [0.5, 0.7, 0.6, 0.7], selected=1)  # the later tie came after
    assert not tie_decided([0, 1, 2], [nan, 0.5, 0.6], selected=2) and not tie_decided([0, 1], [0.5, nan], 1)
    # Two cells of two seeds: the inner score ties in the seed-1 cell only, the outer in neither.
    curves = pd.DataFrame(
        {
            "split": "cv0",
            "seed": [0] * 3 + [1] * 3,
            "config": "baseline",
            "fold": 0,
            "epoch": [0, 1, 2] * 2,
            "val_c_index_inner": [0.5, 0.7, 0.6, 0.7, 0.6, 0.7],
            "val_c_index_outer": [0.4, 0.5, 0.6, 0.6, 0.6, 0.7],
        }
    )
    cells = pd.DataFrame(
        {
            "split": "cv0",
            "seed": [0, 1, 1],
            "config": "baseline",
            "fold": [0, 0, 1],
            "done": [True, True, False],
            "selected_epoch_inner": [1, 2, None],
            "selected_epoch_paper": [2, 2, None],
        }
    )
    ties = selection_ties(curves, cells)
    assert list(ties) == ["inner", "paper"]
    assert ties["inner"] == {"n_cells": 2, "n_ties": 1, "cells": ["seed1/baseline/fold_0"]}
    assert ties["paper"] == {"n_cells": 2, "n_ties": 0, "cells": []}
    assert selection_ties(curves, cells, select_from_epoch=1)["inner"]["n_ties"] == 0


def test_one_seed_reports_no_noise_and_states_the_tie_rule_with_its_count(fake):
    js, text = fake["js"], fake["text"]
    assert js["seeds"]["n_seeds"] == 1 and js["seeds"]["noise"] == [] and js["seeds"]["paired_vs_baseline"] == {}
    assert "training noise (seed-to-seed spread) is not measured" in text and "## Training noise" not in text
    # The fixture's selection scores rise every epoch: no tie decided a checkpoint, in 14 finished cells.
    ties = js["selection"]["ties"]
    assert {p: (t["n_cells"], t["n_ties"]) for p, t in ties.items()} == {"inner": (14, 0), "paper": (14, 0)}
    assert "the later one is kept" in text and "in 0 of 14 cells under unbiased inner selection" in text


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The ``fake`` study with the baseline trained with 3 seeds."""
    root = tmp_path_factory.mktemp("seeded")
    spec = make_fake_study(
        root, pending=("ctpet-dorig/fold_2",), old_format=("pet-d256/fold_0",), seeds=3, seed_configs=("baseline",)
    )
    md = write_report(spec.study_dir, root / "report", n_boot=300)
    return {"spec": spec, "text": md.read_text(), "js": read_json(md.parent / "results.json")}


def test_seeds_report_mean_and_sd_over_seeds_and_a_delta_ci_with_the_seed_variance(seeded, fake):
    from lifelines.utils import concordance_index

    from pipeline.report.noise import NOISE_SD_MULTIPLE

    spec, js, text = seeded["spec"], seeded["js"], seeded["text"]
    assert js["cells"] == {"total": 15 + 2 * 3, "done": 14 + 2 * 3}
    # Every table but the training-noise one reads seed 0: the same as the one-seed study.
    assert js["table1"] == fake["js"]["table1"] and js["summary"] == fake["js"]["summary"]
    assert js["records"] == fake["js"]["records"]
    noise = {r["protocol"]: r for r in js["seeds"]["noise"]}
    assert set(noise) == {"inner", "paper"} and {r["config"] for r in js["seeds"]["noise"]} == {"baseline"}
    for proto, r in noise.items():
        means = []
        for s in range(3):
            c = []
            for k in range(spec.n_folds):
                oof = pd.read_csv(
                    study_spec.cell_dir(spec, study_spec.Cell(study_spec.Configuration(), k, seed=s)) / "oof.csv"
                )
                part = oof[oof["protocol"] == proto]
                c.append(concordance_index(part["time"], -part["risk"], part["event"]))
            means.append(np.mean(c))
        assert r["n_seeds"] == 3 and r["seeds"] == [0, 1, 2]
        np.testing.assert_allclose(r["seed_means"], means)
        assert r["mean"] == pytest.approx(np.mean(means)) and r["sd"] == pytest.approx(np.std(means, ddof=1))
        assert js["headline"]["training_noise"][proto]["sd"] == pytest.approx(r["sd"])
    # Δ of every CNN configuration vs the 3-seed baseline, with the seeds' variance in its CI.
    paired = {r["model"]: r for r in js["seeds"]["paired_vs_baseline"]["inner"]}
    assert set(paired) == {"ct-d64", "ct-d128", "pet-d256", "ctpet-dorig"}
    assert paired["ctpet-dorig"]["status"] == "pending"  # a fold of its only seed is pending
    done = paired["ct-d64"]
    assert (done["n_seeds"], done["n_seeds_reference"]) == (1, 3)
    np.testing.assert_allclose(done["seed_means_a"], noise["inner"]["seed_means"])
    assert done["within_baseline_noise"] == (abs(done["delta"]) <= NOISE_SD_MULTIPLE * noise["inner"]["sd"])
    for row in js["headline"]["rows"]["inner"]:
        if row["group"] in ("ct", "pet") and row.get("paired_status") == "done":
            assert row["within_baseline_noise"] == (abs(row["delta"]) <= NOISE_SD_MULTIPLE * noise["inner"]["sd"])
    assert "training seeds the baseline's fold-mean C-index is" in " ".join(js["headline"]["sentences"])
    assert "## Training noise: training seeds" in text and "| 1 / 3 |" in text
    assert f"{noise['inner']['mean']:.3f} ± {noise['inner']['sd']:.3f} (3 seeds)" in text
    assert "|Δ| ≤ 2 × the baseline's seed SD" in text


# --- the demo's check against its reference -----------------------------------------------------


@pytest.mark.slow
def test_demo_check_says_identical_names_differing_cells_and_refuses_to_compare_other_settings(
    finished_study, tmp_path
):
    from pipeline import demo_check

    spec = finished_study
    report_dir = tmp_path / "rep"
    write_report(spec.study_dir, report_dir)
    ref_path = tmp_path / "reference.json"
    reference = demo_check.write_reference(spec.study_dir, report_dir, ref_path)
    assert set(reference["cells"]) == {"baseline/fold_0", "baseline/fold_1", "ct-d64/fold_0"}
    assert reference["environment"]["numerics"] == "portable" and reference["environment"]["cpu_capability"] == "AVX2"
    line = demo_check.check_demo(spec.study_dir, report_dir, ref_path)
    assert line.startswith("demo check: identical to the reference (3 cells"), line
    # One cell computed other bytes on another machine: named, with the fields that differ.
    other = json.loads(json.dumps(reference))
    other["cells"]["ct-d64/fold_0"] = "0" * 64
    other["environment"]["cpu_family_model_stepping"] = "6/60/3"
    write_json_atomic(ref_path, other)
    line = demo_check.check_demo(spec.study_dir, report_dir, ref_path)
    assert "DIFFERENT" in line and "1 of 3 cells differ (ct-d64/fold_0)" in line, line
    assert "environment fields that differ from the reference's: cpu_family_model_stepping" in line, line
    # Other settings, a GPU, or native numerics: said, not compared.
    for key, value, says in (("settings_hash", "other", "other settings"),):
        write_json_atomic(ref_path, reference | {key: value})
        assert says in demo_check.check_demo(spec.study_dir, report_dir, ref_path)
    digest = demo_check.demo_digest(spec.study_dir, report_dir)
    for env, says in (({"device": "cuda:0"}, "trained on cuda:0"), ({"numerics": "native"}, "native numerics")):
        d = digest | {"environment": digest["environment"] | env}
        line = demo_check.compare(d, reference)
        assert line.startswith("demo check: not compared") and says in line, line
    # A reference is made only under portable numerics on a CPU.
    done = study_spec.cell_layout(spec, study_spec.Cell(study_spec.Configuration(), 0)).done(0)
    before = done.read_text()
    try:
        record = read_json(done)
        write_json_atomic(done, record | {"environment": record["environment"] | {"numerics": "native"}})
        with pytest.raises(ValueError, match="portable numerics"):
            demo_check.write_reference(spec.study_dir, report_dir, tmp_path / "refused.json")
        assert not (tmp_path / "refused.json").exists()
    finally:
        done.write_text(before)


def test_readme_demo_figures_are_the_reference_run():
    """Every demo figure the README quotes comes from the committed reference run: the block
    between the demo-reference markers is exactly what the reference renders."""
    from pipeline import demo_check

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"<!-- demo-reference: begin[^>]*-->\n(.*?)\n<!-- demo-reference: end -->", readme, re.S)
    assert found, "README.md has no demo-reference block"
    assert found.group(1) == demo_check.readme_block(read_json(demo_check.REFERENCE))
