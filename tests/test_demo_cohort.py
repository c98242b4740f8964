"""Synthetic demo cohort: HECKTOR format, geometry, determinism, survival truth, manifest check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

import pipeline.demo_cohort as dc
from pipeline.artefacts import read_json, sha256_file
from pipeline.cli.data import make_demo_cohort as make_demo_cohort_cli
from pipeline.demo_cohort import (
    DemoCohortMismatchError,
    design_cohort,
    ensure_demo_cohort,
    generate_demo_cohort,
    oracle_c_index,
    read_truth,
)
from pipeline.hecktor import CLINICAL_CSV, ENDPOINT_CSV, build_manifest
from pipeline.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent
HEADER = (
    b"PatientID,Task 1,Task 2,CenterID,Gender,Age,Weight,Tobacco,Alcohol,"
    b'Performance status,"HPV status (0=-, 1=+)",Surgery,Chemotherapy\r\n'
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """8 cases at the default (realistic) grids: one per centre, plus one."""
    return generate_demo_cohort(tmp_path_factory.mktemp("demo") / "cohort", n_cases=8, seed=0)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    a = generate_demo_cohort(tmp_path / "a", n_cases=3, seed=5, workers=1, spacing_scale=2.5)
    b = generate_demo_cohort(tmp_path / "b", n_cases=3, seed=5, workers=2, spacing_scale=2.5)
    c = generate_demo_cohort(tmp_path / "c", n_cases=3, seed=6, workers=1, spacing_scale=2.5)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 3 * 3 + 5 and fa == fb  # independent of the number of workers
    images = [k for k in fa if k.endswith(".nii.gz")]
    assert all(fa[k] != fc[k] for k in images if k in fc)
    for k in images:  # gzip header: no modification time recorded
        assert (a / k).read_bytes()[4:8] == b"\0\0\0\0"
    # Not empty: a generator failure would otherwise pass as "equal".
    assert not list(tmp_path.glob(".*partial*"))


def test_refuses_to_overwrite_without_flag(tmp_path: Path):
    root = generate_demo_cohort(tmp_path / "x", n_cases=2, seed=1, workers=1, spacing_scale=3)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_demo_cohort(root, n_cases=2, seed=1, workers=1, spacing_scale=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo cohort"):
        generate_demo_cohort(tmp_path / "other", n_cases=2, seed=1, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    generate_demo_cohort(root, n_cases=2, seed=2, workers=1, spacing_scale=3, overwrite=True)
    assert read_json(root / "demo_cohort.json")["seed"] == 2


def test_csvs_are_byte_exact_hecktor_format(cohort: Path):
    clin = (cohort / CLINICAL_CSV).read_bytes()
    assert clin.startswith(HEADER)
    assert clin.endswith(b"\r\n") and clin.count(b"\n") == clin.count(b"\r\n") == 9
    ep = (cohort / ENDPOINT_CSV).read_bytes()
    assert ep.startswith(b"PatientID,Relapse,RFS\r\n") and ep.count(b"\n") == ep.count(b"\r\n")
    table = pd.read_csv(cohort / CLINICAL_CSV, keep_default_na=False, dtype=str)
    ids = table["PatientID"].tolist()
    assert ids == sorted(ids) and all(len(i.split("-")[1]) == 3 for i in ids)
    assert set(table["CenterID"]) == {str(k) for k in range(1, 8)}  # each centre once, n >= 7
    assert "CHUM-001" in ids and "HMR-001" in ids
    assert set(table["Gender"]) <= {"M", "F"} and (table["Task 1"] == "1").all()
    # Missing cells are the text NaN, in the real file's proportions (rounded).
    expected = {col: round(k * 8 / 524) for col, k in dc.MISSING_COUNTS.items()}
    assert {col: int((table[col] == "NaN").sum()) for col in expected} == expected
    assert (table[["Age", "Gender", "Chemotherapy", "CenterID"]] != "NaN").all().all()
    # Task-1-only cases have no endpoint row; all others do.
    endpoint = pd.read_csv(cohort / ENDPOINT_CSV, dtype={"PatientID": str})
    assert set(endpoint["PatientID"]) == set(table.loc[table["Task 2"] == "1", "PatientID"])
    assert (table["Task 2"] == "0").sum() == 1
    assert set(endpoint["Relapse"]) <= {0, 1} and (endpoint["RFS"] >= 1).all()


def test_images_types_grids_and_anatomy(cohort: Path):
    flipped = 0
    for ct_path in sorted((cohort / "imagesTr").glob("*__CT.nii.gz")):
        cid = ct_path.name.split("__")[0]
        ct = sitk.ReadImage(str(ct_path))
        pet = sitk.ReadImage(str(cohort / "imagesTr" / f"{cid}__PT.nii.gz"))
        lab = sitk.ReadImage(str(cohort / "labelsTr" / f"{cid}.nii.gz"))
        assert ct.GetPixelID() == sitk.sitkInt16 and pet.GetPixelID() == sitk.sitkFloat32
        assert lab.GetPixelID() == sitk.sitkUInt8
        # Label on the CT grid; PET on its own grid.
        assert lab.GetSize() == ct.GetSize() and lab.GetOrigin() == ct.GetOrigin()
        assert lab.GetDirection() == ct.GetDirection()
        assert pet.GetSize() != ct.GetSize()
        ct_sp, pet_sp = np.array(ct.GetSpacing()), np.array(pet.GetSpacing())
        assert 0.9 < ct_sp[0] < 1.2 and 1.4 <= ct_sp[2] <= 3.35
        assert np.all((pet_sp >= 2.7) & (pet_sp <= 5.5))
        flipped += ct.GetDirection()[0] < 0
        # Fields of view: ~170-190 mm in-plane, 110-140 mm cranio-caudal.
        fov = ct_sp * np.array(ct.GetSize())
        assert np.all((fov[:2] > 160) & (fov[:2] < 200)) and 100 < fov[2] < 150
        # Physical origin offset of a few mm between the first voxel centres.
        first_ct = np.array(ct.TransformIndexToPhysicalPoint((0, 0, 0)))
        if ct.GetDirection()[0] < 0:
            first_ct[0] = ct.TransformIndexToPhysicalPoint((ct.GetSize()[0] - 1, 0, 0))[0]
        shift = np.array(pet.GetOrigin()) - first_ct
        assert np.any(np.abs(shift) > 0.5) and np.all(np.abs(shift) < 30)
        hu = sitk.GetArrayViewFromImage(ct)  # [D, H, W]
        assert hu.min() < -900 and hu.max() > 700  # air and bone
        assert 20 < np.median(hu[hu > -200]) < 80  # soft tissue
        values = set(np.unique(sitk.GetArrayViewFromImage(lab)).tolist())
        assert values <= {0, 1, 2} and values - {0}
    assert flipped == 1  # HMR stores CT and label with a flipped x axis


def test_pet_hot_spot_sits_on_the_tumour_in_physical_space(cohort: Path):
    """PET sampled at each lesion's centroid (mask on the CT grid, mapped through scanner mm)."""
    truth = read_truth(cohort)
    for cid in truth.index:
        lab = sitk.ReadImage(str(cohort / "labelsTr" / f"{cid}.nii.gz"))
        pet = sitk.ReadImage(str(cohort / "imagesTr" / f"{cid}__PT.nii.gz"))
        body = sitk.GetArrayViewFromImage(pet)
        background = float(np.median(body[body > 0.5]))
        assert 0.6 < background < 1.4
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(lab)
        row = truth.loc[cid]
        n_lesions = 0
        for value in stats.GetLabels():
            # One centroid per lesion: connected components of each label.
            per_lesion = sitk.LabelShapeStatisticsImageFilter()
            per_lesion.Execute(sitk.ConnectedComponent(lab == value))
            n_lesions += per_lesion.GetNumberOfLabels()
            for k in per_lesion.GetLabels():
                centroid = per_lesion.GetCentroid(k)  # physical mm (x, y, z)
                suv = pet.GetPixel(pet.TransformPhysicalPointToIndex(centroid))
                assert suv > 2.0 * background, (cid, value, per_lesion.GetPhysicalSize(k), suv)
        assert 1 <= n_lesions <= row.has_gtvp + row.n_nodes  # touching nodes may merge
        # Written masks match the design volumes (lobulation changes them by a few %).
        assert row.mask_gtvp_ml == pytest.approx(row.gtvp_volume_ml, rel=0.25, abs=0.3)
        assert row.mask_gtvn_ml == pytest.approx(row.gtvn_volume_ml, rel=0.25, abs=0.3)
        assert bool(row.has_gtvp) == (1 in stats.GetLabels())


