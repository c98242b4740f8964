"""import-dicom: geometry, SUV, contours, refusals, the demo's DICOM round trip, a real case."""

from __future__ import annotations

import copy
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from pipeline.artefacts import read_json
from pipeline.cli.dicom import import_dicom as import_dicom_cli
from pipeline.demo_cohort import image_from_array
from pipeline.dicom.convert import import_dicom
from pipeline.dicom.demo_writer import (
    contour_loops,
    suv_per_bqml,
    write_dicom_cohort,
    write_rtstruct,
    write_series,
)
from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.rtstruct import fill_polygons
from pipeline.dicom.suv import suv_factor
from pipeline.hecktor import build_manifest

REPO = Path(__file__).resolve().parent.parent
STS_DICOM = REPO.parent / "shared" / "data" / "sts_dicom" / "STS-001"
STS_NIFTI = REPO.parent / "shared" / "data" / "sts_petct"


# --------------------------------------------------------------------------------------
# Contours: the boundary rule
# --------------------------------------------------------------------------------------


def test_fill_is_even_odd_at_voxel_centres_with_half_open_edges():
    square = np.array([[1.0, 1.0], [4.0, 1.0], [4.0, 4.0], [1.0, 4.0]])  # centres 1..3 inside, 4 not
    got = fill_polygons([square], (6, 6))
    want = np.zeros((6, 6), bool)
    want[1:4, 1:4] = True
    assert np.array_equal(got, want)
    hole = np.array([[1.6, 1.6], [2.4, 1.6], [2.4, 2.4], [1.6, 2.4]])  # around the centre (2, 2)
    island = np.array([[4.5, 4.5], [5.5, 4.5], [5.5, 5.5], [4.5, 5.5]])
    got = fill_polygons([square, hole, island], (6, 6))
    want[2, 2] = False
    want[5, 5] = True
    assert np.array_equal(got, want)
    triangle = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # centres with x + y < 5 (x = 0 and y = 0 in)
    got = fill_polygons([triangle], (6, 6))
    yy, xx = np.mgrid[0:6, 0:6]
    assert np.array_equal(got, (xx + yy < 5))


def test_voxel_edge_outlines_fill_back_to_the_mask_exactly():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((17, 23)) < 0.45  # holes, islands, diagonal touches
        mask[5:12, 5:12] |= True
        mask[7:10, 7:10] = False
        assert np.array_equal(fill_polygons(contour_loops(mask), mask.shape), mask)


# --------------------------------------------------------------------------------------
# SUV
# --------------------------------------------------------------------------------------


def _bqml_inputs(decay: str) -> dict:
    return {
        "units": "BQML",
        "decay_correction": decay,
        "patient_weight_kg": 80.0,
        "injected_dose_bq": 4.0e8,
        "half_life_s": 6588.0,
        "injection_time": "2022-01-01T09:00:00",
        "scan_time": "2022-01-01T10:05:53",
    }


def test_suv_factor_by_hand():
    delay = 3953.0
    assert suv_factor(_bqml_inputs("START")) == pytest.approx(80_000 / (4.0e8 * 2 ** (-delay / 6588.0)), rel=1e-12)
    assert suv_factor(_bqml_inputs("ADMIN")) == pytest.approx(80_000 / 4.0e8, rel=1e-12)
    assert suv_factor({"units": "GML"}) == 1.0
    assert suv_factor({"units": "CNTS", "philips_suv_scale_factor": 0.00123}) == 0.00123
    late = {**_bqml_inputs("START"), "injection_time": "2022-01-01T11:00:00"}
    with pytest.raises(DicomImportError, match="before the injection"):
        suv_factor(late)


# --------------------------------------------------------------------------------------
# A tiny case written with the demo writer, for refusals
# --------------------------------------------------------------------------------------


def _tiny_case(folder: Path, pid: str = "PAT-1", frame: str | None = None) -> dict:
    """CT 12x10x6 (1 x 1 x 2 mm), PET 6x5x6 in Bq/ml, RTSTRUCT 'GTVp' (a 4x3 square on slices 1-3)."""
    patient = {"id": pid, "age": "061Y", "sex": "F", "weight": 70.0}
    uids = {k: pydicom.uid.generate_uid(entropy_srcs=[pid, k, str(folder)]) for k in ("study", "CT", "PT", "RTSTRUCT")}
    uids["frame"] = frame or pydicom.uid.generate_uid(entropy_srcs=[pid, "frame"])
    ct = np.arange(6 * 10 * 12, dtype=np.int16).reshape(6, 10, 12) - 300
    label = np.zeros((6, 10, 12), np.uint8)
    label[1:4, 3:6, 4:8] = 1
    pet = np.linspace(0.0, 9.0, 6 * 5 * 6).reshape(6, 5, 6)
    ct_img = image_from_array(ct, (1.0, 1.0, 2.0), (-5.0, -4.0, 10.0))
    sops = write_series(ct_img, folder / pid / "a", "CT", patient, uids)
    pet_img = image_from_array(pet / suv_per_bqml(70.0), (2.0, 2.0, 2.0), (-5.0, -4.0, 10.0))
    write_series(pet_img, folder / pid / "b", "PT", patient, uids)
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(ct_img)
    write_rtstruct(lab, ct_img, sops, folder / pid / "c" / "rs.dcm", patient, uids)
    return {"ct": ct, "pet": pet, "label": label, "uids": uids}


