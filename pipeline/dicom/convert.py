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
refusal of any case leaves nothing behind, and names every patient refused (not the first
only). With ``continue_on_error`` the patients that can be imported are written and the
refused ones listed with the reason (returned, and in ``dicom_import.json``: ``refused``).
With ``add`` the patients are added to an existing root: the files already there are kept as
they are (hard links into the new folder, never rewritten), patients already imported are
skipped, and pseudonyms continue the mapping. No patient name, birth date or other identifying
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

from pipeline.artefacts import atomic_path, code_version, read_json, replace_folder, utc_now, write_json_atomic
from pipeline.dicom.cases import CaseSeries, choose_series
from pipeline.dicom.clinical import (
    case_ids,
    check_prefix,
    clinical_rows,
    header_row,
    next_pseudonyms,
    read_clinical,
    read_mapping,
)
from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.rtstruct import (
    DEFAULT_LABELS,
    check_placeable,
    label_mask,
    match_labels,
    merge_warnings,
    read_rois,
)
from pipeline.dicom.scan import Series, scan_folder
from pipeline.dicom.seg import read_segments
from pipeline.dicom.suv import suv_factor, suv_inputs
from pipeline.dicom.volume import read_pixels, slice_geometry, to_image
from pipeline.hecktor import (
    CLINICAL_CSV,
    CLINICAL_HEADER,
    ENDPOINT_CSV,
    ENDPOINT_HEADER,
    IMAGES_DIR,
    LABELS_DIR,
    read_hecktor_csv,
)

PROVENANCE_DIR = "dicom_import"
RUN_RECORD = "dicom_import.json"


class ImportResult(list):
    """The per-case provenance records (a list, in case id order), with what else the run has
    to say: ``refused`` (``[{"patient", "reason"}]``, with ``continue_on_error``), ``notes``
    (console lines: links followed, patients without a clinical row, patients already in the
    root), ``skipped`` (PatientIDs already imported, with ``add``)."""

    def __init__(self, records=(), refused=(), notes=(), skipped=()):
        super().__init__(records)
        self.refused, self.notes, self.skipped = list(refused), list(notes), list(skipped)


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
    return [
        f"the structure sets reference {len(stale)} image(s) not in the CT series (matched by "
        "FrameOfReferenceUID instead)"
    ]


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