def test_reader_accepts_cohort_and_truth_matches(cohort: Path, tmp_path: Path):
    m = build_manifest(cohort, tmp_path / "m.csv", progress=False).set_index("case_id")
    truth = read_truth(cohort)
    assert list(m.index) == list(truth.index)
    assert (m["has_gtvp"] == truth["has_gtvp"]).all()
    ep = m[m.has_endpoint == 1]
    assert (ep["rfs_days"] == truth.loc[ep.index, "rfs_days"]).all()
    assert (ep["relapse"] == truth.loc[ep.index, "relapse"]).all()
    # The true covariates agree with the CSV wherever the CSV has them.
    hpv = m["hpv_status"].dropna()
    assert (hpv == truth.loc[hpv.index, "hpv_true"]).all()
    assert (m["age"] == truth["age_true"]).all()
    assert read_json(tmp_path / "m.json")["demo_cohort"] == {
        "generator_version": dc.GENERATOR_VERSION,
        "n_cases": 8,
        "seed": 0,
        "spacing_scale": 1.0,
        "environment": {"numpy": np.__version__, "SimpleITK": sitk.Version_VersionString()},
    }
    # Truth: event iff the event time comes first; observed time is the earlier one.
    t = truth
    assert ((t.event_time <= t.censor_time) == (t.relapse == 1)).all()
    assert np.allclose(t.rfs_days, np.maximum(1, np.round(np.minimum(t.event_time, t.censor_time))))


