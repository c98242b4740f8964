"""Study report: arithmetic of the tables, Table 1 selection, figures, pending cells, files."""

from __future__ import annotations

import base64
import math
import re

import numpy as np
import pandas as pd
import pytest

from pipeline import report, study
from pipeline.artefacts import read_json
from test_study import make_spec, make_study_inputs


def _records(values: dict[str, dict[str, list]], n_folds: int = 3) -> pd.DataFrame:
    """Crafted per-fold records: config -> {protocol: [(c, auc, sel), ...]}; missing = pending."""
    rows = []
    for name in [c.name for c in study.configurations()]:
        conf = study.Configuration.from_name(name)
        for proto in ("paper", "inner"):
            folds = values.get(name, {}).get(proto, [])
            for k in range(n_folds):
                done = k < len(folds)
                c, a, s = folds[k] if done else (np.nan, np.nan, np.nan)
                rows.append({"config": name, "modality": conf.modality or "baseline", "d": conf.d_label,
                             "fold": k, "protocol": proto, "done": done, "c_index": c, "auc_1y": a,
                             "selection_c_index": s})
    return pd.DataFrame(rows)


def test_summary_means_sds_best_d_and_deltas_are_computed_from_the_records():
    nan = float("nan")
    vals = {
        "baseline": {"paper": [(0.60, 0.70, 0.6), (0.62, 0.66, 0.6), (0.64, nan, 0.6)],
                     "inner": [(0.58, 0.60, 0.55), (0.60, 0.62, 0.55), (0.62, 0.64, 0.55)]},
        # Under the paper protocol ct-d128 has the best outer mean; under the inner protocol
        # ct-d64 has the best inner-validation mean although its outer mean is lower.
        "ct-d64": {"paper": [(0.70, 0.7, 0.9), (0.70, 0.7, 0.9), (0.70, 0.7, 0.9)],
                   "inner": [(0.61, 0.65, 0.80), (0.63, 0.67, 0.80), (0.65, 0.69, 0.80)]},
        "ct-d128": {"paper": [(0.80, 0.8, 0.5), (0.70, 0.9, 0.5), (0.75, 0.85, 0.5)],
                    "inner": [(0.70, 0.7, 0.60), (0.70, 0.7, 0.60), (0.70, 0.7, 0.60)]},
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

    t_paper = report.table1(summary, "paper").set_index("modality")
    assert t_paper.loc["ct", "config"] == "ct-d128"
    assert t_paper.loc["ct", "c_mean"] == pytest.approx(0.75)
    assert t_paper.loc["ct", "delta_c"] == pytest.approx(0.75 - 0.62)
    assert t_paper.loc["ct", "delta_auc"] == pytest.approx(0.85 - 0.68)
    assert t_paper.loc["pet", "d"] == "orig" and t_paper.loc["pet", "delta_c"] == pytest.approx(0.04)
    assert t_paper.loc["ctpet", "status"] == "pending"

    t_inner = report.table1(summary, "inner").set_index("modality")
    assert t_inner.loc["ct", "config"] == "ct-d64"  # chosen by the inner-validation mean
    assert t_inner.loc["ct", "c_mean"] == pytest.approx(0.63)
    assert t_inner.loc["ct", "delta_c"] == pytest.approx(0.63 - 0.60)

    disp = report.table1_display(report.table1(summary, "paper"), "paper").set_index("configuration")
    assert disp.loc["+ CT", "C-index"] == "0.750 ± 0.050"
    assert disp.loc["DeepMTS+DAFT baseline", "1-year AUROC"] == "0.680 ± 0.028 (2/3)"
    assert disp.loc["+ CT", "Δ C-index"] == "+0.130"
    assert disp.loc["+ CT+PET", "C-index"] == "pending"
    table = report.ablation_table(summary).set_index(["model", "embeddings", "d"]).loc["DeepMTS+DAFT"]
    assert table.loc[("CT", "256"), "folds done"] == "2/3"
    assert table.loc[("CT", "256"), "C-index (paper)"] == "0.950 ± 0.000 (2/3)"
    assert table.loc[("CT+PET", "64"), "C-index (unbiased)"] == "pending"


def test_format_of_mean_sd():
    assert report.fmt_mean_sd(0.7123, 0.1) == "0.712 ± 0.100"
    assert report.fmt_mean_sd(0.7, None, 1, 5) == "0.700 ± n/a (1/5)"
    assert report.fmt_mean_sd(None, None, 0, 5) == "pending"


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_study_inputs(root / "inputs")
    spec = make_spec(inputs, root / "study", configs=("baseline", "ct-d64", "ctpet-dorig"), n_folds=2)
    study.prepare_study(spec, info={"synthetic": True, "data_source": "tiny test cohort",
                                    "oracle_c_index": 0.8123, "settings": "test"})
    for cell in (study.Cell(study.Configuration(), 0), study.Cell(study.Configuration(), 1),
                 study.Cell(study.Configuration("ct", 64), 0)):
        study.run_cell(spec, cell)
    return spec


def test_report_from_real_cells_shows_pending_and_writes_every_file(finished_study, tmp_path):
    spec = finished_study
    md_path = report.write_report(spec.study_dir, tmp_path / "rep")
    out = md_path.parent
    md = md_path.read_text()
    for name in ("report.html", "results.csv", "results.json", "figure2_c_index.png", "figure3_auc_1y.png"):
        assert (out / name).is_file(), name
    # Figures are real PNGs, linked relatively from the Markdown and embedded in the HTML.
    png = (out / "figure2_c_index.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "](figure2_c_index.png)" in md and "](figure3_auc_1y.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # Figures 2-6
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
    done = read_json(study.cell_dir(spec, study.Cell(study.Configuration(), 1)) / "done.json")
    row = res[(res.config == "baseline") & (res.fold == 1) & (res.protocol == "paper")].iloc[0]
    assert row["c_index"] == pytest.approx(done["protocols"]["paper"]["c_index"])
    # The ablation table marks the partial and the pending configuration.
    summary = report.summarise_records(report.collect_records(spec), spec.n_folds)
    s = summary.set_index(["protocol", "config"])
    assert s.loc[("paper", "ct-d64"), "n_done"] == 1 and s.loc[("paper", "ctpet-dorig"), "n_done"] == 0
    assert "| DeepMTS+DAFT | CT | 64 | 1/2 |" in md and "| DeepMTS+DAFT | CT+PET | orig | 0/2 | pending |" in md
    # Baseline mean in the report equals the mean of its two folds.
    c = [read_json(study.cell_dir(spec, study.Cell(study.Configuration(), k)) / "done.json")
         ["protocols"]["paper"]["c_index"] for k in (0, 1)]
    assert s.loc[("paper", "baseline"), "c_mean"] == pytest.approx(np.mean(c))
    js = read_json(out / "results.json")
    assert js["cells"] == {"total": 6, "done": 3}
    assert js["study"]["embeddings"]["random_init"] is True
    assert {r["modality"] for r in js["table1"]["paper"]} == {"baseline", "ct", "pet", "ctpet", "clinical",
                                                              "radiomics", "head-ct", "head-ctpet"}
    assert {r["status"] for r in js["table1"]["paper"] if r["modality"].startswith(("head", "clin", "rad"))} \
        == {"pending"}


def test_report_cli_report_only(finished_study, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.study import run_study

    res = CliRunner().invoke(run_study, ["--out", finished_study.study_dir, "--report-only",
                                         "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(f"report: {tmp_path / 'r' / 'report.md'}")