def convert_case(
    patient: str,
    series: dict[str, Series],
    case_id: str,
    root: Path,
    labels: dict[int, str],
    chosen: set[str],
    writer: _Writer,
    accepted_frames: set[str] = frozenset(),
) -> dict[str, Any]:
    """Queue one patient's CT, PET and label for writing into ``root``; return its provenance record."""
    case = choose_series(patient, series, chosen, accepted_frames)
    rois = [roi for s in case.structures for ds in s.headers for roi in read_rois(ds)]
    rois += [seg for s in case.segmentations for ds in s.headers for seg in read_segments(ds)]
    by_label = match_labels(rois, labels, patient)
    check_placeable(by_label, labels, case.ct.frame_of_reference, accepted_frames, patient)
    ct, geometry = _ct_image(case)
    pet, suv = _pet_image(case)
    warnings = merge_warnings(by_label, labels) + _stale_references(case) + list(suv.pop("warnings"))
    try:
        label = sitk.GetImageFromArray(label_mask(by_label, geometry, warnings))
    except DicomImportError as exc:
        raise DicomImportError(f"patient {patient}: {exc}") from None
    label.CopyInformation(ct)
    writer.write(ct, root / IMAGES_DIR / f"{case_id}__CT.nii.gz")
    writer.write(pet, root / IMAGES_DIR / f"{case_id}__PT.nii.gz")
    writer.write(label, root / LABELS_DIR / f"{case_id}.nii.gz")
    frames = sorted({getattr(r, "frame", "") for v in by_label.values() for r in v} - {case.ct.frame_of_reference})
    return {
        "case_id": case_id,
        "ct": {
            "series_uid": case.ct.uid,
            "sop_instance_uids": sorted(str(h.SOPInstanceUID) for h in case.ct.headers),
            "frame_of_reference_uid": case.ct.frame_of_reference,
            "size_xyz": list(ct.GetSize()),
            "spacing_xyz_mm": list(ct.GetSpacing()),
        },
        "pet": {
            "series_uid": case.pet.uid,
            "sop_instance_uids": sorted(str(h.SOPInstanceUID) for h in case.pet.headers),
            "size_xyz": list(pet.GetSize()),
            "spacing_xyz_mm": list(pet.GetSpacing()),
            "suv": suv,
        },
        "structures": [
            {
                "series_uid": s.uid,
                "modality": s.modality,
                "sop_instance_uids": [str(h.SOPInstanceUID) for h in s.headers],
            }
            for s in case.structures + case.segmentations
        ],
        "labels": {
            str(k): {
                "rule": labels[k],
                "rois": [r.name for r in v],
                "frames": sorted({getattr(r, "frame", "") for r in v}),
            }
            for k, v in by_label.items()
        },
        "frames_accepted_as_the_cts": frames,
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


def _check_destinations(out: Path, mapping: Path | None, pseudonymise: bool, overwrite: bool, add: bool) -> None:
    if add and overwrite:
        raise DicomImportError("--add keeps what --out holds and --overwrite replaces it: pass one of them")
    if out.exists() and any(out.iterdir()):
        if not (out / RUN_RECORD).is_file():
            raise FileExistsError(
                f"{out} holds files but no {RUN_RECORD}; refusing to "
                f"{'add to' if add else 'replace'} something import-dicom did not write"
            )
        if not overwrite and not add:
            raise FileExistsError(f"{out} is not empty; pass --add to add patients to it, or --overwrite to replace it")
    if pseudonymise:
        if mapping is None:
            raise DicomImportError(
                "--pseudonymise needs --mapping PATH: the file (outside --out) that keeps "
                "the case id -> PatientID mapping (an existing one is continued)"
            )
        if mapping.resolve().is_relative_to(out.resolve()):
            raise DicomImportError(
                f"--mapping {mapping} is inside --out {out}; keep the mapping apart from the pseudonymised data"
            )
    elif mapping is not None:
        raise DicomImportError("--mapping is only written with --pseudonymise")


def _endpoint_rows(endpoints: dict[str, dict[str, str]], ids: dict[str, str]) -> list[list[str]]:
    return [
        [ids[pid]] + [endpoints[pid][c] or "NaN" for c in ENDPOINT_HEADER[1:]]
        for pid in sorted(endpoints, key=lambda p: ids.get(p, ""))
        if pid in ids
    ]


def _case_files(root: Path, case_id: str) -> list[Path]:
    return [
        root / IMAGES_DIR / f"{case_id}__CT.nii.gz",
        root / IMAGES_DIR / f"{case_id}__PT.nii.gz",
        root / LABELS_DIR / f"{case_id}.nii.gz",
    ]


def _convert_all(
    work: Path, patients: dict[str, dict[str, Series]], params: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, str]]]:
    """Every patient into ``work`` under a provisional id (``.new-<n>``); returns the records and
    header rows of those that passed, and the refused ones (``{"patient", "reason"}``)."""
    labels = {int(k): v for k, v in params["labels"].items()}
    accepted = set(params["accepted_frames"])
    records, headers, refused = {}, {}, []
    with ThreadPoolExecutor(max_workers=2) as pool:
        writer = _Writer(pool)
        for n, pid in enumerate(sorted(patients)):
            provisional = f".new-{n}"
            try:
                record = convert_case(
                    pid, patients[pid], provisional, work, labels, set(params["series"]), writer, accepted
                )
            except DicomImportError as exc:
                writer.wait()
                for path in _case_files(work, provisional):
                    path.unlink(missing_ok=True)
                reason = str(exc).removeprefix(f"patient {pid}: ")
                refused.append({"patient": pid, "reason": reason})
                continue
            records[pid] = record
            ct = patients[pid][record["ct"]["series_uid"]].headers[0]
            pet = patients[pid][record["pet"]["series_uid"]].headers[0]
            headers[pid] = header_row(ct, pet)
        writer.wait()
    return records, headers, refused


def _name_cases(work: Path, records: dict[str, dict[str, Any]], ids: dict[str, str], pseudonymise: bool) -> None:
    """Move each case from its provisional id to its final one and write its record."""
    for pid, record in records.items():
        for old, new in zip(_case_files(work, record["case_id"]), _case_files(work, ids[pid])):
            os.replace(old, new)
        record["case_id"] = ids[pid]
        if not pseudonymise:
            record["patient_id"] = pid
        write_json_atomic(work / PROVENANCE_DIR / f"{ids[pid]}.json", record)