def _files(folder: Path, modality: str) -> list[Path]:
    out = [p for p in folder.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == modality]
    return sorted(
        out,
        key=lambda p: (
            float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) if modality != "RTSTRUCT" else 0
        ),
    )


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_tiny_case_imports_exactly(tmp_path: Path):
    truth = _tiny_case(tmp_path / "src")
    import_dicom(tmp_path / "src", tmp_path / "out", center_id=9)
    ct = sitk.ReadImage(str(tmp_path / "out/imagesTr/PAT-1__CT.nii.gz"))
    assert ct.GetPixelID() == sitk.sitkInt16 and ct.GetSpacing() == (1.0, 1.0, 2.0)
    assert ct.GetOrigin() == (-5.0, -4.0, 10.0)
    assert np.array_equal(sitk.GetArrayFromImage(ct), truth["ct"])
    pet = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/imagesTr/PAT-1__PT.nii.gz")))
    assert np.allclose(pet, truth["pet"], rtol=0, atol=9.0 / 32767)
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/labelsTr/PAT-1.nii.gz"))), truth["label"]
    )
    record = read_json(tmp_path / "out/dicom_import/PAT-1.json")
    assert record["pet"]["suv"]["units"] == "BQML" and record["pet"]["suv"]["patient_weight_kg"] == 70.0
    assert record["labels"]["1"]["rois"] == ["GTVp"] and len(record["ct"]["sop_instance_uids"]) == 6
    clinical = (tmp_path / "out/hecktor2022_clinical_info_training.csv").read_text()
    assert clinical.splitlines()[1] == "PAT-1,1,0,9,F,61,70,NaN,NaN,NaN,NaN,NaN,NaN"


def _refused(tmp_path: Path, match: str, **kwargs) -> None:
    with pytest.raises(DicomImportError, match=match):
        import_dicom(tmp_path / "src", tmp_path / "out", center_id=9, **kwargs)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"], "a refusal leaves nothing behind"


def test_missing_duplicate_and_uneven_slices_are_refused(tmp_path: Path):
    _tiny_case(tmp_path / "src")
    ct = _files(tmp_path / "src", "CT")
    moved = ct[3].rename(tmp_path / "aside.dcm")
    with pytest.raises(
        DicomImportError,
        match=r"PAT-1, series .* \(CT\): 1 missing slice\(s\) between positions "
        r"14\.000 and 18\.000 mm",
    ):
        import_dicom(tmp_path / "src", tmp_path / "out", center_id=9)
    moved.rename(ct[3])
    shutil.copy(ct[2], tmp_path / "src" / "copy.dcm")
    _edit(tmp_path / "src" / "copy.dcm", SOPInstanceUID=pydicom.uid.generate_uid(entropy_srcs=["dup"]))
    _refused(tmp_path, r"duplicate slices at position 14\.000 mm")
    (tmp_path / "src" / "copy.dcm").unlink()
    _edit(ct[5], ImagePositionPatient=["-5", "-4", "20.5"])
    _refused(tmp_path, r"uneven slice spacing: gap of 2\.500 mm at 18\.000 mm")


def test_mixed_orientation_refused(tmp_path: Path):
    _tiny_case(tmp_path / "src")
    _edit(_files(tmp_path / "src", "CT")[2], ImageOrientationPatient=["1", "0", "0", "0", "0.9", "0.43589"])
    _refused(tmp_path, r"PAT-1, series .*\(CT\): mixed orientations")


def test_several_ct_series_need_series_option(tmp_path: Path):
    truth = _tiny_case(tmp_path / "src")
    second = pydicom.uid.generate_uid(entropy_srcs=["second"])
    for i, path in enumerate(_files(tmp_path / "src", "CT")):
        copy = tmp_path / "src" / "PAT-1" / "again" / f"{i}.dcm"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
        _edit(copy, SeriesInstanceUID=second, SOPInstanceUID=pydicom.uid.generate_uid(entropy_srcs=["s", str(i)]))
    _refused(tmp_path, r"PAT-1: 2 candidate CT series .*choose one with --series UID")
    import_dicom(tmp_path / "src", tmp_path / "out", center_id=9, series=[second])
    assert read_json(tmp_path / "out/dicom_import/PAT-1.json")["ct"]["series_uid"] == second
    assert truth["uids"]["CT"] != second


def test_pet_in_another_frame_of_reference_refused(tmp_path: Path):
    _tiny_case(tmp_path / "src")
    for path in _files(tmp_path / "src", "PT"):
        _edit(path, FrameOfReferenceUID="1.2.3.4")
    _refused(tmp_path, r"PAT-1: no PET series shares the CT's FrameOfReferenceUID")