def test_survival_model_rates_and_oracle_c_index():
    """Statistical properties of the design (no images rendered): the default cohort, and a
    larger one where sampling noise is small."""
    from sksurv.metrics import concordance_index_censored

    for n, seed, events, c_range in ((100, 42, (0.25, 0.40), (0.75, 0.85)), (400, 11, (0.28, 0.45), (0.76, 0.86))):
        _, clinical, truth = design_cohort(n, seed)
        ep = truth[truth.has_endpoint == 1]
        assert len(ep) == n - round(36 * n / 524)
        assert events[0] <= ep.relapse.mean() <= events[1]
        assert 45 <= ep.rfs_days.min() and ep.rfs_days.max() <= 2500
        c = concordance_index_censored(
            ep.relapse.astype(bool).to_numpy(), ep.rfs_days.to_numpy(float), ep.linear_predictor.to_numpy()
        )[0]
        assert c_range[0] <= c <= c_range[1]
        assert 0.7 < (clinical.Gender == "M").mean() < 0.9 and 57 < clinical.Age.mean() < 63
        vol = truth.tumour_volume_ml
        assert vol.min() > 0.3 and vol.max() < 300 and 0.03 < (truth.has_gtvp == 0).mean() < 0.2
        assert 3 <= truth.suv_max.min() and truth.suv_max.max() <= 25
        # The risk factors act in the documented direction.
        assert np.corrcoef(np.log(vol), truth.linear_predictor)[0, 1] > 0.3
        assert np.corrcoef(np.log(truth.suv_max), truth.linear_predictor)[0, 1] > 0.1
        assert (
            truth.linear_predictor[truth.hpv_true == 0].mean()
            > truth.linear_predictor[truth.hpv_true == 1].mean() + 0.5
        )


def test_oracle_c_index_reads_the_truth(cohort: Path):
    from sksurv.metrics import concordance_index_censored

    truth = read_truth(cohort)
    ep = truth[truth.has_endpoint == 1]
    expected = concordance_index_censored(
        ep.relapse.astype(bool).to_numpy(), ep.rfs_days.to_numpy(float), ep.linear_predictor.to_numpy()
    )[0]
    assert oracle_c_index(cohort) == pytest.approx(expected)
    assert oracle_c_index(cohort) != pytest.approx(
        concordance_index_censored(
            ep.relapse.astype(bool).to_numpy(), ep.rfs_days.to_numpy(float), -ep.linear_predictor.to_numpy()
        )[0]
    )