def _refusal_text(refused: list[dict[str, str]], total: int) -> str:
    lines = "\n".join(f"  {r['patient']}: {r['reason']}" for r in refused)
    return (
        f"{len(refused)} of {total} patient(s) cannot be imported, nothing was written "
        f"(--continue-on-error imports the others and lists these):\n{lines}"
    )


def _without_patient_ids(refused: list[dict[str, str]]) -> list[dict[str, str]]:
    """Refusals as a pseudonymised root may keep them: the PatientID replaced by a number."""
    return [
        {"patient": f"refused patient {k}", "reason": r["reason"].replace(r["patient"], f"<refused patient {k}>")}
        for k, r in enumerate(refused, start=1)
    ]


def _existing_root(out: Path) -> tuple[set[str], dict[str, Any]]:
    """Case ids already in a root written by import-dicom, and its run record."""
    cases = {p.name[: -len(".nii.gz")] for p in (out / LABELS_DIR).glob("*.nii.gz")}
    return cases, read_json(out / RUN_RECORD)


def _copy_root(out: Path, work: Path) -> None:
    """The existing root into ``work`` as hard links (the same files, untouched), falling back
    to copies across file systems."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(out, work, copy_function=link, dirs_exist_ok=True)


def _append_csv(path: Path, rows: list[list[str]], header: Iterable[str], replace: bool = False) -> None:
    """Rows appended to a CRLF CSV in a fresh file (the linked original is left as it is);
    ``replace``: the rows alone."""
    old = path.read_bytes() if path.exists() and not replace else _crlf([], header)
    path.unlink(missing_ok=True)
    path.write_bytes(old + (_crlf(rows, header).split(b"\r\n", 1)[1] if rows else b""))


def _patients_to_import(
    sources: list[Path],
    series: Iterable[str],
    out: Path,
    existing_cases: set[str],
    known_ids: dict[str, str],
    pseudonymise: bool,
    notes: list[str],
) -> tuple[dict[str, dict[str, Series]], list[str]]:
    """The patients found under the sources that are not in the root yet, and those that are."""
    patients = scan_folder(sources, notes)
    unknown = set(series) - {uid for found in patients.values() for uid in found}
    if unknown:
        raise DicomImportError(
            f"--series {', '.join(sorted(unknown))}: no such SeriesInstanceUID under {', '.join(map(str, sources))}"
        )
    if not pseudonymise:
        case_ids(list(patients), False)  # refuses PatientIDs that cannot name files
    already = sorted(p for p in patients if (known_ids.get(p) if pseudonymise else p) in existing_cases)
    if already:
        notes.append(f"{len(already)} patient(s) already in {out}, left as they are: {', '.join(already)}")
        patients = {p: v for p, v in patients.items() if p not in already}
    if not patients:
        raise DicomImportError(f"no patient to import: all {len(already)} are already in {out}")
    return patients, already


def _clinical(
    clinical,
    columns: dict[str, str] | None,
    ignore: Iterable[str],
    patients,
    already: list[str],
    center_id: int | None,
    notes: list[str],
) -> tuple[dict[str, dict[str, str]], dict[str, Any] | None]:
    """``--clinical`` read (:func:`read_clinical`), patients without a row and rows without a
    patient named in ``notes``; a patient without a CenterID refused."""
    extra, record = ({}, None) if clinical is None else read_clinical(Path(clinical), columns, tuple(ignore))
    if clinical is not None:
        notes += _clinical_notes(clinical, extra, patients, already)
    no_centre = [p for p in sorted(patients) if center_id is None and not extra.get(p, {}).get("CenterID")]
    if no_centre:
        raise DicomImportError(
            f"patient {no_centre[0]}: no CenterID; give --center-id or a CenterID column in "
            f"--clinical ({len(no_centre)} patient(s) without one: {', '.join(no_centre)})"
        )
    return extra, record


def _clinical_notes(clinical, extra: dict[str, dict[str, str]], patients, already: list[str]) -> list[str]:
    """Patients without a ``--clinical`` row, and rows without a patient, named."""
    notes = []
    without = sorted(p for p in patients if p not in extra)
    if without:
        notes.append(
            f"{len(without)} patient(s) without a row in --clinical {clinical}: {', '.join(without)} "
            "(only age, sex and weight from the DICOM headers; predict-survival fills the other "
            "covariates with training medians and says so)"
        )
    stray = sorted(p for p in extra if p not in patients and p not in already)
    if stray:
        notes.append(f"{len(stray)} row(s) of --clinical {clinical} match no patient found: {', '.join(stray)}")
    return notes


def _write_run_record(
    work: Path,
    ordered: list[dict[str, Any]],
    refused: list[dict[str, str]],
    params: dict[str, Any],
    previous: dict[str, Any] | None,
    existing_cases: set[str],
) -> None:
    """``dicom_import.json``: this batch at the top level (as a single import always wrote it)
    and every batch of the root under ``batches``."""
    batch = {
        "params": params,
        "cases": [r["case_id"] for r in ordered],
        "warnings": {r["case_id"]: r["warnings"] for r in ordered if r["warnings"]},
        "refused": refused if not params["pseudonymise"] else _without_patient_ids(refused),
        "code_version": code_version(),
        "created": utc_now(),
    }
    keys = ("params", "cases", "warnings", "code_version", "created")
    batches = (previous.get("batches") or [{k: previous.get(k) for k in keys}]) if previous else []
    write_json_atomic(
        work / RUN_RECORD,
        {
            "kind": "dicom_import",
            **batch,
            "cases": sorted(existing_cases | set(batch["cases"])),
            "batches": batches + [batch],
        },
    )


def _append_mapping(mapping: Path, new: dict[str, str]) -> None:
    """New ``case_id,PatientID`` rows after the mapping file's own (never rewritten)."""
    with atomic_path(mapping) as tmp:
        kept = mapping.read_text() if mapping.exists() else "case_id,PatientID\n"
        tmp.write_text(
            kept + ("" if kept.endswith("\n") else "\n") + "".join(f"{new[p]},{p}\n" for p in sorted(new, key=new.get))
        )