@pytest.mark.parametrize("tag", ["PatientWeight", "RadiopharmaceuticalInformationSequence", "SeriesTime", "Units"])
def test_missing_suv_tag_is_named(tmp_path: Path, tag: str):
    _tiny_case(tmp_path / "src")
    for path in _files(tmp_path / "src", "PT"):
        _edit(path, **{tag: None})
    _refused(tmp_path, rf"PAT-1, series .* \(PT\): SUV needs tag {tag}")


def test_roi_matching_no_rule_lists_the_names(tmp_path: Path):
    _tiny_case(tmp_path / "src")
    _refused(
        tmp_path, r"PAT-1: no ROI matches the --label rules \(1=Tumour\); ROI names found: 'GTVp'", labels={1: "Tumour"}
    )


def test_pseudonyms_keep_identifiers_out(tmp_path: Path):
    _tiny_case(tmp_path / "src", "Secret-7")
    result = CliRunner().invoke(
        import_dicom_cli,
        [
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
            "--center-id",
            "9",
            "--pseudonymise",
            "--mapping",
            str(tmp_path / "out" / "ids.csv"),
        ],
    )
    assert result.exit_code == 1 and "inside --out" in result.output
    result = CliRunner().invoke(
        import_dicom_cli,
        [
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
            "--center-id",
            "9",
            "--pseudonymise",
            "--mapping",
            str(tmp_path / "ids.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ids.csv").read_text() == "case_id,PatientID\nP0001,Secret-7\n"
    assert (tmp_path / "out/imagesTr/P0001__CT.nii.gz").is_file()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"Secret" not in data and b"DEMO^" not in data, path


# --------------------------------------------------------------------------------------
# The demo cohort as DICOM, back through import-dicom
# --------------------------------------------------------------------------------------


def _flip_x(image: sitk.Image) -> sitk.Image:
    """The same voxels in space, stored with index 0 at the largest x (as the demo's HMR centre)."""
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())
    flipped.SetSpacing(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0)))
    flipped.SetDirection(tuple((direction * [-1, 1, 1]).ravel()))
    return flipped


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """A small NIfTI demo cohort (one case re-stored with a flipped x axis), as DICOM, imported back."""
    from pipeline.demo_cohort import generate_demo_cohort

    base = tmp_path_factory.mktemp("demo_dicom")
    nifti = generate_demo_cohort(base / "nifti", n_cases=3, seed=3, workers=1, spacing_scale=2.0)
    first = pd.read_csv(nifti / "hecktor2022_clinical_info_training.csv")["PatientID"].iloc[0]
    for path in (nifti / "imagesTr" / f"{first}__CT.nii.gz", nifti / "labelsTr" / f"{first}.nii.gz"):
        sitk.WriteImage(_flip_x(sitk.ReadImage(str(path))), str(path), True)
    write_dicom_cohort(nifti, base / "dicom")
    import_dicom(base / "dicom", base / "root", clinical=base / "dicom" / "clinical.csv")
    return nifti, base / "dicom", base / "root"


def _on_grid(path: Path, reference: Path) -> tuple[np.ndarray, np.ndarray]:
    ref = sitk.ReadImage(str(reference))
    got = sitk.Resample(sitk.ReadImage(str(path)), ref, sitk.Transform(), sitk.sitkNearestNeighbor, -12345.0)
    return sitk.GetArrayFromImage(got).astype(np.float64), sitk.GetArrayFromImage(ref).astype(np.float64)


def test_demo_dicom_imports_back_to_the_nifti_cohort(demo_pair):
    nifti, _, root = demo_pair
    ids = pd.read_csv(nifti / "hecktor2022_clinical_info_training.csv")["PatientID"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in ids)
    for cid in ids:
        got, want = _on_grid(root / "imagesTr" / f"{cid}__CT.nii.gz", nifti / "imagesTr" / f"{cid}__CT.nii.gz")
        assert np.array_equal(got, want), f"{cid} CT"
        got, want = _on_grid(root / "labelsTr" / f"{cid}.nii.gz", nifti / "labelsTr" / f"{cid}.nii.gz")
        assert np.array_equal(got, want), f"{cid} label"
        got, want = _on_grid(root / "imagesTr" / f"{cid}__PT.nii.gz", nifti / "imagesTr" / f"{cid}__PT.nii.gz")
        half_slope = want.max(axis=(1, 2), keepdims=True) / 32767 / 2  # the writer's per-slice int16 rounding
        assert np.all(np.abs(got - want) <= half_slope * 1.001 + 1e-7), f"{cid} PET"
    flipped = sitk.ReadImage(str(root / "imagesTr" / f"{ids[0]}__CT.nii.gz"))
    assert np.linalg.det(np.asarray(flipped.GetDirection()).reshape(3, 3)) == pytest.approx(1.0)


