"""Classical peers and fast embedding heads (pipeline.peers, pipeline.cli.heads)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import cox, peers
from pipeline.artefacts import ProvenanceError
from pipeline.cache import GridGeometry, PreprocessedCache, write_case, write_cohort_record
from pipeline.cli.heads import fit_heads, import_features
from pipeline.embeddings import MissingCasesError, load_embeddings
from pipeline.feature_tables import import_feature_table
from pipeline.manifest import MANIFEST_COLUMNS, write_manifest
from pipeline.metrics import c_index
from pipeline.splits import make_folds, save_folds

SHAPE = (6, 10, 12)  # [D, H, W]
SPACING_XYZ = (1.5, 2.0, 3.0)  # mm; voxel = 9 mm^3 = 0.009 ml
VOXEL_ML = 0.009


def _manifest(n: int, seed: int) -> pd.DataFrame:
    """Manifest rows with clinical covariates; endpoints filled in by the caller."""
    rng = np.random.default_rng(seed)
    ids = [f"SYN-{i:03d}" for i in range(n)]
    df = pd.DataFrame({c: "" for c in MANIFEST_COLUMNS}, index=range(n))
    df["case_id"] = ids
    df["center_id"], df["center"] = 1, "CHUM"
    for c in ("ct_path", "pet_path", "label_path"):
        df[c] = [f"imagesTr/{i}.nii.gz" for i in ids]
    df["task1"] = df["task2"] = df["has_endpoint"] = df["has_gtvp"] = 1
    df["has_gtvn"] = 0
    df["gender"] = rng.choice(["M", "F"], size=n)
    df["age"] = rng.normal(60, 9, size=n).round(0)
    df["weight"] = rng.normal(80, 12, size=n).round(1)
    for c in ("tobacco", "alcohol", "hpv_status", "surgery", "chemotherapy"):
        df[c] = rng.integers(0, 2, size=n).astype(float)
    df.loc[rng.choice(n, n // 5, replace=False), "tobacco"] = np.nan  # missing, fold-median filled
    df["performance_status"] = rng.integers(0, 3, size=n).astype(float)
    return df


def _endpoints(df: pd.DataFrame, log_hazard: np.ndarray, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t_event = rng.exponential(700 * np.exp(-(log_hazard - log_hazard.mean())))
    t_cens = rng.uniform(300, 2500, size=len(df))
    df = df.copy()
    df["rfs_days"] = np.maximum(np.round(np.minimum(t_event, t_cens)), 1).astype(int)
    df["relapse"] = (t_event <= t_cens).astype(int)
    return df


def _folds(df: pd.DataFrame, n_splits: int = 5) -> pd.DataFrame:
    return make_folds(
        df["case_id"].tolist(), df["rfs_days"].to_numpy(), df["relapse"].to_numpy(), n_splits=n_splits, seed=0
    )


def _mean_fold_c(oof: pd.DataFrame) -> float:
    return float(np.mean([c_index(g.time, g.event, g.risk) for _, g in oof.groupby("fold")]))


def _write_cache(
    root, sizes: dict[str, tuple[int, int, int]], suv: dict[str, tuple[float, float]], params_hash: str = "p" * 16
):
    """Cache whose case c has a tumour box of sizes[c] voxels (d, h, w): the first half of
    its slices have SUV suv[c][0], the rest suv[c][1]; background SUV 0.5."""
    geom = GridGeometry((0.0, 0.0, 0.0), SPACING_XYZ, (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE[::-1])
    for cid, (d, h, w) in sizes.items():
        mask = np.zeros(SHAPE, np.uint8)
        mask[:d, :h, :w] = 1
        pet = np.full(SHAPE, 0.5, np.float32)
        lo, hi = suv[cid]
        pet[: (d + 1) // 2, :h, :w] = lo
        pet[(d + 1) // 2 : d, :h, :w] = hi
        write_case(
            root,
            cid,
            {"survival/mask": mask, "survival/pet": pet, "survival/ct": np.zeros(SHAPE, np.float32)},
            {"survival": geom},
            {"params_hash": params_hash, "source_sha256": {"ct": cid}},
        )
    write_cohort_record(
        root, {"params": {}, "params_hash": params_hash, "crop_size_vox_xyz": [12, 10, 6], "case_ids": sorted(sizes)}
    )
    return PreprocessedCache(root)


# ----------------------------------------------------------------------------- radiomics-lite


def test_radiomics_lite_features_equal_analytic_values(tmp_path):
    sizes = {"A": (2, 3, 4), "B": (4, 5, 6), "C": (0, 0, 0)}
    suv = {"A": (2.0, 6.0), "B": (3.0, 9.0), "C": (1.0, 1.0)}
    cache = _write_cache(tmp_path / "cache", sizes, suv)
    f = peers.radiomics_lite_features(cache, ["B", "A", "C"])
    assert f.index.tolist() == ["B", "A", "C"]
    for cid in ("A", "B"):
        d, h, w = sizes[cid]
        n = d * h * w
        lo_n = ((d + 1) // 2) * h * w
        mean = (lo_n * suv[cid][0] + (n - lo_n) * suv[cid][1]) / n
        assert f.loc[cid, "n_voxels"] == n
        assert f.loc[cid, "volume_ml"] == pytest.approx(n * VOXEL_ML)
        assert f.loc[cid, "suv_max"] == pytest.approx(suv[cid][1])
        assert f.loc[cid, "suv_mean"] == pytest.approx(mean)
        assert f.loc[cid, "tlg"] == pytest.approx(mean * n * VOXEL_ML)
    assert f.loc["C", "volume_ml"] == 0 and np.isnan(f.loc["C", "suv_max"]) and f.loc["C", "tlg"] == 0
    design = peers.radiomics_design(f)
    assert design.loc["A", "log_volume"] == pytest.approx(np.log1p(24 * VOXEL_ML))
    with pytest.raises(KeyError, match="lacks cases"):
        peers.radiomics_lite_features(cache, ["A", "Z"])


def test_radiomics_cox_beats_chance_when_hazard_depends_on_volume(tmp_path):
    rng = np.random.default_rng(3)
    n = 60
    df = _manifest(n, 1)
    sizes = {c: (int(rng.integers(1, 7)), int(rng.integers(1, 11)), int(rng.integers(1, 13))) for c in df.case_id}
    suv = {c: (2.0, float(rng.uniform(3, 10))) for c in df.case_id}
    cache = _write_cache(tmp_path / "cache", sizes, suv)
    vol = np.array([np.prod(sizes[c]) for c in df.case_id], dtype=float)
    df = _endpoints(df, 1.2 * np.log(vol), seed=4)
    folds = _folds(df)
    feats = peers.radiomics_lite_features(cache, df.case_id.tolist())
    res = peers.radiomics_cox(df, folds, feats)
    oof = res.oof
    assert list(oof.columns) == list(peers.OOF_COLUMNS)
    assert sorted(oof.case_id) == sorted(df.case_id) and (oof.protocol == "fit").all()
    assert _mean_fold_c(oof) > 0.7
    assert all(r["n_features"] == 4 for r in res.per_fold)


# ----------------------------------------------------------------------------- clinical Cox


def test_clinical_cox_learns_and_never_sees_its_validation_outcomes():
    df = _manifest(150, 2)
    lh = 0.08 * (df["age"] - 60) - 1.2 * df["hpv_status"]
    df = _endpoints(df, lh.to_numpy(), seed=5)
    folds = _folds(df)
    res = peers.clinical_cox(df, folds)
    assert _mean_fold_c(res.oof) > 0.65
    assert all(r["n_features"] == 13 for r in res.per_fold)
    assert all(r["ibs"] is not None and 0 < r["ibs"] < 0.25 for r in res.per_fold)
    # Fold 0's own outcomes must not reach the fold-0 model; other folds train on them.
    val0 = folds.loc[folds.fold == 0, "case_id"]
    sel = df.case_id.isin(val0)
    shaken = df.copy()
    shaken.loc[sel, "rfs_days"] = shaken.loc[sel, "rfs_days"][::-1].to_numpy()
    shaken.loc[sel, "relapse"] = 1 - shaken.loc[sel, "relapse"]
    a = res.oof.set_index("case_id")
    b = peers.clinical_cox(shaken, folds).oof.set_index("case_id")
    others = a.index[~a.index.isin(val0)]
    assert np.allclose(a.loc[val0, "risk"], b.loc[val0, "risk"])
    assert not np.allclose(a.loc[others, "risk"], b.loc[others, "risk"])
    # Nor their covariates: with every fold-0 age set to 200 the fold-0 risks move by
    # beta_age / sd_age * (200 - age), one constant for the fold (z-scoring and beta unchanged).
    aged = df.copy()
    aged.loc[sel, "age"] = 200.0
    c = peers.clinical_cox(aged, folds).oof.set_index("case_id")
    ratio = (c.loc[val0, "risk"] - a.loc[val0, "risk"]) / (200.0 - df.set_index("case_id").loc[val0, "age"])
    assert np.allclose(ratio, ratio.iloc[0]) and ratio.iloc[0] > 0


# ----------------------------------------------------------------------------- embedding heads


def _embeddings(df: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(df)
    ct = rng.normal(size=(n, 40))
    pet = rng.normal(size=(n, 30))
    # A low-rank shared factor carries the signal, as embeddings' leading components tend to.
    factor = rng.normal(size=n)
    ct[:, :10] += 2.0 * factor[:, None]
    pet[:, :5] += 1.5 * factor[:, None]
    frame = pd.DataFrame(
        np.hstack([ct, pet]),
        index=pd.Index(df.case_id, name="case_id"),
        columns=[f"ct_{j:03d}" for j in range(40)] + [f"pet_{j:03d}" for j in range(30)],
    )
    frame.attrs["feature_datasets"] = ["ct", "pet"]
    return frame, factor


@pytest.mark.parametrize("proj", [None, 8])
def test_embedding_head_recovers_planted_signal(proj):
    df = _manifest(150, 6)
    emb, factor = _embeddings(df, 7)
    df = _endpoints(df, 1.5 * factor, seed=8)
    folds = _folds(df)
    cfg = peers.HeadConfig(model="coxnet", proj=proj, with_clinical=True)
    res = peers.embedding_head(df, folds, emb, cfg)
    assert _mean_fold_c(res.oof) > 0.72
    for r in res.per_fold:
        assert r["n_features"] == (70 if proj is None else 16) + 13
        assert r["inner_c_index"] is not None and r["alpha"] > 0
        if proj is not None:
            assert r["ct_pca_components"] == 8 and r["pet_pca_components"] == 8
    # A head on shuffled embeddings finds nothing (the signal is in the features, not a leak).
    shuffled = emb.copy()
    shuffled.iloc[:, :] = emb.to_numpy()[np.random.default_rng(0).permutation(len(emb))]
    res0 = peers.embedding_head(df, folds, shuffled, peers.HeadConfig(model="coxnet", proj=proj, with_clinical=False))
    assert abs(_mean_fold_c(res0.oof) - 0.5) < 0.1


def test_heads_handle_repeated_folds_and_refuse_missing_cases():
    from pipeline.splits import repeated_folds

    df = _endpoints(_manifest(60, 9), np.zeros(60), seed=10)
    rep = repeated_folds(
        df.case_id.tolist(), df.rfs_days.to_numpy(), df.relapse.to_numpy(), n_splits=3, n_repeats=2, seed=0
    )
    res = peers.clinical_cox(df, rep)
    assert "repeat" in res.oof.columns and len(res.oof) == 120 and len(res.per_fold) == 6
    with pytest.raises(ValueError, match=r"survival data lacks 1 case\(s\) of the folds: \['SYN-000'\]"):
        peers.clinical_cox(df.iloc[1:], _folds(df))


# ----------------------------------------------------------------------------- feature import


def test_import_feature_table_round_trips_and_feeds_the_heads(tmp_path):
    df = _manifest(40, 11)
    sizes = {c: (2, 2, 2) for c in df.case_id}
    cache = _write_cache(tmp_path / "cache", sizes, {c: (1.0, 2.0) for c in df.case_id})
    rng = np.random.default_rng(12)
    table = pd.DataFrame(
        {
            "PatientID": df.case_id,
            "original_shape_Volume": rng.uniform(1, 50, 40),
            "firstorder_Mean": rng.normal(size=40),
            "diagnostics_Version": "v3.0",
        }
    )
    table.loc[3, "firstorder_Mean"] = np.nan
    csv = tmp_path / "radiomics.csv"
    table.to_csv(csv, index=False)
    res = import_feature_table(csv, tmp_path / "emb" / "radiomics.h5", name="radiomics", cache=cache)
    assert res["columns"] == ["original_shape_Volume", "firstorder_Mean"]
    assert res["dropped_columns"] == ["diagnostics_Version"] and res["not_in_cache"] == []
    back = load_embeddings(res["path"], cache=cache, case_ids=df.case_id.tolist()[::-1])
    assert back.index.tolist() == df.case_id.tolist()[::-1]
    expect = table.set_index("PatientID").loc[back.index, res["columns"]].to_numpy()
    np.testing.assert_allclose(back.to_numpy(), expect.astype(np.float32), equal_nan=True)
    assert json.loads(back.attrs["dataset_attrs"]["radiomics"]["columns"]) == res["columns"]
    assert back.attrs["feature_datasets"] == ["radiomics"]
    from pipeline.artefacts import sha256_file

    with h5py.File(res["path"]) as h5:
        ds = h5["radiomics"]
        assert ds.attrs["source_csv_sha256"] == sha256_file(csv)
        assert json.loads(ds.attrs["columns"]) == res["columns"]
        assert h5.attrs["params_hash"] == cache.params_hash and h5.attrs["code_version"]
        assert list(h5["fingerprints"].asstr()[()]) == [cache.case_fingerprint(c) for c in df.case_id]
    # Another preprocessing: refused with both hashes named.
    other = _write_cache(tmp_path / "other", sizes, {c: (1.0, 2.0) for c in df.case_id}, params_hash="q" * 16)
    with pytest.raises(ProvenanceError, match="q{16}"):
        load_embeddings(res["path"], cache=other)
    # The imported features go through the same head.
    df = _endpoints(df, np.log(table["original_shape_Volume"].to_numpy()) * 1.5, seed=13)
    out = peers.embedding_head(
        df, _folds(df, 4), back.loc[df.case_id], peers.HeadConfig(model="ridge", with_clinical=False)
    )
    assert _mean_fold_c(out.oof) > 0.6


def test_import_feature_table_rejects_bad_tables(tmp_path):
    csv = tmp_path / "t.csv"
    pd.DataFrame({"PatientID": ["A", "A"], "f": [1.0, 2.0]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"duplicate 'PatientID' values \['A'\]"):
        import_feature_table(csv, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="no id column 'ID'"):
        import_feature_table(csv, tmp_path / "x.h5", id_column="ID")
    pd.DataFrame({"PatientID": ["A", "B"], "f": [1.0, np.inf]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="infinite value in column 'f' for case 'B'"):
        import_feature_table(csv, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="reserved"):
        import_feature_table(csv, tmp_path / "x.h5", name="ct")
    assert not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_fit_heads_and_import_features(tmp_path):
    df = _manifest(50, 14)
    sizes = {c: (int(1 + i % 6), 4, 4) for i, c in enumerate(df.case_id)}
    cache = _write_cache(tmp_path / "cache", sizes, {c: (1.0, 3.0) for c in df.case_id})
    vol = np.array([np.prod(sizes[c]) for c in df.case_id], float)
    df = _endpoints(df, 1.5 * np.log(vol), seed=15)
    write_manifest(df, tmp_path / "manifest.csv")
    save_folds(_folds(df), tmp_path / "folds.json")
    runner = CliRunner()
    base = ["--manifest", str(tmp_path / "manifest.csv"), "--folds", str(tmp_path / "folds.json")]
    r = runner.invoke(
        fit_heads,
        base + ["--peer", "radiomics", "--cache", str(cache.root), "--out", str(tmp_path / "runs" / "radiomics")],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "runs" / "radiomics" / "summary.json").read_text())
    oof = pd.read_csv(tmp_path / "runs" / "radiomics" / "oof_predictions.csv")
    assert list(oof.columns) == list(peers.OOF_COLUMNS) and len(oof) == 50
    assert summary["c_index"]["n_total"] == 5 and summary["c_index"]["mean"] > 0.6
    assert len(summary["per_fold"]) == 5 and summary["inputs"]["cache_params_hash"] == cache.params_hash
    assert summary["params"]["with_clinical"] is False and summary["params_hash"]
    # Radiomics without a cache is refused with a clear message.
    r = runner.invoke(fit_heads, base + ["--peer", "radiomics", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs the preprocessed cache" in r.output
    # Import a CSV, then fit an embedding head on it.
    pd.DataFrame({"PatientID": df.case_id, "vol": vol, "noise": np.random.default_rng(0).normal(size=50)}).to_csv(
        tmp_path / "feat.csv", index=False
    )
    r = runner.invoke(
        import_features,
        [
            str(tmp_path / "feat.csv"),
            "--out",
            str(tmp_path / "emb" / "table.h5"),
            "--cache",
            str(cache.root),
            "--manifest",
            str(tmp_path / "manifest.csv"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "50 cases x 2 features" in r.output and "covers 50 of the 50 cases" in r.output
    r = runner.invoke(
        fit_heads,
        base
        + [
            "--embeddings",
            str(tmp_path / "emb" / "table.h5"),
            "--cache",
            str(cache.root),
            "--no-clinical",
            "--out",
            str(tmp_path / "runs" / "t"),
        ],
    )
    assert r.exit_code == 0, r.output
    s2 = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert s2["inputs"]["feature_modalities"] == ["table"] and s2["c_index"]["mean"] > 0.6


def test_ridge_penalty_chosen_by_inner_cv_beats_a_weak_fixed_one_on_noisy_features():
    """One informative feature among 30 noise features, 80 cases: a weak fixed ridge
    overfits; the inner-CV choice must pick stronger penalties and rank held-out cases better."""
    from pipeline.metrics import c_index
    from pipeline.peers import HeadConfig, run_head
    from pipeline.splits import make_folds

    rng = np.random.default_rng(0)
    n = 80
    x = rng.normal(size=(n, 31))
    t = rng.exponential(1.0 / np.exp(0.7 * x[:, 0])) * 1000 + 1
    e = (rng.uniform(size=n) < 0.6).astype(int)
    ids = [f"C-{i:03d}" for i in range(n)]
    feats = pd.DataFrame(x, index=pd.Index(ids, name="case_id"))
    surv = pd.DataFrame({"time": t, "event": e}, index=feats.index)
    folds = make_folds(ids, t, e, n_splits=5, seed=1)

    def mean_c(cfg):
        res = run_head(surv, folds, blocks={"f": feats}, config=cfg)
        return np.mean([c_index(p.time, p.event, p.risk) for _, p in res.oof.groupby("fold")]), res

    c_fixed, _ = mean_c(HeadConfig(model="ridge", ridge_alpha=0.01, with_clinical=False))
    c_cv, res = mean_c(HeadConfig(model="ridge", with_clinical=False))
    assert min(r["alpha"] for r in res.per_fold) >= 3.0
    assert c_cv > c_fixed


# ----------------------------------------------------------------------------- ridge Cox solver


@pytest.mark.parametrize("n, p", [(60, 8), (40, 90)])
def test_ridge_cox_path_equals_scikit_survival(n, p):
    """Same objective and stopping rule as CoxPHSurvivalAnalysis(alpha, ties="breslow"), with
    tied times, fewer and more features than cases, every penalty of the inner-CV path."""
    import warnings as _w

    from sksurv.linear_model import CoxPHSurvivalAnalysis

    rng = np.random.default_rng(p)
    x = rng.normal(size=(n, p))
    t = np.round(rng.exponential(np.exp(-0.8 * x[:, 0])) * 20) + 1  # many ties
    e = rng.uniform(size=n) < 0.7
    path = cox.ridge_cox_path(x, t, e, cox.RIDGE_ALPHAS)
    assert len(np.unique(t)) < n
    for model in path:
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            ref = CoxPHSurvivalAnalysis(alpha=model.alpha, ties="breslow").fit(x, cox.surv_target(t, e))
        assert model.converged
        np.testing.assert_allclose(model.coef_, ref.coef_, rtol=1e-5, atol=1e-7 * np.abs(ref.coef_).max())
        np.testing.assert_allclose(model.predict(x), ref.predict(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- missing values


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_missing_features_are_filled_with_the_training_mean_as_the_cnn_does():
    from pipeline.train import fit_fm_stats

    rng = np.random.default_rng(0)
    ids = [f"C{i}" for i in range(30)]
    x = rng.lognormal(size=(30, 3))  # skewed: the mean differs from the median
    x[3, 0] = x[25, 1] = np.nan
    x[:, 2] = np.nan  # a column missing everywhere
    block = pd.DataFrame(x, index=ids)
    train, test = ids[:20], ids[20:]
    feats = peers._FoldFeatures({"f": block}, None, {"f": None}).fit(train)
    fill, mean, sd, _ = feats.fitted["f"]
    np.testing.assert_allclose(fill, fit_fm_stats(x[:20], standardise=True)["fill"])
    assert fill[0] == pytest.approx(np.nanmean(x[:20, 0])) and fill[2] == 0.0
    assert abs(np.nanmean(x[:20, 0]) - np.nanmedian(x[:20, 0])) > 0.1
    z = feats.transform(test)
    assert z[25 - 20, 1] == pytest.approx(0.0, abs=1e-12)  # a missing value z-scores to 0: no signal
    np.testing.assert_array_equal(feats.transform(train)[:, 2], 0.0)


# ----------------------------------------------------------------------------- feature import: cache, writer, coverage


def _table(ids, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"Patient_ID": ids, "vol": rng.uniform(1, 50, len(ids)), "mean": rng.normal(size=len(ids))})


def test_import_without_a_cache_is_recorded_and_skips_cache_checks(tmp_path, monkeypatch):
    ids = [f"SYN-{i:03d}" for i in range(12)]
    _table(ids).to_csv(tmp_path / "radiomics.csv", index=False)
    res = import_feature_table(tmp_path / "radiomics.csv", tmp_path / "x.h5", id_column="Patient_ID")
    assert res["cache_bound"] is False
    with h5py.File(tmp_path / "x.h5") as h5:
        assert not h5.attrs["cache_bound"] and h5.attrs["params_hash"] == "" and h5.attrs["cache_path"] == ""
        assert set(h5["fingerprints"].asstr()[()]) == {""}
    # A cache passed to the loader does not apply to an unbound file.
    cache = _write_cache(tmp_path / "cache", {c: (1, 1, 1) for c in ids}, {c: (1.0, 1.0) for c in ids})
    back = load_embeddings(tmp_path / "x.h5", cache=cache, case_ids=ids[::-1])
    assert back.index.tolist() == ids[::-1] and back.shape == (12, 2)

    # The CLI: no cache at the default path -> imported without one, and said so.
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(import_features, ["radiomics.csv", "--out", "x2.h5", "--id-column", "Patient_ID"])
    assert r.exit_code == 0, r.output
    assert "no preprocessed cache at cache/preprocessed: importing without one" in r.output
    assert "12 cases x 2 features" in r.output and "coverage is not checked" in r.output
    with h5py.File(tmp_path / "x2.h5") as h5:
        assert not h5.attrs["cache_bound"]
    r = runner.invoke(
        import_features, ["radiomics.csv", "--out", "x3.h5", "--id-column", "Patient_ID", "--cache", "elsewhere"]
    )
    assert r.exit_code == 1 and r.output.startswith(
        "error: elsewhere: no such preprocessed cache (path does not exist)"
    )
    assert "--no-cache" in r.output and not (tmp_path / "x3.h5").exists()
    r = runner.invoke(
        import_features,
        ["radiomics.csv", "--out", "x4.h5", "--id-column", "Patient_ID", "--cache", str(cache.root), "--no-cache"],
    )
    assert r.exit_code == 0 and "--no-cache" in r.output


def test_import_writes_through_the_embeddings_writer(tmp_path, monkeypatch):
    from pipeline import embeddings as emb

    _table(["A", "B"]).to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.setattr(emb, "SCHEMA_VERSION", 99)
    import_feature_table(tmp_path / "t.csv", tmp_path / "t.h5", id_column="Patient_ID", name="t")
    with h5py.File(tmp_path / "t.h5") as h5:
        assert h5.attrs["schema_version"] == 99 and h5.attrs["source"] == "feature_table"
    assert load_embeddings(tmp_path / "t.h5").shape == (2, 2)  # the reader follows the same version


def test_import_refuses_a_table_missing_manifest_cases_and_fit_heads_advises_import(tmp_path):
    df = _manifest(20, 21)
    df = _endpoints(df, np.zeros(20), seed=22)
    write_manifest(df, tmp_path / "manifest.csv")
    save_folds(_folds(df, 4), tmp_path / "folds.json")
    _table(df.case_id[:5].tolist() + ["OTHER-1"]).to_csv(tmp_path / "part.csv", index=False)
    with pytest.raises(MissingCasesError) as err:
        import_feature_table(
            tmp_path / "part.csv", tmp_path / "p.h5", id_column="Patient_ID", expected_case_ids=df.case_id.tolist()
        )
    assert err.value.missing == df.case_id[5:].tolist()
    assert "covers 5 of the 20 cases" in str(err.value) and "--allow-missing" in str(err.value)

    runner = CliRunner()
    args = [
        str(tmp_path / "part.csv"),
        "--out",
        str(tmp_path / "p.h5"),
        "--id-column",
        "Patient_ID",
        "--manifest",
        str(tmp_path / "manifest.csv"),
        "--no-cache",
    ]
    r = runner.invoke(import_features, args)
    assert r.exit_code == 1 and "error: " in r.output and df.case_id[19] in r.output
    assert not (tmp_path / "p.h5").exists()
    r = runner.invoke(import_features, args + ["--allow-missing"])
    assert r.exit_code == 0, r.output
    assert "covers 5 of the 20 cases" in r.output and "WARNING: 15 case(s)" in r.output
    assert df.case_id[19] in r.output and "1 row(s) are not cases" in r.output
    r = runner.invoke(
        fit_heads,
        [
            "--manifest",
            str(tmp_path / "manifest.csv"),
            "--folds",
            str(tmp_path / "folds.json"),
            "--embeddings",
            str(tmp_path / "p.h5"),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 1 and r.output.startswith("error: ")
    assert "import-features" in r.output and "extract-embeddings" not in r.output


def test_fit_heads_defaults_to_the_shared_folds_json_and_refuses_a_projection_above_the_input(tmp_path, monkeypatch):
    from pipeline.cli.train import train_survival

    df = _endpoints(_manifest(30, 23), np.zeros(30), seed=24)
    monkeypatch.chdir(tmp_path)
    write_manifest(df, "data_manifest.csv")
    _table(df.case_id.tolist()).to_csv("t.csv", index=False)
    runner = CliRunner()
    assert runner.invoke(import_features, ["t.csv", "--out", "t.h5", "--id-column", "Patient_ID"]).exit_code == 0
    # Both commands default to one folds file.
    heads_default, train_default = (
        {p.name: p.default for p in c.params}["folds_path"] for c in (fit_heads, train_survival)
    )
    assert heads_default == train_default == "runs/folds.json"
    assert "--folds runs/folds.json" in fit_heads.epilog
    r = runner.invoke(fit_heads, ["--embeddings", "t.h5", "--out", "run"])
    assert r.exit_code == 1 and "error: no folds file runs/folds.json" in r.output
    assert "train-survival" in r.output and "run-study" in r.output
    save_folds(_folds(df, 3), Path("runs/folds.json"))
    r = runner.invoke(fit_heads, ["--embeddings", "t.h5", "--proj", "256", "--out", "run"])
    assert r.exit_code == 2 and "--proj" in r.output and "larger than the input" in r.output
    assert "'t' has 2 feature(s)" in r.output and not Path("run").exists()
    r = runner.invoke(fit_heads, ["--embeddings", "t.h5", "--no-clinical", "--out", "run"])
    assert r.exit_code == 0, r.output
    with pytest.warns(UserWarning, match="proj 64 exceeds the 2 features of 't'"):
        peers.embedding_head(
            df, _folds(df, 3), load_embeddings("t.h5"), peers.HeadConfig(model="ridge", proj=64, with_clinical=False)
        )


def test_fit_heads_on_random_init_embeddings_warns_once(tmp_path):
    """As a user runs it (a fresh process, Python's default warning display): one warning line."""
    import subprocess
    import sys

    from pipeline.embeddings import RANDOM_INIT, write_embedding_file

    df = _manifest(40, 21)
    emb, factor = _embeddings(df, 22)
    df = _endpoints(df, factor, seed=23)
    write_manifest(df, tmp_path / "manifest.csv")
    save_folds(_folds(df), tmp_path / "folds.json")
    ct = emb.filter(like="ct_").to_numpy()
    attrs = {"encoder": "ct_fm_segresencoder", "weights_sha256": RANDOM_INIT, "random_init_seed": 0}
    write_embedding_file(
        tmp_path / "ct.h5",
        name="ct",
        case_ids=df.case_id.tolist(),
        datasets={"ct": (ct, attrs, {"encoder": "ct_fm_segresencoder", "seed": 0})},
        cache=None,
        random_init=True,
    )
    code = "from pipeline.cli.heads import fit_heads; fit_heads()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--manifest",
            "manifest.csv",
            "--folds",
            "folds.json",
            "--embeddings",
            "ct.h5",
            "--proj",
            "orig",
            "--out",
            "run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = (proc.stdout + proc.stderr).lower().count("randomly initialised encoders")
    assert said == 1, proc.stdout + proc.stderr
    assert "WARNING" in proc.stderr and "embeddings: C-index" in proc.stdout