def _import_params(
    labels: dict[int, str] | None,
    series: Iterable[str],
    center_id: int | None,
    pseudonymise: bool,
    prefix: str,
    accept_frames: Iterable[str],
    sources: list[Path],
    clinical: str | os.PathLike | None,
    endpoint: str | os.PathLike | None,
) -> dict[str, Any]:
    """The parameters of an :func:`import_dicom` run, as its run record states them (the
    clinical column mapping is added once the clinical CSV has been read)."""
    return {
        "labels": {str(k): v for k, v in (labels or DEFAULT_LABELS).items()},
        "series": sorted(series),
        "center_id": center_id,
        "pseudonymise": pseudonymise,
        "prefix": prefix if pseudonymise else None,
        "accepted_frames": sorted(set(accept_frames)),
        "sources": [str(s) for s in sources],
        "clinical_csv": clinical is not None,
        "endpoint_csv": endpoint is not None,
    }


def _check_converted(
    records: dict[str, dict[str, Any]], refused: list[dict[str, str]], total: int, continue_on_error: bool
) -> None:
    """Refuse the import when a patient was refused (unless ``continue_on_error``) or none converted.

    Raises:
        DicomImportError: listing the refused patients.
    """
    if refused and not continue_on_error:
        raise DicomImportError(_refusal_text(refused, total))
    if not records:
        raise DicomImportError(
            _refusal_text(refused, total).replace(
                "(--continue-on-error imports the others and lists these)", "(none could be imported)"
            )
        )


def _case_ids(
    records: dict[str, dict[str, Any]],
    known_ids: dict[str, str],
    prefix: str,
    existing_cases: set[str],
    pseudonymise: bool,
) -> dict[str, str]:
    """PatientID -> case id of the converted patients: with ``pseudonymise`` the mapping's
    pseudonym where it has one, else the next free ``<prefix>NNNN``; without, the PatientID."""
    if not pseudonymise:
        return {p: p for p in records}
    ids = {p: known_ids[p] for p in records if p in known_ids}
    ids.update(next_pseudonyms(list(records), known_ids, prefix, existing_cases))
    return ids