def test_demo_dicom_root_builds_a_manifest_with_and_without_endpoints(demo_pair, tmp_path: Path):
    nifti, dicom, root = demo_pair
    table = build_manifest(root, tmp_path / "m.csv", progress=False)
    assert table["has_endpoint"].sum() == 0 and table["relapse"].isna().all() and (table["task2"] == 0).all()
    record = read_json(tmp_path / "m.json")
    assert record["endpoint_csv_sha256"] is None and record["endpoints"].startswith("none:")
    reference = build_manifest(nifti, tmp_path / "ref.csv", progress=False)
    cols = ["case_id", "center_id", "gender", "age", "hpv_status", "has_gtvp", "has_gtvn"]
    assert table[cols].equals(reference[cols])
    import_dicom(dicom, tmp_path / "with", clinical=dicom / "clinical.csv", endpoint=dicom / "endpoint.csv")
    table = build_manifest(tmp_path / "with", tmp_path / "w.csv", progress=False)
    assert table[["case_id", "has_endpoint", "relapse", "rfs_days"]].equals(
        reference[["case_id", "has_endpoint", "relapse", "rfs_days"]]
    )


def test_training_refuses_a_manifest_without_endpoints(demo_pair, tmp_path: Path):
    from pipeline.cli.train import train_survival

    _, _, root = demo_pair
    build_manifest(root, tmp_path / "m.csv", progress=False)
    (tmp_path / "cache").mkdir()
    result = CliRunner().invoke(
        train_survival, ["--manifest", str(tmp_path / "m.csv"), "--cache", str(tmp_path / "cache")]
    )
    assert result.exit_code == 1
    assert "have no endpoint" in result.output and "predict-survival only" in result.output


def test_make_demo_cohort_dicom_refuses_to_overwrite(tmp_path: Path):
    from pipeline.cli.data import make_demo_cohort

    args = [
        "--format",
        "dicom",
        "--out",
        str(tmp_path / "d"),
        "--n-cases",
        "2",
        "--spacing-scale",
        "3",
        "--workers",
        "1",
    ]
    assert CliRunner().invoke(make_demo_cohort, args).exit_code == 0
    assert {"clinical.csv", "endpoint.csv", "demo_dicom.json"} <= {p.name for p in (tmp_path / "d").iterdir()}
    result = CliRunner().invoke(make_demo_cohort, args)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert not (tmp_path / "data_manifest.csv").exists()


# --------------------------------------------------------------------------------------
# The real case (../shared/data/sts_dicom against the independent conversion sts_petct)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sts(tmp_path_factory):
    if not (STS_DICOM / "CT").is_dir() or not (STS_NIFTI / "imagesTr" / "STS-001__CT.nii.gz").is_file():
        pytest.skip(
            f"real DICOM case not found at {STS_DICOM} or its NIfTI at {STS_NIFTI} "
            "(a checkout on its own has no ../shared)"
        )
    out = tmp_path_factory.mktemp("sts") / "root"
    records = import_dicom(STS_DICOM.parent, out, labels={1: "GTV_Mass_CT"}, center_id=9)
    return out, records[0]


def test_real_case_matches_the_independent_conversion(sts):
    out, record = sts
    cid = record["case_id"]
    for kind, rel in (("CT", 0.0), ("PT", 1e-4)):
        got = sitk.ReadImage(str(out / "imagesTr" / f"{cid}__{kind}.nii.gz"))
        want = sitk.ReadImage(str(STS_NIFTI / "imagesTr" / f"STS-001__{kind}.nii.gz"))
        assert got.GetSize() == want.GetSize()
        assert np.allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-4)
        assert np.allclose(got.GetSpacing(), want.GetSpacing(), atol=1e-5)
        a, b = sitk.GetArrayFromImage(got).astype(np.float64), sitk.GetArrayFromImage(want).astype(np.float64)
        assert np.all(np.abs(a - b) <= rel * np.abs(b) + (1e-6 if rel else 0.0)), kind
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{cid}.nii.gz"))) > 0
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(STS_NIFTI / "labelsTr" / "STS-001.nii.gz"))) > 0
    assert 2 * (got & want).sum() / (got.sum() + want.sum()) >= 0.97
    assert record["labels"]["1"]["rois"] == ["GTV_Mass_CT"]
    assert any("not in the CT series" in w for w in record["warnings"]), "stale references are a warning"


@pytest.mark.parametrize("decay", ["START", "ADMIN"])
def test_real_pet_re_expressed_in_bqml_gives_back_the_suv(sts, tmp_path: Path, decay: str):
    out, record = sts
    src = tmp_path / "src" / "STS-001"
    shutil.copytree(STS_DICOM, src)
    # by hand: 71 kg, 380 MBq at 10:35:00, series at 11:20:11 (2711 s later), F-18 half-life 6586.2 s
    factor = 71_000 / (3.8e8 * (2 ** (-2711 / 6586.2) if decay == "START" else 1.0))
    for path in (src / "PT").iterdir():
        ds = pydicom.dcmread(path)
        ds.Units, ds.DecayCorrection, ds.PatientWeight = "BQML", decay, "71"
        ds.SeriesTime = ds.AcquisitionTime = "112011"
        info = ds.RadiopharmaceuticalInformationSequence[0]
        info.RadionuclideTotalDose, info.RadionuclideHalfLife, info.RadiopharmaceuticalStartTime = (
            "3.8e8",
            "6586.2",
            "103500",
        )
        ds.RescaleSlope = f"{float(ds.RescaleSlope) / factor:.12g}"  # same stored values, now Bq/ml
        ds.save_as(path)
    records = import_dicom(tmp_path / "src", tmp_path / "out", labels={1: "GTV_Mass_CT"}, center_id=9)
    assert records[0]["pet"]["suv"]["factor"] == pytest.approx(factor, rel=1e-12)
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/imagesTr/STS_001__PT.nii.gz")))
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr/STS_001__PT.nii.gz")))
    assert np.all(np.abs(got - want) <= 1e-4 * np.abs(want) + 1e-7)
    start = datetime(2000, 9, 7, 10, 35)
    assert datetime.fromisoformat(records[0]["pet"]["suv"]["scan_time"]) - start == timedelta(seconds=2711)


