"""Beyond the paper: repeated CV, leave-one-centre-out, paired comparisons, IBS / calibration / KM,
classical peers on the same folds, all from real (tiny) cells and the report built on them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_TRAIN, expensive, make_study_inputs

from pipeline import study, study_spec
from pipeline.artefacts import read_json
from pipeline.metrics import ibs_time_grid, integrated_brier_score
from pipeline.report import analysis as report
from pipeline.report import collect, figures, write_report
from pipeline.splits import load_folds, make_folds
from pipeline.stats import (
    breslow_survival,
    calibration_at,
    km_logrank,
    paired_bootstrap_delta,
    risk_groups,
)

pytestmark = pytest.mark.slow  # trains networks or runs the console scripts end to end

CENSORED_CENTRE = "HGJ"  # every HGJ case is censored: its LOCO fold has no event
CONFIGS = ("baseline", "ct-d64")


@pytest.fixture(scope="module")
@expensive
def beyond(tmp_path_factory):
    """2 configurations x (2 repeats x 2 folds + 4 LOCO centres) = 16 real cells, every peer, the report."""
    root = tmp_path_factory.mktemp("beyond")
    inputs = make_study_inputs(root / "inputs", n_cases=24, censor_centre=CENSORED_CENTRE)
    train = json.loads(json.dumps(TINY_TRAIN)) | {"inner_val_fraction": 0.3}
    spec = study_spec.StudySpec.create(
        inputs["manifest"],
        inputs["cache"],
        inputs["embeddings"],
        root / "study",
        n_folds=2,
        train=train,
        configs=CONFIGS,
        repeats=2,
        loco=True,
        head={"n_alphas": 5, "inner_folds": 2},
    )
    study.prepare_study(spec, info={"synthetic": True, "settings": "test"})
    peers = study.run_peers(spec)
    assert peers.ok, peers.failed
    for cell in study_spec.grid(spec):  # in-process: the cohort is loaded once
        study.run_cell(spec, cell)
    md = write_report(spec.study_dir, root / "report")
    return {"spec": spec, "md": md, "js": read_json(md.parent / "results.json"), "peers": peers}


def _cnn_oof(spec, config: str, split: str, protocol: str) -> pd.DataFrame:
    conf = study_spec.Configuration.from_name(config)
    frames = [
        pd.read_csv(spec.run_dir(conf, split) / f"fold_{k}" / "oof.csv", dtype={"case_id": str})
        for k in range(study_spec.split_n_folds(spec, split))
    ]
    oof = pd.concat(frames)
    return oof[oof["protocol"] == protocol].drop(columns="protocol")


def _peer_oof(spec, name: str, split: str) -> pd.DataFrame:
    peer = {p.name: p for p in spec.peer_list()}[name]
    return pd.read_csv(spec.peer_dir(peer, split) / "oof_predictions.csv", dtype={"case_id": str}).drop(
        columns="protocol"
    )


def test_repeats_and_loco_have_their_own_shared_folds_and_cells(beyond):
    spec = beyond["spec"]
    assert spec.splits() == ["cv0", "cv1", "loco"]
    centres = ["CHUM", "CHUP", "HGJ", "MDA"]
    assert study_spec.loco_centres(spec) == centres
    cells = study_spec.grid(spec)
    assert len(cells) == len(CONFIGS) * (2 + 2 + 4) and len({c.key for c in cells}) == len(cells)
    assert all(study_spec.cell_done(spec, c) for c in cells)
    assert study_spec.Cell(study_spec.Configuration(), 1, "cv1").key == "cv1/baseline/fold_1"
    f0, f1 = load_folds(spec.folds_path_of("cv0")), load_folds(spec.folds_path_of("cv1"))
    assert set(f0["case_id"]) == set(f1["case_id"])
    assert not (f0.set_index("case_id")["fold"] == f1.set_index("case_id")["fold"]).all()  # a new split
    # Repeat r uses seed + r, as pipeline.splits.repeated_folds does.
    surv = collect.read_survival(spec)
    ids = sorted(surv.index)
    ref = make_folds(ids, surv.loc[ids, "time"], surv.loc[ids, "event"], n_splits=2, seed=43)
    assert f1.set_index("case_id")["fold"].to_dict() == ref.set_index("case_id")["fold"].to_dict()
    # LOCO folds are the centres: fold k holds every case of the k-th centre and nothing else.
    loco = load_folds(spec.folds_path_of("loco"))
    for k, centre in enumerate(centres):
        assert set(loco.loc[loco["fold"] == k, "case_id"]) == {c for c in ids if c.startswith(centre)}
    # Identical folds across configurations (and the peers) within each split.
    rec = read_json(spec.root / "study.json")
    for split in spec.splits():
        hashes = {read_json(spec.run_dir(c, split) / "run.json")["folds_hash"] for c in spec.configurations()}
        assert hashes == {rec["splits"][split]["folds_hash"]}
        for peer in spec.peer_list():
            summ = read_json(spec.peer_dir(peer, split) / "summary.json")
            assert summ["inputs"]["folds"] == str(spec.folds_path_of(split))
        oof = _cnn_oof(spec, "ct-d64", split, "paper")
        folds = load_folds(spec.folds_path_of(split)).set_index("case_id")["fold"]
        assert (oof.set_index("case_id")["fold"] == folds.loc[oof["case_id"]]).all()
    assert [p.name for p in spec.peer_list()] == ["clinical-cox", "radiomics-cox", "head-ct-d64"]


def test_peer_runs_resume_and_refit_on_changed_settings(beyond, tmp_path):
    spec = beyond["spec"]
    assert len(beyond["peers"].ran) == 3 * 3
    again = study.run_peers(spec)
    assert again.ran == [] and len(again.skipped) == 9
    # Other head settings change the marker key: only the heads refit.
    other = study_spec.StudySpec.from_dict(spec.to_dict() | {"head": {"n_alphas": 4, "inner_folds": 2}})
    head = study_spec.Peer("embeddings", "ct", 64)
    assert study._peer_key(other, head, "cv0", "x") != study._peer_key(spec, head, "cv0", "x")
    assert study._peer_key(other, study_spec.Peer("clinical"), "cv0", None) == study._peer_key(
        spec, study_spec.Peer("clinical"), "cv0", None
    )


def test_paired_table_equals_paired_bootstrap_of_the_saved_oof_files(beyond):
    spec, js, md = beyond["spec"], beyond["js"], beyond["md"].read_text()
    rows = {r["model"]: r for r in js["paired_vs_baseline"]["paper"]}
    a = pd.concat([_cnn_oof(spec, "baseline", s, "paper").assign(repeat=r) for r, s in enumerate(("cv0", "cv1"))])
    for name, b in (
        (
            "ct-d64",
            pd.concat([_cnn_oof(spec, "ct-d64", s, "paper").assign(repeat=r) for r, s in enumerate(("cv0", "cv1"))]),
        ),
        (
            "radiomics-cox",
            pd.concat([_peer_oof(spec, "radiomics-cox", s).assign(repeat=r) for r, s in enumerate(("cv0", "cv1"))]),
        ),
    ):
        ref = paired_bootstrap_delta(a, b, n_boot=report.N_BOOT, seed=0)
        row = rows[name]
        assert row["status"] == "done" and row["splits"] == ["cv0", "cv1"] and row["n_groups"] == 4
        for key in ("delta", "ci_low", "ci_high", "p_value", "a", "b"):
            assert row[key] == pytest.approx(getattr(ref, key)), (name, key)
        assert row["fold_test"]["p_value"] == pytest.approx(ref.fold_test.p_value)
        assert row["fold_test"]["method"] == "nadeau_bengio" and row["fold_test"]["n"] == 4
        assert f"{ref.delta:+.3f} [{ref.ci_low:+.3f}, {ref.ci_high:+.3f}]" in md
    # Heads and radiomics against the clinical Cox, over both repeats.
    vs = {r["model"]: r for r in js["paired_vs_clinical_cox"]}
    assert set(vs) == {"radiomics-cox", "head-ct-d64"} and vs["head-ct-d64"]["reference"] == "clinical-cox"
    clin = pd.concat([_peer_oof(spec, "clinical-cox", s).assign(repeat=r) for r, s in enumerate(("cv0", "cv1"))])
    head = pd.concat([_peer_oof(spec, "head-ct-d64", s).assign(repeat=r) for r, s in enumerate(("cv0", "cv1"))])
    assert vs["head-ct-d64"]["delta"] == pytest.approx(paired_bootstrap_delta(clin, head, n_boot=report.N_BOOT).delta)


def test_loco_reports_every_centre_and_an_eventless_centre_as_undefined(beyond):
    spec, js, md = beyond["spec"], beyond["js"], beyond["md"].read_text()
    loco = js["loco"]
    assert [c["centre"] for c in loco["centres"]] == ["CHUM", "CHUP", "HGJ", "MDA"]
    hgj = next(c for c in loco["centres"] if c["centre"] == CENSORED_CENTRE)
    assert hgj["events"] == 0 and hgj["n"] == 6
    models = {(m["model"], m["protocol"]): m for m in loco["models"]}
    assert {("baseline", "paper"), ("ct-d64", "inner"), ("clinical-cox", "fit"), ("head-ct-d64", "fit")} <= set(models)
    for m in loco["models"]:
        cell = next(p for p in m["per_centre"] if p["centre"] == CENSORED_CENTRE)
        assert cell["done"] and cell["c_index"] is None and cell["auc_1y"] is None, m["model"]
        assert cell["c_index_reason"] in ("no_events", "no valid epoch"), (m["model"], cell)
    clin = models[("clinical-cox", "fit")]
    assert next(p for p in clin["per_centre"] if p["centre"] == CENSORED_CENTRE)["c_index_reason"] == "no_events"
    # Defined centres are the peer's own per-fold metrics, and their mean is the pooled mean.
    summ = read_json(spec.peer_dir(study_spec.Peer("clinical"), "loco") / "summary.json")
    per = {int(r["fold"]): r["c_index"] for r in summ["per_fold"]}
    defined = [v for v in per.values() if v is not None and np.isfinite(v)]
    assert len(defined) == 3 and clin["mean_c_index"]["mean"] == pytest.approx(np.mean(defined))
    table = md.split("## Leave-one-centre-out")[1].split("\n## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| peer: clinical Cox"))
    hgj_col = [c.strip() for c in row.split("|")][1 + 1 + 2]  # model, CHUM, CHUP, HGJ
    assert hgj_col == "C undefined: no event in the held-out fold; AUROC undefined: no event before 365 d"
    assert f"{CENSORED_CENTRE} (n=6, ev=0)" in table


def test_ibs_calibration_and_km_equal_a_recomputation_from_the_saved_files(beyond):
    spec, js = beyond["spec"], beyond["js"]
    surv = js["survival"]
    proto = surv["protocol"]
    assert proto == "inner"
    got = {m["model"]: m for m in surv["models"]}
    assert {"baseline", "clinical-cox", "radiomics-cox", "head-ct-d64"} <= set(got)
    assert "ct-d64" in got  # Table 1's choice for CT (the only CT configuration here)
    for name, reader in (("baseline", "cnn"), ("clinical-cox", "peer")):
        m = got[name]
        assert m["status"] == "done"
        ibs, probs, groups, frames = [], [], [], []
        for split in ("cv0", "cv1"):
            for k in range(2):
                if reader == "cnn":
                    folder = spec.run_dir(study_spec.Configuration(), split) / f"fold_{k}"
                    oof = pd.read_csv(folder / "oof.csv", dtype={"case_id": str})
                    oof = oof[oof["protocol"] == proto]
                    train = pd.read_csv(folder / f"train_risk_{proto}.csv", dtype={"case_id": str})
                else:
                    folder = spec.peer_dir(study_spec.Peer("clinical"), split)
                    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"case_id": str})
                    oof = oof[oof["fold"] == k]
                    train = pd.read_csv(folder / "train_risk.csv", dtype={"case_id": str})
                    train = train[train["fold"] == k]
                    assert not set(train["case_id"]) & set(oof["case_id"])  # training rows only
                grid_t = ibs_time_grid(train["time"], oof["time"], n=50)
                s = breslow_survival(train["risk"], train["time"], train["event"], oof["risk"], grid_t)
                ibs.append(integrated_brier_score(train["time"], train["event"], oof["time"], oof["event"], s, grid_t))
                if split == "cv0":
                    probs.append(
                        1 - breslow_survival(train["risk"], train["time"], train["event"], oof["risk"], [365.0])[:, 0]
                    )
                    groups.append(risk_groups(train["risk"], oof["risk"]))
                    frames.append(oof)
        assert [f["ibs"] for f in m["ibs"]["per_fold"]] == pytest.approx(ibs)
        assert m["ibs"]["mean"]["mean"] == pytest.approx(np.mean(ibs))
        pooled = pd.concat(frames)
        p = np.concatenate(probs)
        cal = calibration_at(365.0, p, pooled["time"], pooled["event"], n_groups=5)
        got_cal = pd.DataFrame(m["calibration"]["groups"])
        assert got_cal["pred_mean"].tolist() == pytest.approx(cal["pred_mean"].tolist())
        assert got_cal["observed"].tolist() == pytest.approx(cal["observed"].tolist(), nan_ok=True)
        assert m["calibration"]["overall"]["pred_mean"] == pytest.approx(p.mean())
        g = np.concatenate(groups)
        if len(set(g)) == 2:
            km = km_logrank(pooled["time"], pooled["event"], np.where(g == 1, "high", "low"))
            assert m["km"]["p_value"] == pytest.approx(km.p_value)
            assert m["km"]["groups"]["high"]["n"] == int(g.sum())


def test_peers_are_in_every_table_and_every_figure_is_written(beyond):
    md_path = beyond["md"]
    md, out = md_path.read_text(), md_path.parent
    sections = md.split("\n## ")
    wanted = {
        "Table 1 - paper protocol": "peer: clinical Cox",
        "Table 1 - unbiased inner selection": "peer: CT embedding head",
        "Full projection ablation": "peer: radiomics-lite Cox",
        "Repeated cross-validation": "peer: CT embedding head",
        "Paired comparisons against": "peer: clinical Cox",
        "Leave-one-centre-out": "peer: radiomics-lite Cox",
        "Beyond ranking": "peer: clinical Cox",
    }
    for head, label in wanted.items():
        sec = next(s for s in sections if s.startswith(head))
        assert label in sec, head
    for name in (
        "figure2_c_index.png",
        "figure3_auc_1y.png",
        figures.FIGURE_CALIBRATION,
        figures.FIGURE_KM,
        figures.FIGURE_PAIRED,
        figures.FIGURE_CURVES,
    ):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 6
    analyses = {r["analysis"]: r for r in beyond["js"]["analyses"]}
    assert analyses["leave-one-centre-out"] == {"analysis": "leave-one-centre-out", "cnn": ["loco"], "peers": ["loco"]}
    res = pd.read_csv(out / "results.csv")
    assert set(res["split"]) == {"cv0", "cv1", "loco"} and set(res["kind"]) == {"cnn", "peer"}