def import_dicom(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    labels: dict[int, str] | None = None,
    series: Iterable[str] = (),
    clinical: str | os.PathLike | None = None,
    endpoint: str | os.PathLike | None = None,
    center_id: int | None = None,
    pseudonymise: bool = False,
    mapping: str | os.PathLike | None = None,
    overwrite: bool = False,
    add: bool = False,
    continue_on_error: bool = False,
    accept_frames: Iterable[str] = (),
    prefix: str = "P",
    clinical_columns: dict[str, str] | None = None,
    ignore_columns: Iterable[str] = (),
) -> ImportResult:
    """Import every patient found under ``src`` into a HECKTOR 2022 training root at ``out``.

    Args:
        src: a folder or several, searched recursively (symbolic links followed); files are
            identified by their tags.
        out: the root to write (must not exist or be empty, unless ``overwrite`` or ``add``).
        labels: label value -> ROI name regular expression (default :data:`DEFAULT_LABELS`).
        series: SeriesInstanceUIDs that choose among several candidate CT or PET series.
        clinical: CSV keyed by ``PatientID`` with HECKTOR clinical columns to merge.
        endpoint: CSV ``PatientID,Relapse,RFS``; without it no endpoint file is written and
            ``build-manifest`` makes a manifest for prediction only.
        center_id: ``CenterID`` of every case (unless ``clinical`` gives one).
        pseudonymise: case ids ``<prefix>0001...``; the mapping goes to ``mapping`` only, and an
            existing mapping is continued (never rewritten).
        overwrite: replace an earlier import at ``out``.
        add: add the patients to an earlier import at ``out`` (those already there are skipped).
        continue_on_error: import the patients that can be, list the refused ones.
        accept_frames: FrameOfReferenceUIDs the user vouches for as the CT's (recorded).
        prefix: pseudonym prefix.
        clinical_columns: ``clinical`` column -> HECKTOR column. ignore_columns: columns to drop.

    Returns:
        The per-case provenance records of this run, in case id order (:class:`ImportResult`).

    Raises:
        DicomImportError: a patient that cannot be imported (every one listed; nothing is
            written), or with ``continue_on_error`` none that can.
        FileExistsError: ``out`` holds files and neither ``overwrite`` nor ``add``.
    """
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    out = Path(out)
    mapping = Path(mapping) if mapping is not None else None
    _check_destinations(out, mapping, pseudonymise, overwrite, add)
    if pseudonymise:
        check_prefix(prefix)
    notes: list[str] = []
    adding = add and out.is_dir() and (out / RUN_RECORD).is_file()
    existing_cases, previous = _existing_root(out) if adding else (set(), None)
    known_ids = read_mapping(mapping) if pseudonymise else {}
    patients, already = _patients_to_import(sources, series, out, existing_cases, known_ids, pseudonymise, notes)
    params = _import_params(labels, series, center_id, pseudonymise, prefix, accept_frames, sources, clinical, endpoint)
    extra, params["clinical_columns"] = _clinical(
        clinical, clinical_columns, ignore_columns, patients, already, center_id, notes
    )
    endpoints = _csv_by_patient(Path(endpoint), ENDPOINT_HEADER) if endpoint else None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if adding:
            _copy_root(out, work)
        for sub in (IMAGES_DIR, LABELS_DIR, PROVENANCE_DIR):
            (work / sub).mkdir(parents=True, exist_ok=True)
        records, headers, refused = _convert_all(work, patients, params)
        _check_converted(records, refused, len(patients), continue_on_error)
        ids = _case_ids(records, known_ids, prefix, existing_cases, pseudonymise)
        _name_cases(work, records, ids, pseudonymise)
        rows = clinical_rows(headers, ids, extra, set(endpoints or {}), center_id)
        _append_csv(work / CLINICAL_CSV, rows, CLINICAL_HEADER, replace=not adding)
        if endpoints is not None:
            _append_csv(work / ENDPOINT_CSV, _endpoint_rows(endpoints, ids), ENDPOINT_HEADER)
        ordered = sorted(records.values(), key=lambda r: r["case_id"])
        _write_run_record(work, ordered, refused, params, previous, existing_cases)
        if pseudonymise:
            _append_mapping(mapping, {p: c for p, c in ids.items() if p not in known_ids})
        replace_folder(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return ImportResult(ordered, refused, notes, already)