def test_cnts_needs_the_vendor_factor_and_other_units_are_refused(tmp_path: Path):
    truth = _tiny_case(tmp_path / "src")
    pet = _files(tmp_path / "src", "PT")
    for path in pet:
        _edit(path, Units="CNTS")
    _refused(tmp_path, r"PAT-1, series .* \(PT\): Units CNTS needs the vendor's SUV scale factor \(7053,1000\)")
    for path in pet:
        ds = pydicom.dcmread(path)
        ds.add_new((0x7053, 0x0010), "LO", "Philips PET Private Group")
        ds.add_new((0x7053, 0x1000), "DS", f"{suv_per_bqml(70.0):.10g}")
        ds.save_as(path)
    import_dicom(tmp_path / "src", tmp_path / "out", center_id=9)
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/imagesTr/PAT-1__PT.nii.gz")))
    assert np.allclose(got, truth["pet"], rtol=0, atol=9.0 / 32767)
    shutil.rmtree(tmp_path / "out")
    for path in pet:
        _edit(path, Units="PROPCNTS")
    _refused(tmp_path, r"Units 'PROPCNTS' is not supported")


def test_unknown_series_uid_refused(tmp_path: Path):
    _tiny_case(tmp_path / "src")
    _refused(tmp_path, r"--series 1\.2\.3: no such SeriesInstanceUID", series=["1.2.3"])


# --------------------------------------------------------------------------------------
# DICOM SEG instead of an RTSTRUCT
# --------------------------------------------------------------------------------------


def _write_seg(path: Path, label: np.ndarray, uids: dict, shift_x: int = 0) -> None:
    """A BINARY SEG of label 1 ('GTVp') on the tiny case's CT planes, its grid shifted by ``shift_x`` voxels."""
    from pydicom.pixels import pack_bits

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["seg"])
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "SEG", "PAT-1", pydicom.uid.generate_uid(entropy_srcs=["sg"])
    ds.FrameOfReferenceUID, ds.SegmentationType = uids["frame"], "BINARY"
    segment = pydicom.Dataset()
    segment.SegmentNumber, segment.SegmentLabel = 1, "GTVp"
    ds.SegmentSequence = [segment]
    planes = [k for k in range(label.shape[0]) if (label[k] == 1).any()]
    frames = np.stack([np.roll(label[k] == 1, -shift_x, axis=1) for k in planes]).astype(np.uint8)
    shared, orient, measures = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    orient.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    measures.PixelSpacing, measures.SliceThickness = ["1", "1"], "2"
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orient], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in planes:
        item, pos, ident = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
        pos.ImagePositionPatient = [str(-5.0 + shift_x), "-4", str(10.0 + 2 * k)]
        ident.ReferencedSegmentNumber = 1
        item.PlanePositionSequence, item.SegmentIdentificationSequence = [pos], [ident]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(planes), label.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(frames)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("shift_x", [0, 1])
def test_seg_instead_of_rtstruct_gives_the_label(tmp_path: Path, shift_x: int):
    truth = _tiny_case(tmp_path / "src")
    _files(tmp_path / "src", "RTSTRUCT")[0].unlink()
    _refused(tmp_path, r"PAT-1: no RTSTRUCT or SEG in the CT's frame of reference")
    _write_seg(tmp_path / "src" / "seg.dcm", truth["label"], truth["uids"], shift_x)
    records = import_dicom(tmp_path / "src", tmp_path / "out", center_id=9)
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/labelsTr/PAT-1.nii.gz")))
    assert np.array_equal(got, truth["label"])
    assert records[0]["labels"]["1"]["rois"] == ["GTVp"] and records[0]["structures"][0]["modality"] == "SEG"


def test_an_existing_mapping_is_continued_not_replaced(tmp_path: Path):
    _tiny_case(tmp_path / "src")
    (tmp_path / "ids.csv").write_text("case_id,PatientID\nP0001,Someone-else\n")
    records = import_dicom(
        tmp_path / "src", tmp_path / "out", center_id=9, pseudonymise=True, mapping=tmp_path / "ids.csv"
    )
    assert [r["case_id"] for r in records] == ["P0002"]
    assert (tmp_path / "ids.csv").read_text() == "case_id,PatientID\nP0001,Someone-else\nP0002,PAT-1\n"


