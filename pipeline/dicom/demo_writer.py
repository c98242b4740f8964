"""The synthetic demo cohort written as DICOM, as a scanner and a planning system export it.

Per case (patient ``<case_id>``, a synthetic PatientName that must never reach an import's
output):

* a CT series: one file per slice, int16 HU (RescaleSlope 1, RescaleIntercept 0);
* a PET series in Bq/ml (``Units`` BQML, ``DecayCorrection`` START, corrected for ATTN and
  DECY) with every tag SUV needs: 350 MBq of F-18 (half-life 6586.2 s) injected 60 min before
  the series time, ``PatientWeight`` the clinical weight (75 kg where the cohort's clinical
  file has none). Stored as int16 with its own RescaleSlope per slice (max / 32767), so SUV
  comes back to within half a slope;
* an RT Structure Set with ROIs ``GTVp`` (label 1) and ``GTVn`` (label 2), each where the
  patient has one, drawn on the CT:
  on each slice, the label's voxel-edge outlines as closed planar polygons (holes and islands
  as separate polygons). Filled at voxel centres with the even-odd rule
  (:mod:`pipeline.dicom.rtstruct`) they give back the label exactly.

Geometry: ``ImageOrientationPatient`` from the NIfTI direction's first two columns, slice
positions ``origin + k * spacing_z * direction[:, 2]``. Where that third column is not
``row x column`` (the demo's centre with a flipped x axis) the importer orders the slices the
other way round; the voxels are the same points in space.

Beside the cases: ``clinical.csv`` and ``endpoint.csv`` (the cohort's HECKTOR CSVs, keyed by
PatientID, for ``import-dicom --clinical/--endpoint``) and ``demo_dicom.json``. UIDs are
derived from the cohort's parameters, so the same cohort gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.hecktor import CLINICAL_CSV, ENDPOINT_CSV, IMAGES_DIR, LABELS_DIR, read_hecktor_csv

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
F18_HALF_LIFE_S = 6586.2
INJECTED_DOSE_BQ = 3.5e8
UPTAKE_S = 3600.0
DEFAULT_WEIGHT_KG = 75.0
STUDY_DATE, SERIES_TIME, INJECTION_TIME = "20220101", "100000", "090000"
ROI_NAMES = {1: "GTVp", 2: "GTVn"}
RECORD = "demo_dicom.json"


def _ds(value: float) -> str:
    """A decimal string within DICOM's 16 characters."""
    return f"{value:.10g}"


def suv_per_bqml(weight_kg: float) -> float:
    """SUVbw per Bq/ml of this writer's PET (dose decayed over :data:`UPTAKE_S`)."""
    return weight_kg * 1000.0 / (INJECTED_DOSE_BQ * 2.0 ** (-UPTAKE_S / F18_HALF_LIFE_S))


