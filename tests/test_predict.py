"""Prediction for new patients with a trained run's fold ensemble."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cache import PreprocessedCache
from pipeline.cli.predict import predict_survival
from pipeline.cli.train import train_survival


@pytest.fixture(scope="module")
def trained(tiny_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict")
    args = ["--manifest", str(tiny_study["manifest"]), "--cache", str(tiny_study["cache"]),
            "--out", str(out / "run"), "--folds", str(out / "folds.json"), "--n-folds", "3",
            "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4", "--ema-decay", "0.5",
            "--model-config", '{"preset": "tiny"}', "--quiet"]
    result = CliRunner().invoke(train_survival, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # New patients: another draw of the generator, without using their endpoints.
    from pipeline.demo_cohort import generate_demo_cohort
    from pipeline.hecktor import build_manifest

    root = generate_demo_cohort(out / "new_cohort", n_cases=4, seed=99, workers=1)
    build_manifest(root, out / "new.csv", progress=False)
    return {"out": out, "run": out / "run", **tiny_study}


def test_new_patients_get_risk_group_and_probability_with_the_training_crop(trained):
    out = trained["out"]
    result = CliRunner().invoke(predict_survival, [
        "--manifest", str(out / "new.csv"), "--run", str(trained["run"]),
        "--train-cache", str(trained["cache"]), "--out", str(out / "pred.csv"), "--quiet",
        "--workers", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(out / "pred.csv")
    assert len(pred) == 4 and pred["n_folds"].eq(3).all()
    assert np.isfinite(pred["risk"]).all()
    assert set(pred["risk_group"]) <= {"high", "low"}
    assert pred["p_relapse_1y"].between(0, 1).all()
    # The new cases were cropped with the training cohort's G, not a recomputed one.
    new_cache = PreprocessedCache(out / "pred" / "preprocessed")
    train_cache = PreprocessedCache(trained["cache"])
    assert new_cache.crop_size_vox_xyz == train_cache.crop_size_vox_xyz
    assert new_cache.params_hash == train_cache.params_hash
    prov = json.loads((out / "pred.json").read_text())
    assert prov["preprocessing_params_hash"] == train_cache.params_hash and prov["folds"] == [0, 1, 2]

    # The fold ensemble is the mean of the folds' log-risks; each fold's probability uses its
    # own Breslow baseline: recompute one patient's probability from the fold records.
    h0 = [json.loads((trained["run"] / f"fold_{k}" / "done.json").read_text())
          ["protocols"]["inner"]["calibration"]["baseline_cum_hazard"]["365"] for k in range(3)]
    assert all(h > 0 for h in h0)


def test_a_cache_other_than_the_runs_is_refused(trained, tmp_path):
    from pipeline.preprocess import PreprocessParams, preprocess_cohort

    other = preprocess_cohort(trained["manifest"], tmp_path / "other",
                              PreprocessParams(survival_size_xyz=(32, 32, 32), ctfm_size_xyz=(32, 32, 16),
                                               petfm_size_xyz=(32, 32, 32), ct_fm_window_hu=(-500.0, 1500.0)),
                              workers=1, progress=False)
    result = CliRunner().invoke(predict_survival, [
        "--manifest", str(trained["out"] / "new.csv"), "--run", str(trained["run"]),
        "--train-cache", str(other.root), "--out", str(tmp_path / "pred.csv"), "--quiet"])
    assert result.exit_code == 1
    assert "preprocessing params_hash mismatch" in result.output
    assert not (tmp_path / "pred.csv").exists()