def test_demo_dicom_is_deterministic(demo_pair, tmp_path: Path):
    nifti, dicom, _ = demo_pair
    write_dicom_cohort(nifti, tmp_path / "again")
    first = {p.relative_to(dicom): p.read_bytes() for p in dicom.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert first.keys() == second.keys() and all(first[k] == second[k] for k in first)


@pytest.mark.parametrize("rule", ["GTVp", "0=GTVp", "1=", "1=GTV(p"])
def test_label_rules_are_checked(tmp_path: Path, rule: str):
    result = CliRunner().invoke(import_dicom_cli, [str(tmp_path), "--out", str(tmp_path / "out"), "--label", rule])
    assert result.exit_code == 2 and "--label" in result.output and not (tmp_path / "out").exists()


def test_a_later_patient_failing_leaves_nothing_of_the_earlier_ones(tmp_path: Path):
    _tiny_case(tmp_path / "src", "PAT-1")
    _tiny_case(tmp_path / "src", "PAT-2")
    for path in (tmp_path / "src" / "PAT-2").rglob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "PT":
            _edit(path, PatientWeight=None)
    _refused(tmp_path, r"patient PAT-2, series .* \(PT\): SUV needs tag PatientWeight")


# --------------------------------------------------------------------------------------
# Import never guesses: frames, empty ROIs, holes, merged ROIs (copies of the real case)
# --------------------------------------------------------------------------------------


def _real_copy(tmp_path: Path, structures=("RS_CT.dcm",), pid: str | None = None) -> Path:
    """The real case (CT, PET and the named structure sets) copied under ``tmp_path/src``; skips without it."""
    if not (STS_DICOM / "CT").is_dir():
        pytest.skip(f"real DICOM case not found at {STS_DICOM} (a checkout on its own has no ../shared)")
    src = tmp_path / "src" / (pid or "STS-001")
    shutil.copytree(STS_DICOM / "CT", src / "CT")
    shutil.copytree(STS_DICOM / "PT", src / "PT")
    (src / "RTSTRUCT").mkdir()
    for name in structures:
        shutil.copy(STS_DICOM / "RTSTRUCT" / name, src / "RTSTRUCT" / name)
    if pid is not None:  # another patient: its own id and SOP instance UIDs
        for path in src.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.PatientID = pid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
                entropy_srcs=[pid, str(ds.SOPInstanceUID)]
            )
            ds.save_as(path)
    return tmp_path / "src"


def test_real_rois_defined_in_another_frame_are_refused_unless_vouched_for(tmp_path: Path):
    src = _real_copy(tmp_path)
    rs = src / "STS-001" / "RTSTRUCT" / "RS_CT.dcm"
    ds = pydicom.dcmread(rs)
    ct_frame, other = str(ds.FrameOfReferenceUID), "1.2.826.0.1.3680043.8.498.999"
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = other
    ds.save_as(rs)  # only the stray top-level FrameOfReferenceUID still names the CT's frame
    _refused(
        tmp_path,
        rf"ROI 'GTV_Mass_CT' \(label 1, .*RS_CT.dcm\) is defined in frame of reference {other}, "
        rf"the CT in {ct_frame}.*--accept-frame {other}",
        labels={1: "GTV_Mass_CT"},
    )
    records = import_dicom(src, tmp_path / "out", labels={1: "GTV_Mass_CT"}, center_id=9, accept_frames=[other])
    assert records[0]["frames_accepted_as_the_cts"] == [other]
    assert read_json(tmp_path / "out" / "dicom_import.json")["params"]["accepted_frames"] == [other]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/labelsTr/STS_001.nii.gz")))
    assert label.sum() > 1000


def test_real_roi_without_contour_data_is_refused_naming_it(tmp_path: Path):
    src = _real_copy(tmp_path)
    rs = src / "STS-001" / "RTSTRUCT" / "RS_CT.dcm"
    ds = pydicom.dcmread(rs)
    del ds.ROIContourSequence[0].ContourSequence
    ds.save_as(rs)
    _refused(
        tmp_path,
        r"STS_001: ROI 'GTV_Mass_CT' \(label 1, rule 'GTV_Mass_CT', .*RS_CT.dcm\) has no closed "
        r"planar contour data",
        labels={1: "GTV_Mass_CT"},
    )


def test_a_ring_keeps_its_hole_through_roi_mask():
    """Two contours of one ROI on one slice, one inside the other: the inner one is a hole
    (a union of per-contour fills would fill it)."""
    from pipeline.dicom.rtstruct import Roi, roi_mask
    from pipeline.dicom.volume import Geometry

    geometry = Geometry(
        order=np.arange(3), size=(10, 10, 3), spacing=(1.0, 1.0, 2.0), origin=np.zeros(3), direction=np.eye(3)
    )
    outer = np.array([[1.0, 1.0, 2.0], [8.0, 1.0, 2.0], [8.0, 8.0, 2.0], [1.0, 8.0, 2.0]])
    inner = np.array([[3.0, 3.0, 2.0], [6.0, 3.0, 2.0], [6.0, 6.0, 2.0], [3.0, 6.0, 2.0]])
    mask = roi_mask(Roi("GTVp", 1, "rs.dcm", [outer, inner]), geometry, [])
    want = np.zeros((3, 10, 10), bool)
    want[1, 1:8, 1:8] = True
    want[1, 3:6, 3:6] = False
    assert np.array_equal(mask, want)


