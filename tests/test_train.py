"""End-to-end tests of stage two on a tiny synthetic cohort through the real code paths."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import NARROW_ENCODERS, expensive
from lifelines.utils import concordance_index
from sksurv.metrics import concordance_index_censored

from pipeline.cli.train import train_survival
from pipeline.layout import CURVES_COLUMNS, OOF_COLUMNS, TRAIN_RISK_COLUMNS

pytestmark = pytest.mark.slow  # trains networks end to end

TINY = [
    "--n-folds",
    "3",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "3",
    "--batch-size",
    "4",
    "--ema-decay",
    "0.5",
    "--model-config",
    '{"preset": "tiny"}',
    "--quiet",
]


def _run(args):
    result = CliRunner().invoke(train_survival, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
@expensive
def baseline_run(tiny_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = [
        "--manifest",
        str(tiny_study["manifest"]),
        "--cache",
        str(tiny_study["cache"]),
        "--out",
        str(out / "baseline"),
        "--folds",
        str(out / "folds.json"),
        *TINY,
    ]
    result = _run(args)
    assert result.exit_code == 0, result.output
    return {"dir": out / "baseline", "args": args, "out": out, "output": result.output}


def test_run_writes_every_artefact(baseline_run):
    run = baseline_run["dir"]
    for name in ("run.json", "folds.csv", "summary.json", "oof_predictions.csv"):
        assert (run / name).is_file(), name
    for k in range(3):
        for name in ("done.json", "curves.csv", "oof.csv", "fold_state.json", "best_paper.pt", "best_inner.pt"):
            assert (run / f"fold_{k}" / name).is_file(), (k, name)
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert cfg["epochs"] == 2 and cfg["model"] == {"preset": "tiny"}
    curves = pd.read_csv(run / "fold_0" / "curves.csv")
    assert {"loss", "dice", "cox", "val_c_index_outer", "val_c_index_inner"} <= set(curves.columns)
    # The layout's column list is what training records: no column left empty by a renamed key.
    assert tuple(curves.columns) == CURVES_COLUMNS
    assert curves[["epoch", "lr_factor", "dice", "cox", "total", "loss", "seconds"]].notna().all().all()
    assert curves["train_c_index"].notna().tolist() == [False, True]  # train_c_every 5: the last epoch only
    oof = pd.read_csv(run / "fold_0" / "oof.csv")
    assert tuple(oof.columns) == OOF_COLUMNS
    assert tuple(pd.read_csv(run / "fold_0" / "train_risk_paper.csv").columns) == TRAIN_RISK_COLUMNS
    assert "paper protocol" in baseline_run["output"] and "unbiased" in baseline_run["output"]


def test_oof_covers_each_case_once_per_protocol_in_its_own_fold(baseline_run):
    run = baseline_run["dir"]
    oof = pd.read_csv(run / "oof_predictions.csv", dtype={"case_id": str})
    folds = pd.read_csv(run / "folds.csv", dtype={"case_id": str}).set_index("case_id")["fold"]
    for proto, part in oof.groupby("protocol"):
        assert part["case_id"].is_unique, proto
        assert set(part["case_id"]) == set(folds.index), proto
        assert (part.set_index("case_id")["fold"] == folds.loc[part["case_id"]].to_numpy()).all()
    for k in sorted(folds.unique()):  # every fold: fit, inner and validation partition the cohort
        state = json.loads((run / f"fold_{k}" / "fold_state.json").read_text())
        fit, inner = set(state["fit_case_ids"]), set(state["inner_case_ids"])
        val = set(folds.index[folds == k])
        assert fit.isdisjoint(inner) and fit.isdisjoint(val) and inner.isdisjoint(val), k
        assert fit | inner | val == set(folds.index), k


def test_summary_equals_scikit_survival_and_lifelines_on_saved_predictions(baseline_run):
    run = baseline_run["dir"]
    oof = pd.read_csv(run / "oof_predictions.csv", dtype={"case_id": str})
    summary = json.loads((run / "summary.json").read_text())
    for proto, res in summary["protocols"].items():
        per_fold = {r_fold: r for r_fold, r in enumerate(res["per_fold"])}
        for k, part in oof[oof["protocol"] == proto].groupby("fold"):
            ref = concordance_index_censored(part["event"].astype(bool), part["time"], part["risk"])[0]
            ll = concordance_index(part["time"], -part["risk"], part["event"])
            assert per_fold[k]["c_index"] == pytest.approx(ref, abs=1e-12)
            assert per_fold[k]["c_index"] == pytest.approx(ll, abs=1e-9)
        c = [r["c_index"] for r in res["per_fold"]]
        assert res["c_index"]["mean"] == pytest.approx(np.mean(c))
        assert res["c_index"]["sd"] == pytest.approx(np.std(c, ddof=1))


def test_rerun_skips_finished_folds_and_a_killed_fold_is_redone(baseline_run):
    run = baseline_run["dir"]
    done = [run / f"fold_{k}" / "done.json" for k in range(3)]
    before = [os.stat(p).st_mtime_ns for p in done]
    result = _run(baseline_run["args"])
    assert result.exit_code == 0
    assert result.output.count("already done, skipped") == 3
    assert [os.stat(p).st_mtime_ns for p in done] == before
    # A fold killed before its completion marker is trained again; the others are kept.
    done[2].unlink()
    result = _run(baseline_run["args"])
    assert result.exit_code == 0
    assert result.output.count("already done, skipped") == 2
    assert done[2].is_file()
    assert [os.stat(p).st_mtime_ns for p in done[:2]] == before[:2]


def test_resume_with_other_settings_is_refused(baseline_run):
    args = list(baseline_run["args"])
    args[args.index("--epochs") + 1] = "3"
    result = _run(args)
    assert result.exit_code == 1
    assert "config_hash differs" in result.output


def test_embeddings_run_end_to_end_and_random_init_is_flagged(tiny_study, baseline_run, tmp_path):
    from pipeline.extraction import extract_embeddings

    h5 = extract_embeddings(
        tiny_study["cache"],
        "ctpet",
        tmp_path / "ctpet.h5",
        random_init=True,
        device="cpu",
        encoder_kwargs=NARROW_ENCODERS,
        progress=False,
        shard_dir=tmp_path / "shards",
    )
    out = baseline_run["out"]
    args = [
        "--manifest",
        str(tiny_study["manifest"]),
        "--cache",
        str(tiny_study["cache"]),
        "--embeddings",
        str(h5),
        "--proj",
        "64",
        "--out",
        str(tmp_path / "run"),
        "--folds",
        str(out / "folds.json"),
        *TINY,
    ]
    result = _run(args)
    assert result.exit_code == 0, result.output
    assert "RANDOMLY INITIALISED" in result.output
    assert "ct [32]" in result.output and "pet [32]" in result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["modalities"] == ["ct", "pet"] and run["config"]["proj"] == 64
    # Same shared folds as the baseline: every configuration sees identical splits.
    a = pd.read_csv(baseline_run["dir"] / "folds.csv")
    b = pd.read_csv(tmp_path / "run" / "folds.csv")
    pd.testing.assert_frame_equal(a, b)


def test_embeddings_missing_a_case_are_refused_naming_it(tiny_study, tmp_path):
    from pipeline.feature_tables import import_feature_table

    manifest = pd.read_csv(tiny_study["manifest"], dtype={"case_id": str})
    ids = manifest.loc[manifest["has_endpoint"] == 1, "case_id"].tolist()
    table = pd.DataFrame({"PatientID": ids[1:], "f0": np.arange(len(ids) - 1, dtype=float)})
    table.to_csv(tmp_path / "feat.csv", index=False)
    import_feature_table(tmp_path / "feat.csv", tmp_path / "feat.h5", name="feat", cache=tiny_study["cache"])
    result = _run(
        [
            "--manifest",
            str(tiny_study["manifest"]),
            "--cache",
            str(tiny_study["cache"]),
            "--embeddings",
            str(tmp_path / "feat.h5"),
            "--out",
            str(tmp_path / "run"),
            "--folds",
            str(tmp_path / "folds.json"),
            *TINY,
        ]
    )
    assert result.exit_code == 1
    assert ids[0] in result.output


def test_a_fold_failing_in_a_worker_fails_the_run_as_it_would_in_process(tiny_study, tmp_path):
    """--workers 2: the failing fold's own error reaches the user (not a pool error) and the
    run stops without a summary."""
    args = [
        "--manifest",
        str(tiny_study["manifest"]),
        "--cache",
        str(tiny_study["cache"]),
        "--out",
        str(tmp_path / "run"),
        "--folds",
        str(tmp_path / "folds.json"),
        *TINY,
        "--fold",
        "0",
        "--fold",
        "7",
        "--workers",
        "2",
    ]
    result = CliRunner().invoke(train_survival, args)
    assert result.exit_code == 1, result.output
    assert "error: fold 7 has no validation case" in result.output
    assert not (tmp_path / "run" / "summary.json").exists()


def test_scoring_the_fit_rows_every_third_epoch_changes_nothing_but_the_curves_train_c(tiny_study, tmp_path):
    """Sparse training C-index (train_c_every): the same risks, selection, calibration and
    scores as scoring the fit rows every epoch; only the skipped epochs' train C is NaN."""
    from pipeline.artefacts import read_json
    from pipeline.dataset import load_cohort
    from pipeline.splits import get_folds
    from pipeline.train import TrainConfig, train_fold

    cohort = load_cohort(tiny_study["manifest"], tiny_study["cache"])
    folds = get_folds(tmp_path / "folds.json", cohort, n_folds=3)
    runs = {}
    for every in (1, 3):
        cfg = TrainConfig(
            epochs=5,
            steps_per_epoch=2,
            batch_size=4,
            eval_batch_size=4,
            ema_decay=0.5,
            model={"preset": "tiny"},
            train_c_every=every,
            threads=1,
        )
        train_fold(cohort, folds, 2, cfg, tmp_path / f"every{every}", progress=False)
        runs[every] = tmp_path / f"every{every}" / "fold_2"
    a, b = runs[1], runs[3]
    for name in ("oof.csv", "train_risk_paper.csv", "train_risk_inner.csv", "fold_state.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    done_a, done_b = read_json(a / "done.json"), read_json(b / "done.json")
    assert done_a["protocols"] == done_b["protocols"] and done_a["start"] == done_b["start"]
    ca, cb = pd.read_csv(a / "curves.csv"), pd.read_csv(b / "curves.csv")
    scored = cb["train_c_index"].notna()
    assert scored.tolist() == [False, False, True, False, True]  # every third epoch and the last
    assert ca["train_c_index"].notna().all()
    assert (ca.loc[scored, "train_c_index"] == cb.loc[scored, "train_c_index"]).all()
    same = [c for c in ca.columns if c not in ("train_c_index", "seconds")]
    pd.testing.assert_frame_equal(ca[same], cb[same])
    # An epoch not scored was selected (fold 2 here: the paper protocol's epoch 3), so its
    # training risks came from its checkpoint, with the bits scoring them then gives.
    assert {done_b["protocols"][p]["selected_epoch"] for p in ("paper", "inner")} - {2, 4}, (
        "no unscored epoch selected: pick another fold or seed so the checkpoint path is tested"
    )
