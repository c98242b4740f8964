"""Prediction for new patients with a trained run's fold ensemble."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import NARROW_ENCODERS, expensive

from pipeline.cache import PreprocessedCache
from pipeline.cli.predict import predict_survival
from pipeline.cli.train import train_survival
from pipeline.predict import run_is_random_init

pytestmark = pytest.mark.slow  # trains networks or runs the console scripts end to end

N_FOLDS = 3


@pytest.fixture(scope="module")
@expensive
def trained(tiny_study, tmp_path_factory):
    """A tiny 3-fold run with random-init CT+PET embeddings, and 4 new patients."""
    from pipeline.demo_cohort import generate_demo_cohort
    from pipeline.extraction import extract_embeddings
    from pipeline.hecktor import build_manifest

    out = tmp_path_factory.mktemp("predict")
    h5 = extract_embeddings(
        tiny_study["cache"],
        "ctpet",
        out / "ctpet.h5",
        random_init=True,
        device="cpu",
        encoder_kwargs=NARROW_ENCODERS,
        progress=False,
        shard_dir=out / "shards",
    )
    args = [
        "--manifest",
        str(tiny_study["manifest"]),
        "--cache",
        str(tiny_study["cache"]),
        "--embeddings",
        str(h5),
        "--out",
        str(out / "run"),
        "--folds",
        str(out / "folds.json"),
        "--n-folds",
        str(N_FOLDS),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--ema-decay",
        "0.5",
        "--model-config",
        '{"preset": "tiny"}',
        "--quiet",
    ]
    result = CliRunner().invoke(train_survival, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # New patients: another draw of the generator, without using their endpoints.
    root = generate_demo_cohort(out / "new_cohort", n_cases=4, seed=99, workers=1)
    build_manifest(root, out / "new.csv", progress=False)
    return {"out": out, "run": out / "run", **tiny_study}


def _predict(trained, manifest, out_csv, *extra):
    pictures = "--pictures" in extra  # a picture per patient costs a second or two: one test draws them
    extra = [e for e in extra if e != "--pictures"] + ([] if pictures else ["--no-pictures"])
    return CliRunner().invoke(
        predict_survival,
        [
            "--manifest",
            str(manifest),
            "--run",
            str(trained["run"]),
            "--train-cache",
            str(trained["cache"]),
            "--out",
            str(out_csv),
            "--quiet",
            "--workers",
            "1",
            *extra,
        ],
        catch_exceptions=False,
    )


def test_new_patients_get_risk_group_and_probability_with_the_training_crop(trained):
    from pipeline.predict import PREDICTION_COLUMNS, RISK_GROUP_RULE

    out = trained["out"]
    result = _predict(trained, out / "new.csv", out / "pred.csv", "--pictures")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(out / "pred.csv", keep_default_na=False, na_values=[""], dtype={"covariates_filled": str})
    assert tuple(pred.columns) == PREDICTION_COLUMNS
    assert len(pred) == 4 and pred["n_folds"].eq(N_FOLDS).all()
    assert np.isfinite(pred["log_relative_hazard"]).all()
    assert set(pred["risk_group"]) <= {"high", "low"} and (pred["risk_group_rule"] == RISK_GROUP_RULE).all()
    assert "50th percentile" in RISK_GROUP_RULE and f"risk group: {RISK_GROUP_RULE}" in result.output
    assert pred["relapse_probability_1y_percent"].between(0, 100).all()
    assert pred["percentile_among_training"].between(0, 100).all()
    # One picture per patient and an index of them, named in the rows and on the console.
    pictures = out / "pred_pictures"
    assert sorted(pred["picture"]) == sorted(f"pred_pictures/{c}.png" for c in pred["case_id"])
    for name in pred["picture"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (pictures / "index.html").read_text()
    assert all(f"{c}.png" in index for c in pred["case_id"]) and "index.html" in result.output
    # The new cases were cropped with the training cohort's G, not a recomputed one.
    new_cache = PreprocessedCache(out / "pred" / "preprocessed")
    train_cache = PreprocessedCache(trained["cache"])
    assert new_cache.crop_size_vox_xyz == train_cache.crop_size_vox_xyz
    assert new_cache.params_hash == train_cache.params_hash
    prov = json.loads((out / "pred.json").read_text())
    assert prov["preprocessing_params_hash"] == train_cache.params_hash and prov["folds"] == [0, 1, 2]
    # The run's embeddings were random-init: every row, the record and the console say so.
    assert pred["random_init_embeddings"].all() and prov["random_init_embeddings"] is True
    assert "RANDOMLY INITIALISED" in result.output
    # ... because the run's record says so: the same record with real weights reads as not random-init.
    run = json.loads((trained["run"] / "run.json").read_text())
    assert run_is_random_init(run)
    real = copy.deepcopy(run)
    real["embeddings"]["random_init"] = False
    for attrs in real["embeddings"]["modalities"].values():
        attrs["weights_sha256"] = "ab" * 32
    assert set(real["embeddings"]["modalities"]) == {"ct", "pet"} and not run_is_random_init(real)
    # A tumour larger than the training crop G (cut at its border) is flagged in its row, in the
    # record and on the console: here one case of the four, as the cache records it.
    cut = pred.loc[pred["tumour_cut_at_border"], "case_id"].astype(str).tolist()
    assert cut == new_cache.cohort["cases_exceeding_crop"] and 0 < len(cut) < len(pred)
    assert [w["case_id"] for w in prov["warnings"]] == cut
    assert f"{len(cut)} patient(s) with the tumour cut at the crop border" in result.output


def test_a_tumour_cut_at_the_crop_border_is_flagged_in_its_row_and_the_record(trained, tmp_path):
    import SimpleITK as sitk

    from pipeline.demo_cohort import generate_demo_cohort
    from pipeline.hecktor import build_manifest

    root = generate_demo_cohort(tmp_path / "cohort", n_cases=2, seed=98, workers=1)
    # CHUP-001's tumour grown to a box wider than any training tumour (inside its PET field).
    label_path = root / "labelsTr" / "CHUP-001.nii.gz"
    label = sitk.ReadImage(str(label_path))
    arr = sitk.GetArrayFromImage(label)  # (z, y, x)
    arr[5:50, 15:165, 15:165] = 1
    big = sitk.GetImageFromArray(arr)
    big.CopyInformation(label)
    sitk.WriteImage(big, str(label_path))
    build_manifest(root, tmp_path / "new.csv", progress=False)
    result = _predict(trained, tmp_path / "new.csv", tmp_path / "pred.csv")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"case_id": str}).set_index("case_id")
    assert pred.loc["CHUP-001", "tumour_cut_at_border"]
    cut = pred.index[pred["tumour_cut_at_border"]].tolist()
    prov = json.loads((tmp_path / "pred.json").read_text())
    assert [w["case_id"] for w in prov["warnings"]] == cut
    assert all("cut at the crop border" in w["warning"] for w in prov["warnings"])
    assert "CHUP-001" in result.output
    # ... and outside what the model was trained on: its volume, with the training range.
    lo, hi = prov["training_reference"]["tumour_volume_ml"]
    assert pred.loc["CHUP-001", "out_of_distribution"]
    assert f"outside the training range {lo:.1f}-{hi:.1f} ml" in pred.loc["CHUP-001", "out_of_distribution_reasons"]
    assert "OUTSIDE THE TRAINING DATA: tumour volume" in result.output


def test_filled_covariates_and_values_outside_the_training_range_are_named_per_patient(trained, tmp_path):
    """A patient missing six covariates is told which were filled, with the folds' training medians,
    and is flagged; an age beyond the training ages is flagged with the range."""
    from pipeline.artefacts import read_json

    table = pd.read_csv(trained["out"] / "new.csv", dtype=str, keep_default_na=False)
    gone = ["weight", "tobacco", "alcohol", "performance_status", "hpv_status", "surgery"]
    table.loc[0, gone] = ""
    table.loc[1, "age"] = "130"
    for col in ("ct_path", "pet_path", "label_path"):  # the images stay where the original manifest has them
        table[col] = [str((trained["out"] / v).resolve()) for v in table[col]]
    table.to_csv(tmp_path / "new.csv", index=False)
    result = _predict(trained, tmp_path / "new.csv", tmp_path / "pred.csv")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"case_id": str}, keep_default_na=False).set_index("case_id")
    first, second = table["case_id"].iloc[0], table["case_id"].iloc[1]
    fills = [
        read_json(trained["run"] / f"fold_{k}" / "fold_state.json")["clinical_transform"]["params"]
        for k in range(N_FOLDS)
    ]
    hpv = "/".join(f"{v:g}" for v in sorted({f["hpv_status"]["fill"] for f in fills}))
    assert pred.loc[first, "n_covariates_missing"] == 6
    assert f"hpv_status={hpv}" in pred.loc[first, "covariates_filled"]
    assert "training medians" in pred.loc[first, "covariates_filled"]
    assert "6 of 9 covariates missing" in pred.loc[first, "out_of_distribution_reasons"]
    assert f"{first}: log relative hazard" in result.output and "covariates filled: weight=" in result.output
    assert pred.loc[second, "out_of_distribution"]
    assert "age 130 outside the training range" in pred.loc[second, "out_of_distribution_reasons"]


def _fold_risks(run, protocol: str) -> tuple[pd.DataFrame, list[dict]]:
    """Per-case log-risk of every fold's selected model, read from the fold files alone.

    A training case is in each fold's training part (``train_risk_<protocol>.csv``) or in its
    validation fold (``oof.csv``), so every fold scored it.
    """
    cols, records = {}, []
    for k in range(N_FOLDS):
        fold = run / f"fold_{k}"
        train = pd.read_csv(fold / f"train_risk_{protocol}.csv", dtype={"case_id": str})
        oof = pd.read_csv(fold / "oof.csv", dtype={"case_id": str})
        oof = oof[oof["protocol"] == protocol]
        cols[k] = pd.concat([train, oof])[["case_id", "risk"]].set_index("case_id")["risk"]
        records.append({"train": train, "done": json.loads((fold / "done.json").read_text())})
    return pd.DataFrame(cols), records


def _breslow_h0(risk: np.ndarray, time: np.ndarray, event: np.ndarray, t: float) -> float:
    """Breslow cumulative baseline hazard at ``t``: sum over events up to t of 1 / sum of exp(risk) at risk."""
    return float(sum(1.0 / np.exp(risk[time >= ti]).sum() for ti in time[(event == 1) & (time <= t)]))


def test_ensemble_risk_group_and_probability_equal_a_recomputation_from_the_fold_files(trained, tmp_path):
    """Scoring the training cases as new patients must give, per case, the mean of the folds'
    saved risks, the majority vote of risk > training median, and the mean over folds of
    1 - exp(-H0(365) exp(risk)) with H0 recomputed by hand from each fold's training risks."""
    result = _predict(trained, trained["manifest"], tmp_path / "train_as_new.csv")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(tmp_path / "train_as_new.csv", dtype={"case_id": str}).set_index("case_id")
    risks, records = _fold_risks(trained["run"], "inner")
    pred = pred.loc[risks.index]
    assert risks.notna().all().all() and risks.std().gt(1e-4).all()  # every fold scored every case, not constant

    medians, h0 = [], []
    for rec in records:
        train, cal = rec["train"], rec["done"]["protocols"]["inner"]["calibration"]
        medians.append(float(np.median(train["risk"])))
        h0.append(_breslow_h0(train["risk"].to_numpy(), train["time"].to_numpy(), train["event"].to_numpy(), 365.0))
        assert cal["train_risk_median"] == pytest.approx(medians[-1], abs=1e-9)
        assert cal["baseline_cum_hazard"]["365"] == pytest.approx(h0[-1], rel=1e-6)
    medians, h0 = np.array(medians), np.array(h0)

    np.testing.assert_allclose(pred["log_relative_hazard"], risks.mean(axis=1), atol=1e-4)
    np.testing.assert_allclose(pred["log_relative_hazard_sd_over_folds"], risks.std(axis=1, ddof=1), atol=1e-4)
    p_by_hand = (1.0 - np.exp(-h0 * np.exp(risks.to_numpy()))).mean(axis=1)
    np.testing.assert_allclose(pred["relapse_probability_1y_percent"], 100 * p_by_hand, atol=1e-2)
    pct = np.mean(
        [
            [100 * (np.sort(r["train"]["risk"]) < risks.loc[c, k]).mean() for k, r in enumerate(records)]
            for c in risks.index
        ],
        axis=1,
    )
    np.testing.assert_allclose(pred["percentile_among_training"], pct, atol=100 / len(records[0]["train"]) + 1e-6)
    # Majority of folds above their own training median (cases within float noise of a
    # median, e.g. the median case itself, could go either way and are left out).
    clear = (risks.sub(medians, axis=1).abs() > 1e-4).all(axis=1)
    high = (risks.gt(medians, axis=1).mean(axis=1) >= 0.5).map({True: "high", False: "low"})
    assert clear.sum() >= len(clear) // 2
    assert (pred.loc[clear, "risk_group"] == high[clear]).all()
    assert set(pred["risk_group"]) == {"high", "low"}