def test_real_contour_with_a_hole_cut_inside_it_leaves_the_hole_empty(tmp_path: Path):
    from pipeline.dicom.rtstruct import read_rois, roi_mask
    from pipeline.dicom.volume import slice_geometry

    src = _real_copy(tmp_path)
    rs = src / "STS-001" / "RTSTRUCT" / "RS_CT.dcm"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (src / "STS-001" / "CT").iterdir()]
    geometry = slice_geometry(headers, "STS_001")
    before = roi_mask(read_rois(pydicom.dcmread(rs))[0], geometry, [])
    k = int(np.argmax(before.sum(axis=(1, 2))))  # the slice with the largest section
    ys, xs = np.nonzero(before[k])
    cy, cx = int(np.median(ys)), int(np.median(xs))
    assert before[k, cy - 2 : cy + 3, cx - 2 : cx + 3].all()
    # a 5 x 5-voxel square hole, as a second contour on that slice (voxel edges at +-2.5)
    corners = [(cx - 2.5, cy - 2.5), (cx + 2.5, cy - 2.5), (cx + 2.5, cy + 2.5), (cx - 2.5, cy + 2.5)]
    to_mm = geometry.direction * np.asarray(geometry.spacing)
    hole = np.array([geometry.origin + to_mm @ np.array([x, y, k]) for x, y in corners])
    ds = pydicom.dcmread(rs)
    item = copy.deepcopy(ds.ROIContourSequence[0].ContourSequence[0])
    item.ContourData = [f"{v:.4f}" for v in hole.ravel()]
    item.NumberOfContourPoints = 4
    ds.ROIContourSequence[0].ContourSequence.append(item)
    ds.save_as(rs)
    after = roi_mask(read_rois(pydicom.dcmread(rs))[0], geometry, [])
    want = before.copy()
    want[k, cy - 2 : cy + 3, cx - 2 : cx + 3] = False
    assert np.array_equal(after, want)


def test_a_label_uniting_several_rois_says_so_on_the_console(tmp_path: Path):
    src = _real_copy(tmp_path, ("RS_CT.dcm", "RS_PET.dcm"))
    result = CliRunner().invoke(
        import_dicom_cli, [str(src), "--out", str(tmp_path / "out"), "--center-id", "9", "--label", "1=GTV_Mass"]
    )
    assert result.exit_code == 0, result.output
    assert "label 1 (rule 'GTV_Mass') unites 2 ROIs: 'GTV_Mass_CT', 'GTV_Mass_PET'" in result.output


# --------------------------------------------------------------------------------------
# Batches: several sources, links, continue on error, adding, pseudonyms, clinical columns
# --------------------------------------------------------------------------------------