@pytest.fixture
def committed_like(tmp_path: Path, monkeypatch) -> Path:
    """A project-like folder: data_manifest.csv + data/demo_cohort (coarse grids, 3 cases),
    made by the CLI with its default paths."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        make_demo_cohort_cli, ["--n-cases", "3", "--seed", "3", "--spacing-scale", "3", "--workers", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "3 cases" in res.output and "data_manifest.csv" in res.output
    assert "oracle C-index" in res.output
    return tmp_path


def test_ensure_regenerates_missing_files_identically(committed_like: Path, capsys):
    manifest = committed_like / "data_manifest.csv"
    raw = pd.read_csv(manifest)
    assert raw.loc[0, "ct_path"].startswith("data/demo_cohort/imagesTr/")
    root = committed_like / "data" / "demo_cohort"
    before = _files(root)
    n_files = 3 * len(raw) + 2  # CT, PET, label per case; the clinical and endpoint CSVs
    capsys.readouterr()
    (root / "imagesTr" / raw.loc[1, "ct_path"].split("/")[-1]).unlink()
    (root / CLINICAL_CSV).unlink()
    m = ensure_demo_cohort(manifest, workers=1)
    assert _files(root) == before
    assert m.equals(read_manifest(manifest))
    # One line says what it did, and where.
    assert capsys.readouterr().out == (
        f"demo cohort {root.resolve()}: 2 of {n_files} files regenerated; all "
        f"{n_files} match {manifest} and data_manifest.json (SHA-256)\n"
    )
    ensure_demo_cohort(manifest, workers=1)
    assert f": 0 of {n_files} files regenerated" in capsys.readouterr().out
    shutil.rmtree(committed_like / "data")  # a fresh checkout: nothing there at all
    ensure_demo_cohort(manifest, workers=1)
    assert _files(root) == before
    assert f": {n_files} of {n_files} files regenerated" in capsys.readouterr().out


def test_ensure_detects_tampered_file(committed_like: Path):
    root = committed_like / "data" / "demo_cohort"
    pet = sorted((root / "imagesTr").glob("*__PT.nii.gz"))[1]
    img = sitk.ReadImage(str(pet))
    sitk.WriteImage(img * 1.01, str(pet), useCompression=True)
    with pytest.raises(DemoCohortMismatchError) as info:
        ensure_demo_cohort(committed_like / "data_manifest.csv")
    cid = pet.name.split("__")[0]
    assert cid in str(info.value) and pet.name in str(info.value)


def test_ensure_detects_changed_generator(committed_like: Path, monkeypatch):
    root = committed_like / "data" / "demo_cohort"
    ct = sorted((root / "imagesTr").glob("*__CT.nii.gz"))[0]
    ct.unlink()
    monkeypatch.setattr(dc, "_HU", dc._HU + 5)  # a generator change: other CT bytes
    with pytest.raises(DemoCohortMismatchError, match="generator version") as info:
        ensure_demo_cohort(committed_like / "data_manifest.csv", workers=1)
    assert ct.name in str(info.value) and ct.name.split("__")[0] in str(info.value)


def test_cli_make_demo_cohort_refuses_existing_and_documents_options(committed_like: Path):
    runner = CliRunner()
    res = runner.invoke(
        make_demo_cohort_cli,
        ["--out", str(committed_like / "data" / "demo_cohort"), "--manifest", str(committed_like / "x.csv")],
    )
    assert res.exit_code == 1 and "overwrite" in res.output and "Traceback" not in res.output
    assert not (committed_like / "x.csv").exists()
    helptext = runner.invoke(make_demo_cohort_cli, ["--help"]).output
    for opt in ("--out", "--n-cases", "--seed", "--manifest", "--workers", "--spacing-scale", "--overwrite"):
        assert opt in helptext


def test_committed_manifest_describes_default_cohort():
    manifest = REPO / "data_manifest.csv"  # committed: every checkout has it
    record = read_json(REPO / "data_manifest.json")
    assert record["demo_cohort"]["seed"] == 42 and record["demo_cohort"]["n_cases"] == 100
    assert record["demo_cohort"]["generator_version"] == dc.GENERATOR_VERSION
    m = read_manifest(manifest, resolve_paths=False)
    assert len(m) == 100 and m["ct_path"].str.startswith("data/demo_cohort/imagesTr/").all()
    assert (m["ct_sha256"].str.len() == 64).all()
    # The committed manifest agrees with what the current generator draws (no rendering).
    _, _, truth = design_cohort(100, 42)
    truth = truth.set_index("case_id")
    assert list(truth.index) == list(m.index)
    ep = m[m.has_endpoint == 1]
    assert (ep.rfs_days.astype(int) == truth.loc[ep.index, "rfs_days"]).all()