def test_a_cache_other_than_the_runs_is_refused(trained, tmp_path):
    from pipeline.preprocess import PreprocessParams, preprocess_cohort

    other = preprocess_cohort(
        trained["manifest"],
        tmp_path / "other",
        PreprocessParams(
            survival_size_xyz=(32, 32, 32),
            ctfm_size_xyz=(32, 32, 16),
            petfm_size_xyz=(32, 32, 32),
            ct_fm_window_hu=(-500.0, 1500.0),
        ),
        workers=1,
        progress=False,
    )
    result = CliRunner().invoke(
        predict_survival,
        [
            "--manifest",
            str(trained["out"] / "new.csv"),
            "--run",
            str(trained["run"]),
            "--train-cache",
            str(other.root),
            "--out",
            str(tmp_path / "pred.csv"),
            "--quiet",
        ],
    )
    assert result.exit_code == 1
    assert "preprocessing params_hash mismatch" in result.output
    assert not (tmp_path / "pred.csv").exists()


def test_precision_is_part_of_the_embedding_identity(trained):
    """A run embedded in bf16 refuses fp32 embeddings of new patients (and the reverse)."""
    from pipeline.artefacts import ProvenanceError, read_json
    from pipeline.predict import check_embeddings

    run = read_json(trained["run"] / "run.json")
    check_embeddings(run, trained["out"] / "ctpet.h5")  # same precision: accepted
    for attrs in run["embeddings"]["modalities"].values():
        assert attrs["precision"] == "fp32"
        attrs["precision"] = "bf16-autocast"
    with pytest.raises(ProvenanceError, match="precision"):
        check_embeddings(run, trained["out"] / "ctpet.h5")