def test_two_batches_add_patients_and_continue_the_pseudonyms(tmp_path: Path):
    _real_copy(tmp_path / "b1")
    src2 = _real_copy(tmp_path / "b2", pid="STS_002")
    shutil.copytree(tmp_path / "b1" / "src" / "STS-001", src2 / "STS-001")  # the first patient again
    out, ids = tmp_path / "root", tmp_path / "ids.csv"
    common = [
        "--out",
        str(out),
        "--center-id",
        "9",
        "--label",
        "1=GTV_Mass_CT",
        "--pseudonymise",
        "--prefix",
        "HN",
        "--mapping",
        str(ids),
    ]
    first = CliRunner().invoke(import_dicom_cli, [str(tmp_path / "b1" / "src"), *common])
    assert first.exit_code == 0, first.output
    kept = {p.relative_to(out): (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = CliRunner().invoke(import_dicom_cli, [str(src2), *common])
    assert again.exit_code == 1 and "--add" in again.output
    second = CliRunner().invoke(import_dicom_cli, [str(src2), *common, "--add"])
    assert second.exit_code == 0, second.output
    assert "1 patient(s) already in" in second.output and "STS_001" in second.output
    assert ids.read_text() == "case_id,PatientID\nHN0001,STS_001\nHN0002,STS_002\n"
    for rel, (inode, data) in kept.items():
        if rel.name in ("dicom_import.json", "hecktor2022_clinical_info_training.csv"):
            continue  # the root's records, rewritten with the new patient
        assert (out / rel).stat().st_ino == inode and (out / rel).read_bytes() == data, rel
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["HN0001.nii.gz", "HN0002.nii.gz"]
    clinical = (out / "hecktor2022_clinical_info_training.csv").read_bytes()
    assert clinical.startswith(kept[Path("hecktor2022_clinical_info_training.csv")][1])
    assert [line.split(b",")[0] for line in clinical.splitlines()[1:]] == [b"HN0001", b"HN0002"]
    record = read_json(out / "dicom_import.json")
    assert record["cases"] == ["HN0001", "HN0002"] and [b["cases"] for b in record["batches"]] == [
        ["HN0001"],
        ["HN0002"],
    ]
    assert len(build_manifest(out, tmp_path / "m.csv", progress=False)) == 2


def test_real_clinical_columns_are_never_dropped_in_silence(tmp_path: Path):
    src = _real_copy(tmp_path)
    csv = tmp_path / "clinical.csv"
    csv.write_text("PatientID,CenterID,HPV,Comment\nSTS_001,9,1,seen twice\nSTS_999,9,0,\n")
    args = [str(src), "--out", str(tmp_path / "out"), "--label", "1=GTV_Mass_CT", "--clinical", str(csv)]
    result = CliRunner().invoke(import_dicom_cli, args)
    assert result.exit_code == 1 and "2 column(s) the import does not know: ['HPV', 'Comment']" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        import_dicom_cli, [*args, "--clinical-column", "HPV=HPV status (0=-, 1=+)", "--ignore-column", "Comment"]
    )
    assert result.exit_code == 0, result.output
    assert "1 row(s) of --clinical" in result.output and "STS_999" in result.output
    table = pd.read_csv(tmp_path / "out" / "hecktor2022_clinical_info_training.csv")
    assert table.loc[0, "HPV status (0=-, 1=+)"] == 1
    csv.write_text("PatientID,CenterID\nSTS_999,9\n")
    result = CliRunner().invoke(import_dicom_cli, [*args, "--center-id", "9", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "1 patient(s) without a row in --clinical" in result.output and "STS_001" in result.output


def test_continue_on_error_imports_the_rest_and_lists_the_refused(tmp_path: Path):
    for pid in ("PAT-1", "PAT-2", "PAT-3"):
        _tiny_case(tmp_path / "src", pid)
    for path in (tmp_path / "src" / "PAT-2").rglob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "PT":
            _edit(path, PatientWeight=None)
    rs = next(
        p
        for p in (tmp_path / "src" / "PAT-3").rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"
    )
    ds = pydicom.dcmread(rs)
    ds.StructureSetROISequence[0].ROIName = "Tumor"
    ds.save_as(rs)
    args = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--center-id", "9"]
    result = CliRunner().invoke(import_dicom_cli, args)
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert "2 of 3 patient(s) cannot be imported" in result.output  # every refused patient, not the first
    assert "PAT-2: patient PAT-2, series" in result.output and "PAT-3: no ROI matches" in result.output
    result = CliRunner().invoke(import_dicom_cli, [*args, "--continue-on-error"])
    assert result.exit_code == 3, result.output
    assert "1 case(s) ->" in result.output and "refused (2):" in result.output
    table = result.output.split("refused (2):")[1]
    assert "PAT-2" in table and "SUV needs tag PatientWeight" in table and "PAT-3" in table and "'Tumor'" in table
    assert sorted(p.name for p in (tmp_path / "out" / "labelsTr").iterdir()) == ["PAT-1.nii.gz"]
    assert [r["patient"] for r in read_json(tmp_path / "out" / "dicom_import.json")["refused"]] == ["PAT-2", "PAT-3"]


def test_several_sources_and_folders_of_symbolic_links(tmp_path: Path):
    _tiny_case(tmp_path / "export1", "PAT-1")
    _tiny_case(tmp_path / "export2", "PAT-2")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "PAT-1").symlink_to(tmp_path / "export1" / "PAT-1", target_is_directory=True)
    result = CliRunner().invoke(
        import_dicom_cli,
        [str(tmp_path / "links"), str(tmp_path / "export2"), "--out", str(tmp_path / "out"), "--center-id", "9"],
    )
    assert result.exit_code == 0, result.output
    assert "followed 1 symbolic link(s) to folders" in result.output and "2 case(s) ->" in result.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DicomImportError, match=r"no DICOM file found \(0 file\(s\) read; 1 broken symbolic link"):
        import_dicom(tmp_path / "broken", tmp_path / "out2", center_id=9)


def test_preprocess_qc_draws_every_case_with_an_index(sts, tmp_path: Path):
    """`preprocess --qc` on the real case: one PNG (three planes, contour, crop box) and an index."""
    from pipeline.cli.preprocess import preprocess

    out, record = sts
    build_manifest(out, tmp_path / "m.csv", progress=False)
    result = CliRunner().invoke(
        preprocess,
        [
            "--manifest",
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path / "c"),
            "--survival-size",
            "32,32,16",
            "--ctfm-size",
            "32,32,16",
            "--petfm-size",
            "32,32,32",
            "--workers",
            "1",
            "--quiet",
            "--qc",
        ],
    )
    assert result.exit_code == 0, result.output
    png = tmp_path / "c" / "qc" / f"{record['case_id']}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{record['case_id']}.png" in (tmp_path / "c" / "qc" / "index.html").read_text()
    assert "qc: 1 picture(s)" in result.output
