"""``import-dicom``: a folder of DICOM files -> a HECKTOR 2022 training root.

Output (the layout :func:`pipeline.hecktor.build_manifest` reads)::

    <out>/imagesTr/<ID>__CT.nii.gz     CT in HU (int16 when every rescale is whole, else float32)
    <out>/imagesTr/<ID>__PT.nii.gz     PET in SUVbw, float32, on the PET's own grid
    <out>/labelsTr/<ID>.nii.gz         uint8 label on the CT grid (0 background, then --label values)
    <out>/hecktor2022_clinical_info_training.csv
    <out>/hecktor2022_endpoint_training.csv     only with --endpoint
    <out>/dicom_import/<ID>.json       per-case provenance: series and SOP instance UIDs read,
                                       SUV factor and its inputs, ROI / segment names per label,
                                       warnings
    <out>/dicom_import.json            the run: parameters, cases, code version

Everything is written to a temporary sibling folder and renamed onto ``<out>`` at the end: a
refusal of any case leaves nothing behind. No patient name, birth date or other identifying
header is written except the PatientID (the case id); with ``pseudonymise`` not that either
(the mapping goes to the separate file named by ``mapping``). Study, series and SOP instance
UIDs are kept in the provenance: they link the output to the archive.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipeline.artefacts import atomic_path, code_version, replace_folder, utc_now, write_json_atomic
from pipeline.dicom.cases import CaseSeries, choose_series
from pipeline.dicom.clinical import case_ids, clinical_rows, header_row
from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.rtstruct import DEFAULT_LABELS, label_mask, match_labels, read_rois
from pipeline.dicom.scan import Series, scan_folder
from pipeline.dicom.seg import read_segments
from pipeline.dicom.suv import suv_factor, suv_inputs
from pipeline.dicom.volume import read_pixels, slice_geometry, to_image
from pipeline.hecktor import (
    CLINICAL_CSV, CLINICAL_HEADER, ENDPOINT_CSV, ENDPOINT_HEADER, IMAGES_DIR, LABELS_DIR, read_hecktor_csv,
)

PROVENANCE_DIR = "dicom_import"
RUN_RECORD = "dicom_import.json"
def _ct_image(case: CaseSeries) -> tuple[sitk.Image, Any]:
    where = f"patient {case.patient}, series {case.ct.uid} (CT)"
    geometry = slice_geometry(case.ct.headers, case.patient)
    return to_image(read_pixels(case.ct.headers, geometry, where), geometry), geometry


def _pet_image(case: CaseSeries) -> tuple[sitk.Image, dict[str, Any]]:
    where = f"patient {case.patient}, series {case.pet.uid} (PT)"
    inputs = suv_inputs(case.pet.headers, where)
    factor = suv_factor(inputs, where)
    geometry = slice_geometry(case.pet.headers, case.patient)
    image = to_image(read_pixels(case.pet.headers, geometry, where, scale=factor), geometry)
    return image, {"factor": factor, **inputs}


def _stale_references(case: CaseSeries) -> list[str]:
    """References of the structure sets to CT images that are not in the export."""
    present = {str(h.SOPInstanceUID) for h in case.ct.headers}
    referenced = set()
    for series in case.structures:
        for ds in series.headers:
            for roi in ds.get("ROIContourSequence", []):
                for c in roi.get("ContourSequence", []):
                    referenced |= {str(i.ReferencedSOPInstanceUID) for i in c.get("ContourImageSequence", [])}
    stale = referenced - present
    if not stale:
        return []
    return [f"the structure sets reference {len(stale)} image(s) not in the CT series (matched by "
            "FrameOfReferenceUID instead)"]


class _Writer:
    """gzip NIfTI writes in background threads (SimpleITK releases the GIL), so compression
    overlaps the reading of the next image and the next case. At most ``backlog`` writes
    wait, which bounds the images held in memory."""

    def __init__(self, pool: ThreadPoolExecutor, backlog: int = 4):
        self.pool, self.backlog, self.pending = pool, backlog, deque()

    def write(self, image: sitk.Image, path: Path) -> None:
        self.pending.append(self.pool.submit(sitk.WriteImage, image, str(path), True))
        while len(self.pending) > self.backlog:
            self.pending.popleft().result()

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()


def convert_case(patient: str, series: dict[str, Series], case_id: str, root: Path,
                 labels: dict[int, str], chosen: set[str], writer: _Writer) -> dict[str, Any]:
    """Queue one patient's CT, PET and label for writing into ``root``; return its provenance record."""
    case = choose_series(patient, series, chosen)
    rois = [roi for s in case.structures for ds in s.headers for roi in read_rois(ds)]
    rois += [seg for s in case.segmentations for ds in s.headers for seg in read_segments(ds)]
    by_label = match_labels(rois, labels, patient)
    ct, geometry = _ct_image(case)
    writer.write(ct, root / IMAGES_DIR / f"{case_id}__CT.nii.gz")
    pet, suv = _pet_image(case)
    writer.write(pet, root / IMAGES_DIR / f"{case_id}__PT.nii.gz")
    warnings = _stale_references(case) + list(suv.pop("warnings"))
    label = sitk.GetImageFromArray(label_mask(by_label, geometry, warnings))
    label.CopyInformation(ct)
    writer.write(label, root / LABELS_DIR / f"{case_id}.nii.gz")
    return {
        "case_id": case_id,
        "ct": {"series_uid": case.ct.uid, "sop_instance_uids": sorted(str(h.SOPInstanceUID) for h in case.ct.headers),
               "frame_of_reference_uid": case.ct.frame_of_reference, "size_xyz": list(ct.GetSize()),
               "spacing_xyz_mm": list(ct.GetSpacing())},
        "pet": {"series_uid": case.pet.uid,
                "sop_instance_uids": sorted(str(h.SOPInstanceUID) for h in case.pet.headers),
                "size_xyz": list(pet.GetSize()), "spacing_xyz_mm": list(pet.GetSpacing()), "suv": suv},
        "structures": [{"series_uid": s.uid, "modality": s.modality,
                        "sop_instance_uids": [str(h.SOPInstanceUID) for h in s.headers]}
                       for s in case.structures + case.segmentations],
        "labels": {str(k): {"rule": labels[k], "rois": [r.name for r in v]} for k, v in by_label.items()},
        "rois_found": sorted({r.name for r in rois}),
        "warnings": warnings,
    }