def test_new_cases_are_embedded_at_the_runs_recorded_precision(trained, tmp_path):
    """Not at the device's default: a bf16 run embeds new patients in bf16 even on this CPU."""
    from pipeline.artefacts import read_json
    from pipeline.embeddings import read_embeddings
    from pipeline.extraction import open_cache
    from pipeline.predict import embed_new_cases

    run = read_json(trained["run"] / "run.json")
    for attrs in run["embeddings"]["modalities"].values():
        attrs["precision"] = "bf16-autocast"
    path = embed_new_cases(run, open_cache(trained["cache"]), tmp_path, device="cpu", progress=False)
    found = read_embeddings(path).dataset_attrs
    assert {a["precision"] for a in found.values()} == {"bf16-autocast"}
    fp32 = read_embeddings(trained["out"] / "ctpet.h5")
    bf16 = read_embeddings(path)
    assert not np.array_equal(bf16.matrix("ct"), fp32.matrix("ct"))


def test_mistyped_paths_are_refused_naming_what_exists_nearby(tmp_path):
    (tmp_path / "new_patients.csv").write_text("")
    (tmp_path / "cache" / "preprocessed").mkdir(parents=True)
    (tmp_path / "cache" / "preprocessed" / "cohort.json").write_text("{}")
    (tmp_path / "run").mkdir()
    base = {
        "--manifest": str(tmp_path / "new_patients.csv"),
        "--run": str(tmp_path / "run"),
        "--train-cache": str(tmp_path / "cache" / "preprocessed"),
        "--out": str(tmp_path / "p.csv"),
    }

    def run(option, value):
        args = [x for k, v in {**base, option: value}.items() for x in (k, v)]
        result = CliRunner().invoke(predict_survival, args)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
        return " ".join(result.output.split())

    out = run("--manifest", str(tmp_path / "new_patient.csv"))
    assert "new_patient.csv: no such manifest (path does not exist); *.csv in" in out and "new_patients.csv" in out
    out = run("--train-cache", str(tmp_path / "cache" / "preprocesed"))
    assert "no such preprocessed cache (path does not exist); folders holding cohort.json in" in out
    assert out.endswith("preprocessed")
    out = run("--embeddings", str(tmp_path / "ctpet.h5"))
    assert "ctpet.h5: no such embedding file (path does not exist); no *.h5 in" in out


def test_a_missing_run_folder_names_where_make_demo_leaves_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo_study" / "runs" / "ctpet-d256").mkdir(parents=True)
    (tmp_path / "runs" / "demo_study" / "runs" / "ctpet-d256" / "run.json").write_text("{}")
    (tmp_path / "m.csv").write_text("")
    (tmp_path / "cache" / "preprocessed").mkdir(parents=True)
    (tmp_path / "cache" / "preprocessed" / "cohort.json").write_text("{}")
    result = CliRunner().invoke(
        predict_survival,
        ["--manifest", "m.csv", "--run", "runs/ctpet-d256", "--train-cache", "cache/preprocessed", "--out", "p.csv"],
    )
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "runs/ctpet-d256: no such run folder" in out
    assert "`make demo` leaves its models in runs/demo_study/runs/<config> (here: ctpet-d256)" in out
    assert "--run runs/demo_study/runs/ctpet-d256" in out