def _base(patient: dict[str, Any], uids: dict[str, str], modality: str, sop_class: str, sop: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop, modality
    ds.PatientID, ds.PatientName = patient["id"], f"DEMO^{patient['id']}"
    ds.PatientAge, ds.PatientSex = patient["age"], patient["sex"]
    ds.PatientWeight = _ds(patient["weight"])
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = uids["study"], STUDY_DATE, SERIES_TIME
    ds.SeriesInstanceUID = uids[modality]
    ds.SeriesDate, ds.SeriesTime = STUDY_DATE, SERIES_TIME
    ds.SeriesNumber = {"CT": 1, "PT": 2, "RTSTRUCT": 3}[modality]
    ds.FrameOfReferenceUID = uids["frame"]
    return ds


def _pet_tags(ds: pydicom.Dataset) -> None:
    ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
    ds.AcquisitionDate, ds.AcquisitionTime = STUDY_DATE, SERIES_TIME
    info = pydicom.Dataset()
    info.Radiopharmaceutical = "Fluorodeoxyglucose"
    info.RadiopharmaceuticalStartTime = INJECTION_TIME
    info.RadionuclideTotalDose = _ds(INJECTED_DOSE_BQ)
    info.RadionuclideHalfLife = _ds(F18_HALF_LIFE_S)
    ds.RadiopharmaceuticalInformationSequence = Sequence([info])


def _slice_positions(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    k = np.arange(image.GetSize()[2])
    positions = np.asarray(image.GetOrigin()) + np.outer(k * image.GetSpacing()[2], direction[:, 2])
    return direction, positions


def write_series(
    image: sitk.Image, folder: Path, modality: str, patient: dict[str, Any], uids: dict[str, str]
) -> list[str]:
    """One file per slice of ``image`` (CT in HU, or PET in Bq/ml); returns the SOP UIDs in slice order.

    Args:
        image: values as they should read after rescale (x, y, z); numpy (z, y, x) per slice.
        modality: ``CT`` (int16, slope 1) or ``PT`` (int16, RescaleSlope per slice).
        patient: ``id``, ``age`` (``059Y``), ``sex``, ``weight`` (kg). uids: study/frame/series UIDs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    direction, positions = _slice_positions(image)
    sx, sy, sz = image.GetSpacing()
    sops = []
    for k, plane in enumerate(values):
        sop = generate_uid(entropy_srcs=[uids[modality], str(k)])
        ds = _base(patient, uids, modality, CT_STORAGE if modality == "CT" else PET_STORAGE, sop)
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.PixelSpacing, ds.SliceThickness = [_ds(sy), _ds(sx)], _ds(sz)
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        peak = float(np.abs(plane).max())
        slope = float(_ds(peak / 32767.0)) if modality == "PT" and peak > 0 else 1.0
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), "0"
        if modality == "PT":
            _pet_tags(ds)
        ds.PixelData = np.clip(np.round(plane / slope), -32768, 32767).astype("<i2").tobytes()
        name = hashlib.sha1(sop.encode()).hexdigest()[:12]  # file names carry no order
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        sops.append(sop)
    return sops


def contour_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed loops along the voxel edges of a 2D mask (y, x), as (x, y) voxel indices (corners at +-0.5).

    Every boundary edge is oriented with the foreground on one side, so each corner has as many
    edges in as out and the edges link into closed loops; collinear corners are dropped.
    """
    m = np.pad(mask.astype(np.int8), 1)
    dx, dy = np.diff(m, axis=1), np.diff(m, axis=0)
    nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (r, c), sign in ((rc, dx[rc]) for rc in zip(*np.nonzero(dx))):
        a, b = ((c, r), (c, r - 1)) if sign > 0 else ((c, r - 1), (c, r))
        nxt.setdefault(a, []).append(b)
    for (r, c), sign in ((rc, dy[rc]) for rc in zip(*np.nonzero(dy))):
        a, b = ((c - 1, r), (c, r)) if sign > 0 else ((c, r), (c - 1, r))
        nxt.setdefault(a, []).append(b)
    loops = []
    while nxt:
        start = min(nxt)
        loop, here = [start], start
        while True:
            ends = nxt[here]
            there = ends.pop()
            if not ends:
                del nxt[here]
            if there == start:
                break
            loop.append(there)
            here = there
        pts = np.asarray(loop, dtype=np.float64)
        turn = np.any(np.roll(pts, -1, 0) - pts != pts - np.roll(pts, 1, 0), axis=1)
        loops.append(pts[turn] - 0.5)
    return loops


def _contour_items(label: np.ndarray, value: int, ct: sitk.Image, ct_sops: list[str]) -> list[pydicom.Dataset]:
    direction, positions = _slice_positions(ct)
    sx, sy, _ = ct.GetSpacing()
    items = []
    for k in np.flatnonzero((label == value).any(axis=(1, 2))):
        for loop in contour_loops(label[k] == value):
            pts = positions[k] + np.outer(loop[:, 0] * sx, direction[:, 0]) + np.outer(loop[:, 1] * sy, direction[:, 1])
            item = pydicom.Dataset()
            image = pydicom.Dataset()
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = CT_STORAGE, ct_sops[k]
            item.ContourImageSequence = Sequence([image])
            item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(pts)
            item.ContourData = [_ds(v) for v in pts.ravel()]
            items.append(item)
    return items


def write_rtstruct(
    label: sitk.Image, ct: sitk.Image, ct_sops: list[str], path: Path, patient: dict[str, Any], uids: dict[str, str]
) -> None:
    """An RT Structure Set of the label's values (:data:`ROI_NAMES`) drawn on the CT slices."""
    sop = generate_uid(entropy_srcs=[uids["RTSTRUCT"], "0"])
    ds = _base(patient, uids, "RTSTRUCT", RTSTRUCT_STORAGE, sop)
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "GTV", STUDY_DATE, SERIES_TIME
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = uids["frame"]
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    array = sitk.GetArrayFromImage(label)
    rois, contours, observations = [], [], []
    for value, name in ROI_NAMES.items():
        if not (array == value).any():
            continue  # not drawn, not exported (an ROI without contours is refused on import)
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = value, uids["frame"], name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        item = pydicom.Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = value, ["255", "0", "0"] if value == 1 else ["0", "0", "255"]
        item.ContourSequence = Sequence(_contour_items(array, value, ct, ct_sops))
        contours.append(item)
        obs = pydicom.Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = value, value, "GTV"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _patient(row: pd.Series) -> dict[str, Any]:
    weight = float(row["Weight"]) if str(row["Weight"]).strip() not in ("", "NaN", "nan") else math.nan
    age = float(row["Age"]) if str(row["Age"]).strip() not in ("", "NaN", "nan") else math.nan
    return {
        "id": row["PatientID"],
        "age": f"{int(age):03d}Y" if math.isfinite(age) else "",
        "sex": row["Gender"],
        "weight": weight if math.isfinite(weight) and weight > 0 else DEFAULT_WEIGHT_KG,
    }


def write_dicom_case(nifti_root: Path, row: pd.Series, out: Path, salt: str) -> None:
    """One case of a HECKTOR root (its clinical CSV row) as CT, PET and RTSTRUCT under ``out/<id>``."""
    patient = _patient(row)
    cid = patient["id"]
    uids = {key: generate_uid(entropy_srcs=[salt, cid, key]) for key in ("study", "frame", "CT", "PT", "RTSTRUCT")}
    ct = sitk.ReadImage(str(nifti_root / IMAGES_DIR / f"{cid}__CT.nii.gz"))
    pet = sitk.ReadImage(str(nifti_root / IMAGES_DIR / f"{cid}__PT.nii.gz"), sitk.sitkFloat64)
    label = sitk.ReadImage(str(nifti_root / LABELS_DIR / f"{cid}.nii.gz"))
    ct_sops = write_series(ct, out / cid / "series1", "CT", patient, uids)
    write_series(pet / suv_per_bqml(patient["weight"]), out / cid / "series2", "PT", patient, uids)
    write_rtstruct(label, ct, ct_sops, out / cid / "series3" / "rtstruct.dcm", patient, uids)


def write_dicom_cohort(nifti_root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Every case of the HECKTOR root ``nifti_root`` as DICOM under ``out`` (see the module doc)."""
    nifti_root, out = Path(nifti_root), Path(out)
    clinical = read_hecktor_csv(nifti_root / CLINICAL_CSV, ("PatientID", "Age", "Gender", "Weight"))
    meta = nifti_root / "demo_cohort.json"
    salt = hashlib.sha256(meta.read_bytes() if meta.is_file() else str(nifti_root).encode()).hexdigest()
    for _, row in clinical.iterrows():
        write_dicom_case(nifti_root, row, out, salt)
    shutil.copyfile(nifti_root / CLINICAL_CSV, out / "clinical.csv")
    if (nifti_root / ENDPOINT_CSV).is_file():
        shutil.copyfile(nifti_root / ENDPOINT_CSV, out / "endpoint.csv")
    record = {
        "kind": "demo_dicom",
        "cases": clinical["PatientID"].tolist(),
        "injected_dose_bq": INJECTED_DOSE_BQ,
        "uptake_s": UPTAKE_S,
        "half_life_s": F18_HALF_LIFE_S,
        "default_weight_kg": DEFAULT_WEIGHT_KG,
    }
    if meta.is_file():
        record["demo_cohort"] = json.loads(meta.read_text())
    (out / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def generate_dicom_demo_cohort(out: str | os.PathLike, *, overwrite: bool = False, **cohort: Any) -> Path:
    """The synthetic cohort (:func:`pipeline.demo_cohort.generate_demo_cohort` with ``cohort``'s
    arguments) written as DICOM under ``out``, built in a temporary sibling and renamed into place."""
    from pipeline.demo_cohort import generate_demo_cohort  # the NIfTI cohort is the source

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace the DICOM demo cohort there")
        if not (out / RECORD).is_file():
            raise FileExistsError(f"{out} holds files but no {RECORD}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        nifti = generate_demo_cohort(work / "nifti", **cohort)
        write_dicom_cohort(nifti, work / "dicom")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work / "dicom", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