def _csv_by_patient(path: Path | None, header: Iterable[str]) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    table = read_hecktor_csv(path, tuple(header))
    return {row["PatientID"]: dict(row) for _, row in table.iterrows()}


def _crlf(rows: list[list[str]], header: Iterable[str]) -> bytes:
    head = ",".join(f'"{c}"' if "," in c else c for c in header)
    return ("\r\n".join([head] + [",".join(r) for r in rows]) + "\r\n").encode()


def _check_destinations(out: Path, mapping: Path | None, pseudonymise: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        if not (out / RUN_RECORD).is_file():
            raise FileExistsError(f"{out} holds files but no {RUN_RECORD}; refusing to replace something "
                                  "import-dicom did not write")
    if pseudonymise:
        if mapping is None:
            raise DicomImportError("--pseudonymise needs --mapping PATH: the file (outside --out) that keeps "
                                   "the case id -> PatientID mapping")
        if mapping.resolve().is_relative_to(out.resolve()):
            raise DicomImportError(f"--mapping {mapping} is inside --out {out}; keep the mapping apart from "
                                   "the pseudonymised data")
        if mapping.exists() and not overwrite:
            raise FileExistsError(f"--mapping {mapping} exists; pass --overwrite to replace it (the case ids it "
                                  "maps may be in use elsewhere)")
    elif mapping is not None:
        raise DicomImportError("--mapping is only written with --pseudonymise")


def _endpoint_rows(endpoints: dict[str, dict[str, str]], ids: dict[str, str]) -> list[list[str]]:
    return [[ids[pid]] + [endpoints[pid][c] or "NaN" for c in ENDPOINT_HEADER[1:]]
            for pid in sorted(endpoints, key=lambda p: ids.get(p, "")) if pid in ids]


def _write_root(work: Path, patients: dict[str, dict[str, Series]], ids: dict[str, str],
                params: dict[str, Any], clinical: dict[str, dict[str, str]],
                endpoints: dict[str, dict[str, str]] | None) -> list[dict[str, Any]]:
    """Every case and the CSVs into ``work``; returns the per-case records."""
    for sub in (IMAGES_DIR, LABELS_DIR, PROVENANCE_DIR):
        (work / sub).mkdir(parents=True)
    labels = {int(k): v for k, v in params["labels"].items()}
    records, headers = [], {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        writer = _Writer(pool)
        for pid in sorted(patients, key=lambda p: ids[p]):
            record = convert_case(pid, patients[pid], ids[pid], work, labels, set(params["series"]), writer)
            case = patients[pid][record["ct"]["series_uid"]].headers[0]
            pet = patients[pid][record["pet"]["series_uid"]].headers[0]
            headers[pid] = header_row(case, pet)
            if not params["pseudonymise"]:
                record["patient_id"] = pid
            write_json_atomic(work / PROVENANCE_DIR / f"{ids[pid]}.json", record)
            records.append(record)
        writer.wait()
    rows = clinical_rows(headers, ids, clinical, set(endpoints or {}), params["center_id"])
    (work / CLINICAL_CSV).write_bytes(_crlf(rows, CLINICAL_HEADER))
    if endpoints is not None:
        (work / ENDPOINT_CSV).write_bytes(_crlf(_endpoint_rows(endpoints, ids), ENDPOINT_HEADER))
    return records


def import_dicom(src: str | os.PathLike, out: str | os.PathLike, *, labels: dict[int, str] | None = None,
                 series: Iterable[str] = (), clinical: str | os.PathLike | None = None,
                 endpoint: str | os.PathLike | None = None, center_id: int | None = None,
                 pseudonymise: bool = False, mapping: str | os.PathLike | None = None,
                 overwrite: bool = False) -> list[dict[str, Any]]:
    """Import every patient found under ``src`` into a HECKTOR 2022 training root at ``out``.

    Args:
        src: folder searched recursively; files are identified by their tags.
        out: the root to write (must not exist or be empty, unless ``overwrite``).
        labels: label value -> ROI name regular expression (default :data:`DEFAULT_LABELS`).
        series: SeriesInstanceUIDs that choose among several candidate CT or PET series.
        clinical: CSV keyed by ``PatientID`` with HECKTOR clinical columns to merge.
        endpoint: CSV ``PatientID,Relapse,RFS``; without it no endpoint file is written and
            ``build-manifest`` makes a manifest for prediction only.
        center_id: ``CenterID`` of every case (unless ``clinical`` gives one).
        pseudonymise: case ids ``P0001...``; the mapping goes to ``mapping`` only.
        overwrite: replace an earlier import at ``out``.

    Returns:
        The per-case provenance records, in case id order.

    Raises:
        DicomImportError: any case that cannot be imported (nothing is written).
        FileExistsError: ``out`` holds files and ``overwrite`` is off.
    """
    src, out = Path(src), Path(out)
    mapping = Path(mapping) if mapping is not None else None
    _check_destinations(out, mapping, pseudonymise, overwrite)
    patients = scan_folder(src)
    unknown = set(series) - {uid for found in patients.values() for uid in found}
    if unknown:
        raise DicomImportError(f"--series {', '.join(sorted(unknown))}: no such SeriesInstanceUID under {src}")
    ids = case_ids(list(patients), pseudonymise)
    params = {"labels": {str(k): v for k, v in (labels or DEFAULT_LABELS).items()}, "series": sorted(series),
              "center_id": center_id, "pseudonymise": pseudonymise,
              "clinical_csv": clinical is not None, "endpoint_csv": endpoint is not None}
    extra = _csv_by_patient(Path(clinical) if clinical else None, ("PatientID",))
    endpoints = _csv_by_patient(Path(endpoint), ENDPOINT_HEADER) if endpoint else None
    no_centre = [p for p in sorted(patients) if center_id is None and not extra.get(p, {}).get("CenterID")]
    if no_centre:
        raise DicomImportError(f"patient {no_centre[0]}: no CenterID; give --center-id or a CenterID column in "
                               f"--clinical ({len(no_centre)} patient(s) without one)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        records = _write_root(work, patients, ids, params, extra, endpoints)
        write_json_atomic(work / RUN_RECORD, {
            "kind": "dicom_import", "params": params, "cases": [r["case_id"] for r in records],
            "warnings": {r["case_id"]: r["warnings"] for r in records if r["warnings"]},
            "code_version": code_version(), "created": utc_now()})
        if pseudonymise:
            with atomic_path(mapping) as tmp:
                tmp.write_text("case_id,PatientID\n" + "".join(f"{ids[p]},{p}\n" for p in sorted(ids, key=ids.get)))
        replace_folder(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return records
