from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.clinical import ClinicalTransform, fit_fold_transform
from pipeline.manifest import CLINICAL_COLUMNS, MANIFEST_COLUMNS, read_manifest, write_manifest

FEATURES = [
    "age",
    "gender_male",
    "weight",
    "tobacco",
    "alcohol",
    "performance_status_0",
    "performance_status_1",
    "performance_status_2",
    "performance_status_3",
    "performance_status_4",
    "hpv_status",
    "chemotherapy",
    "surgery",
]


def _clinical_table(n=40, seed=0):
    """Clinical table with HECKTOR-like missingness (tobacco/alcohol/PS/HPV often missing)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "case_id": [f"CHUM-{i:03d}" for i in range(n)],
            "age": rng.normal(60, 9, n).round(),
            "gender": rng.choice(["M", "F"], n, p=[0.8, 0.2]).astype(object),
            "weight": rng.normal(78, 14, n).round(1),
            "tobacco": rng.integers(0, 2, n).astype(float),
            "alcohol": rng.integers(0, 2, n).astype(float),
            "performance_status": rng.integers(0, 3, n).astype(float),
            "hpv_status": rng.integers(0, 2, n).astype(float),
            "chemotherapy": rng.integers(0, 2, n).astype(float),
            "surgery": rng.integers(0, 2, n).astype(float),
        }
    )
    for col, frac in [
        ("weight", 0.05),
        ("tobacco", 0.5),
        ("alcohol", 0.6),
        ("performance_status", 0.5),
        ("hpv_status", 0.35),
        ("surgery", 0.4),
    ]:
        df.loc[rng.random(n) < frac, col] = np.nan
    return df.set_index("case_id", drop=False)


def test_layout_and_hand_values():
    df = pd.DataFrame(
        {
            "case_id": ["A", "B", "C", "D"],
            "age": [50, 60, np.nan, 70],
            "gender": ["M", "F", "M", np.nan],
            "weight": [70, 80, 90, "NaN"],
            "tobacco": [1, 0, np.nan, 1],
            "alcohol": [np.nan, np.nan, 1, 0],
            "performance_status": [0, 1, np.nan, 2],
            "hpv_status": [1, 1, 0, np.nan],
            "chemotherapy": [1, 1, 0, 0],
            "surgery": [0, np.nan, 1, 1],
        }
    )
    ct = ClinicalTransform().fit(df)
    assert ct.feature_names == FEATURES and ct.n_features == 13
    x = ct.transform(df)
    assert x.dtype == np.float32 and x.shape == (4, 13)
    sd = np.std([50, 60, 70])
    # age: mean 60, population SD of the observed values; missing C filled with median 60.
    np.testing.assert_allclose(x[:, 0], np.float32([-10 / sd, 0, 0, 10 / sd]), rtol=1e-6)
    np.testing.assert_array_equal(x[:, 1], [1, 0, 1, 1])  # gender: D filled with mode M
    np.testing.assert_allclose(x[3, 2], 0.0)  # weight "NaN" -> median 80 -> z 0
    np.testing.assert_array_equal(x[:, 3], [1, 0, 1, 1])  # tobacco mode 1
    np.testing.assert_array_equal(x[:, 4], [0, 0, 1, 0])  # alcohol 50/50 tie -> 0
    np.testing.assert_array_equal(
        x[:, 5:10], [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]
    )  # PS median 1
    np.testing.assert_array_equal(x[:, 10:], [[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 1]])
    assert (x[:, 5:10].sum(axis=1) == 1).all()


def test_fill_values_are_training_fold_medians():
    df = _clinical_table()
    train = df.iloc[:25]
    ct = ClinicalTransform().fit(train)
    p = ct.to_dict()["params"]
    assert p["age"]["fill"] == np.median(train["age"].dropna())
    assert p["weight"]["fill"] == np.median(train["weight"].dropna())
    assert p["age"]["mean"] == pytest.approx(train["age"].mean())
    assert p["weight"]["sd"] == pytest.approx(train["weight"].dropna().std(ddof=0))
    ps = np.sort(train["performance_status"].dropna().to_numpy())
    assert p["performance_status"]["fill"] == ps[(len(ps) - 1) // 2]
    # A case with everything missing gets exactly the training fill values.
    blank = df.iloc[[30]].copy()
    blank.loc[:, list(CLINICAL_COLUMNS)] = np.nan
    x = ct.transform(blank)[0]
    assert x[0] == pytest.approx((p["age"]["fill"] - p["age"]["mean"]) / p["age"]["sd"], rel=1e-6)
    assert x[1] == p["gender"]["fill"] and x[5 + int(p["performance_status"]["fill"])] == 1


def test_validation_rows_cannot_influence_the_fit():
    df = _clinical_table(n=60)
    train_ids = df["case_id"].iloc[::2].tolist()
    val_ids = df["case_id"].iloc[1::2].tolist()
    ref = fit_fold_transform(df, train_ids)
    x_ref = ref.transform(df.loc[train_ids])

    poisoned = df.copy()
    poisoned.loc[val_ids, "age"] = 1000.0  # validation-only extreme value
    poisoned.loc[val_ids, "weight"] = np.nan  # and missing everywhere else
    poisoned.loc[val_ids, "gender"] = "F"
    poisoned.loc[val_ids, "performance_status"] = 4.0
    poisoned.loc[val_ids, ["tobacco", "alcohol", "hpv_status", "surgery"]] = 1.0
    other = fit_fold_transform(poisoned, train_ids)

    assert json.dumps(other.to_dict(), sort_keys=True) == json.dumps(ref.to_dict(), sort_keys=True)
    x_other = other.transform(poisoned.loc[train_ids])
    assert x_other.tobytes() == x_ref.tobytes()  # bit-identical training outputs
    assert other.to_dict()["params"]["age"]["mean"] == pytest.approx(df.loc[train_ids, "age"].mean())
    assert other.to_dict()["params"]["age"]["mean"] < 100
    # Fitting on the whole cohort instead would have moved the mean: the check can fail.
    assert ClinicalTransform().fit(poisoned).to_dict()["params"]["age"]["mean"] > 100


def test_unseen_and_invalid_categories():
    df = _clinical_table()
    ct = ClinicalTransform().fit(df.iloc[:30])
    fill = ct.to_dict()["params"]
    new = df.iloc[30:33].copy()
    new.loc[new.index[0], "performance_status"] = 5.0
    new.loc[new.index[1], "gender"] = "X"
    new.loc[new.index[2], "tobacco"] = 2.0
    with pytest.warns(UserWarning) as caught:
        x = ct.transform(new)
    msgs = " | ".join(str(w.message) for w in caught)
    assert "performance_status has values outside 0/1/2/3/4: CHUM-030=5.0" in msgs
    assert "gender has values outside M/F: CHUM-031='X'" in msgs
    assert "tobacco has values outside 0/1: CHUM-032=2.0" in msgs
    assert x.shape == (3, 13) and np.isfinite(x).all()
    assert x[0, 5 + int(fill["performance_status"]["fill"])] == 1 and x[0, 5:10].sum() == 1
    assert x[1, 1] == fill["gender"]["fill"] and x[2, 3] == fill["tobacco"]["fill"]
    # A valid category absent from the training fold still gets its own column.
    assert not (df.iloc[:30]["performance_status"] == 4).any()
    four = df.iloc[[31]].assign(performance_status=4.0)
    np.testing.assert_array_equal(ct.transform(four)[0, 5:10], [0, 0, 0, 0, 1])
    # Lower-case and padded gender codes are accepted.
    assert ct.transform(df.iloc[[31]].assign(gender=" f "))[0, 1] == 0
    # In the training data the same values are errors naming the case.
    bad = df.iloc[:30].copy()
    bad.loc["CHUM-004", "performance_status"] = 7.0
    with pytest.raises(ValueError, match="CHUM-004=7.0"):
        ClinicalTransform().fit(bad)


def test_errors_name_case_and_column():
    df = _clinical_table()
    bad = df.copy()
    bad["age"] = bad["age"].astype(object)
    bad.loc["CHUM-007", "age"] = "sixty"
    with pytest.raises(ValueError, match="age of case CHUM-007 is not a number: 'sixty'"):
        ClinicalTransform().fit(bad)
    empty = df.assign(surgery=np.nan)
    with pytest.raises(ValueError, match="surgery is missing for all 40 training cases"):
        ClinicalTransform().fit(empty)
    with pytest.raises(ValueError, match="missing clinical column 'hpv_status'"):
        ClinicalTransform().fit(df.drop(columns="hpv_status"))
    with pytest.raises(ValueError, match="call fit"):
        ClinicalTransform().transform(df)
    with pytest.raises(ValueError, match="unknown clinical columns \\['bmi'\\]"):
        ClinicalTransform(["age", "bmi"])
    with pytest.raises(ValueError, match="not in the frame: \\['NOPE-1'\\]"):
        fit_fold_transform(df, ["CHUM-001", "NOPE-1"])


def test_to_dict_from_dict_roundtrip_is_exact():
    df = _clinical_table()
    ct = ClinicalTransform().fit(df.iloc[:20])
    rec = json.loads(json.dumps(ct.to_dict()))
    back = ClinicalTransform.from_dict(rec)
    assert back.feature_names == ct.feature_names
    assert back.transform(df).tobytes() == ct.transform(df).tobytes()
    with pytest.raises(ValueError, match="expected kind 'clinical_transform'"):
        ClinicalTransform.from_dict({**rec, "kind": "other"})
    broken = json.loads(json.dumps(rec))
    del broken["params"]["age"]["sd"]
    with pytest.raises(ValueError, match="parameters of age"):
        ClinicalTransform.from_dict(broken)


def test_column_subset_and_constant_column():
    df = _clinical_table().assign(age=65.0)
    ct = ClinicalTransform(["age", "performance_status"]).fit(df)
    assert ct.feature_names == ["age"] + [f"performance_status_{v}" for v in range(5)]
    x = ct.transform(df)
    assert x.shape == (40, 6) and (x[:, 0] == 0).all()  # SD 0 -> scale 1, no division by zero


def test_works_on_a_manifest_read_from_disk(tmp_path):
    df = _clinical_table(n=6).reset_index(drop=True)
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = 0
    df["center"] = "CHUM"
    for col in ("ct_path", "pet_path", "label_path"):
        df[col] = "x.nii.gz"
    write_manifest(df, tmp_path / "m.csv")
    man = read_manifest(tmp_path / "m.csv", resolve_paths=False)
    ct = ClinicalTransform().fit(man)
    np.testing.assert_array_equal(ct.transform(man), ClinicalTransform().fit(df).transform(df))
