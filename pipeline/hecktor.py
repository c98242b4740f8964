"""Read a HECKTOR 2022 training root and write the case manifest.

Expected layout (the official training release; the synthetic demo cohort has the same)::

    <root>/imagesTr/<ID>__CT.nii.gz     CT in HU, own grid
    <root>/imagesTr/<ID>__PT.nii.gz     PET in SUV, own grid
    <root>/labelsTr/<ID>.nii.gz         mask on the CT grid: 0 bg, 1 GTVp, 2 GTVn
    <root>/hecktor2022_clinical_info_training.csv
    <root>/hecktor2022_endpoint_training.csv

Both CSVs use CRLF line endings and the text ``NaN`` for a missing value; LF endings, a
UTF-8 byte-order mark, empty cells and whitespace around ids are accepted too. The clinical
CSV must hold every column of :data:`CLINICAL_HEADER`, the endpoint CSV every column of
:data:`ENDPOINT_HEADER`; extra columns are ignored.

Validation never modifies the inputs. A problem is a :class:`CaseProblem` (case id, file,
message). By default the first problems are raised together as one :class:`HecktorFormatError`
and nothing is written; with ``continue_on_error=True`` the bad cases are left out and listed
in a per-case error report CSV (``case_id,file,error``) beside the manifest. Problems with a
whole CSV (unreadable, a missing column) always raise.

Per-case checks: CT, PET and label exist and are readable NIfTI (header parsed and, for
``.gz`` files, the whole gzip stream decompressed so a truncated download is caught), images
are 3D, no file stores a NaN or infinite voxel (counted on the file's bytes in the same
pass, since SimpleITK reads them as 0), the label lies on the CT grid and holds only the
values 0, 1, 2 (``has_gtvp`` / ``has_gtvn`` come from those values), and the PET field of
view holds at least ``min_tumour_coverage`` (default 95 %) of the tumour's label voxels (a
PET whose header places it elsewhere would give an all-padding PET crop). Labels are
decoded with SimpleITK and counted with ``numpy.bincount`` in a thread pool (SimpleITK,
zlib and hashlib release the GIL).

``CenterID`` may be any integer: HECKTOR 2022's centres 1..7 keep their codes
(:data:`pipeline.manifest.CENTERS`), another centre (a later release, a user's own
institution) is named by :func:`pipeline.manifest.center_name` and warned about once.
"""

from __future__ import annotations

import io
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm.auto import tqdm

from pipeline.artefacts import (
    atomic_path,
    code_version,
    params_hash,
    read_json,
    sha256_file,
    utc_now,
    write_json_atomic,
)
from pipeline.manifest import CENTERS, MANIFEST_COLUMNS, center_name, write_manifest
from pipeline.preprocess.checks import (
    MIN_TUMOUR_COVERAGE,
    InputCheckError,
    check_tumour_coverage,
    nifti_nonfinite_counts,
    nonfinite_message,
    tumour_points_mm,
)

log = logging.getLogger(__name__)

CLINICAL_CSV = "hecktor2022_clinical_info_training.csv"
ENDPOINT_CSV = "hecktor2022_endpoint_training.csv"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"

#: Exact header of the official clinical CSV, in order.
CLINICAL_HEADER: tuple[str, ...] = (
    "PatientID",
    "Task 1",
    "Task 2",
    "CenterID",
    "Gender",
    "Age",
    "Weight",
    "Tobacco",
    "Alcohol",
    "Performance status",
    "HPV status (0=-, 1=+)",
    "Surgery",
    "Chemotherapy",
)
#: Exact header of the official endpoint CSV, in order.
ENDPOINT_HEADER: tuple[str, ...] = ("PatientID", "Relapse", "RFS")

#: Clinical CSV column -> manifest column.
CLINICAL_TO_MANIFEST: dict[str, str] = {
    "Task 1": "task1",
    "Task 2": "task2",
    "CenterID": "center_id",
    "Gender": "gender",
    "Age": "age",
    "Weight": "weight",
    "Tobacco": "tobacco",
    "Alcohol": "alcohol",
    "Performance status": "performance_status",
    "HPV status (0=-, 1=+)": "hpv_status",
    "Surgery": "surgery",
    "Chemotherapy": "chemotherapy",
}
_BINARY = ("Task 1", "Task 2", "Tobacco", "Alcohol", "HPV status (0=-, 1=+)", "Surgery", "Chemotherapy")
_REQUIRED = ("Task 1", "Task 2", "CenterID")  # never missing: they decide what a case is
_MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "none", "null"})
ERROR_REPORT_COLUMNS = ("case_id", "file", "error")
#: Values allowed in a label (0 background, 1 GTVp, 2 GTVn).
LABEL_VALUES = (0, 1, 2)
_MAX_LISTED = 10


class HecktorFormatError(ValueError):
    """The HECKTOR root breaks the expected format; the message names case and file.

    Attributes:
        errors: every :class:`CaseProblem` found (the message lists the first few).
    """

    def __init__(self, message: str, errors: Sequence[CaseProblem] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass(frozen=True)
class CaseProblem:
    """One problem with one case (``case_id`` is ``""`` for a whole-file problem)."""

    case_id: str
    file: str
    error: str

    def __str__(self) -> str:
        who = f"case {self.case_id}: " if self.case_id else ""
        return f"{who}{self.file}: {self.error}"


def case_paths(root: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Absolute CT, PET and label paths of ``case_id`` under a HECKTOR root.

    Returns:
        ``{"ct": ..., "pet": ..., "label": ...}``.
    """
    root = Path(root).resolve()
    return {
        "ct": root / IMAGES_DIR / f"{case_id}__CT.nii.gz",
        "pet": root / IMAGES_DIR / f"{case_id}__PT.nii.gz",
        "label": root / LABELS_DIR / f"{case_id}.nii.gz",
    }


# --------------------------------------------------------------------------------------
# CSV parsing
# --------------------------------------------------------------------------------------


def read_hecktor_csv(path: str | os.PathLike, header: Sequence[str]) -> pd.DataFrame:
    """Read a HECKTOR CSV as stripped strings, checking encoding and columns.

    Args:
        path: the CSV file.
        header: the columns it must contain.

    Returns:
        DataFrame of ``str`` (missing cells as ``""``), columns as in the file.

    Raises:
        HecktorFormatError: file absent, not UTF-8 text, not parseable as CSV, or a column
            of ``header`` missing (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise HecktorFormatError(f"{path}: file not found")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise HecktorFormatError(f"{path}: not a CSV text file (binary content)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HecktorFormatError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        # newline handling by the csv parser: CRLF and LF both work.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HecktorFormatError(f"{path}: not a readable CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in header if c not in df.columns]
    if missing:
        raise HecktorFormatError(f"{path}: missing expected column(s) {missing}; found {list(df.columns)}")
    df = df.apply(lambda col: col.str.strip())
    # Fully empty lines (e.g. a trailing ",,," row) are not cases.
    df = df[(df != "").any(axis=1)].reset_index(drop=True)
    return df


def _parse_number(
    value: str,
    *,
    case_id: str,
    column: str,
    file: Path,
    errors: list[CaseProblem],
    allowed: Iterable[float] | None = None,
    minimum: float | None = None,
    required: bool = False,
) -> float:
    """Parse one cell; append a :class:`CaseProblem` and return NaN when invalid."""
    if value.lower() in _MISSING_TOKENS:
        if required:
            errors.append(CaseProblem(case_id, str(file), f"column {column!r} is missing"))
        return math.nan
    try:
        number = float(value)
    except ValueError:
        errors.append(CaseProblem(case_id, str(file), f"column {column!r}: non-numeric value {value!r}"))
        return math.nan
    if not math.isfinite(number):
        errors.append(CaseProblem(case_id, str(file), f"column {column!r}: value {value!r}"))
        return math.nan
    if allowed is not None and number not in set(allowed):
        choices = ", ".join(f"{a:g}" for a in sorted(allowed))
        errors.append(CaseProblem(case_id, str(file), f"column {column!r}: value {value!r} not in {{{choices}}}"))
        return math.nan
    if minimum is not None and number < minimum:
        errors.append(CaseProblem(case_id, str(file), f"column {column!r}: value {value!r} is below {minimum:g}"))
        return math.nan
    return number


def _duplicates(ids: pd.Series, file: Path) -> list[CaseProblem]:
    dup = sorted(set(ids[ids.duplicated(keep=False)]))
    return [CaseProblem(cid, str(file), f"duplicate PatientID {cid!r} ({int((ids == cid).sum())} rows)") for cid in dup]


def _read_with_ids(path: Path, header: Sequence[str]) -> tuple[pd.DataFrame, list[CaseProblem], set[str]]:
    """Read a HECKTOR CSV; report empty and duplicate PatientIDs, which every row check skips."""
    raw = read_hecktor_csv(path, header)
    errors: list[CaseProblem] = []
    ids = raw["PatientID"]
    for i in np.flatnonzero((ids == "").to_numpy()):
        errors.append(CaseProblem("", str(path), f"row {i + 2}: empty PatientID"))
    dups = _duplicates(ids[ids != ""], path)
    errors += dups
    return raw, errors, {e.case_id for e in dups} | {""}


def _parse_rows(
    path: Path, header: Sequence[str], parse_row: Callable[..., dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[CaseProblem]]:
    """Read a HECKTOR CSV and parse every row whose PatientID is neither empty nor repeated.

    Args:
        path: the CSV; header: its expected columns.
        parse_row: ``(case_id, row, path, errors) -> fields``; a row that appended to
            ``errors`` is left out.

    Returns:
        ``(rows, errors)``: the fields of the valid rows, and every problem found.
    """
    raw, errors, bad_ids = _read_with_ids(path, header)
    rows = []
    for _, rec in raw.iterrows():
        cid = rec["PatientID"]
        if cid in bad_ids:
            continue
        case_errors: list[CaseProblem] = []
        out = parse_row(cid, rec, path, case_errors)
        if case_errors:
            errors += case_errors
        else:
            rows.append(out)
    return rows, errors


def _clinical_row(cid: str, rec: pd.Series, path: Path, errors: list[CaseProblem]) -> dict[str, Any]:
    """Manifest fields of one clinical row (see :func:`parse_clinical`)."""
    out: dict[str, Any] = {"case_id": cid}
    for col in CLINICAL_HEADER[1:]:
        value = rec[col]
        key = CLINICAL_TO_MANIFEST[col]
        if col == "Gender":
            g = value.upper()
            if g.lower() in _MISSING_TOKENS:
                out[key] = math.nan
            elif g in ("M", "F"):
                out[key] = g
            else:
                errors.append(CaseProblem(cid, str(path), f"column 'Gender': value {value!r} not M/F"))
            continue
        kwargs: dict[str, Any] = {"required": col in _REQUIRED}
        if col in _BINARY:
            kwargs["allowed"] = (0.0, 1.0)
        elif col == "Performance status":
            kwargs["allowed"] = (0.0, 1.0, 2.0, 3.0, 4.0)
        else:  # Age, Weight
            kwargs["minimum"] = 0.0
        out[key] = _parse_number(value, case_id=cid, column=col, file=path, errors=errors, **kwargs)
    center = out.get("center_id", math.nan)
    if not math.isnan(center) and center != round(center):
        errors.append(CaseProblem(cid, str(path), f"column 'CenterID': value {rec['CenterID']!r} is not an integer"))
    if not errors:
        out["center_id"] = int(out["center_id"])
        out["center"] = center_name(out["center_id"])
    return out


def _endpoint_row(cid: str, rec: pd.Series, path: Path, errors: list[CaseProblem]) -> dict[str, Any]:
    """Fields of one endpoint row (see :func:`parse_endpoint`)."""
    relapse = _parse_number(
        rec["Relapse"], case_id=cid, column="Relapse", file=path, errors=errors, allowed=(0.0, 1.0), required=True
    )
    rfs = _parse_number(rec["RFS"], case_id=cid, column="RFS", file=path, errors=errors, minimum=0.0, required=True)
    return {"case_id": cid, "relapse": relapse, "rfs_days": rfs}


def parse_clinical(path: str | os.PathLike) -> tuple[pd.DataFrame, list[CaseProblem]]:
    """Parse the clinical CSV into manifest columns.

    Returns:
        ``(table, errors)``: one row per valid case indexed by ``case_id`` with columns
        ``center_id, center, task1, task2, gender, age, weight, tobacco, alcohol,
        performance_status, hpv_status, surgery, chemotherapy`` (floats, NaN = missing;
        gender ``str`` or NaN), and the per-case problems (those rows are left out).

    Raises:
        HecktorFormatError: a whole-file problem (see :func:`read_hecktor_csv`).
    """
    path = Path(path)
    rows, errors = _parse_rows(path, CLINICAL_HEADER, _clinical_row)
    table = pd.DataFrame(rows, columns=["case_id", "center", *CLINICAL_TO_MANIFEST.values()])
    _warn_new_centres(table, path)
    return table.set_index("case_id", drop=False), errors


def _warn_new_centres(table: pd.DataFrame, path: Path) -> None:
    """One warning for every CenterID outside HECKTOR 2022's (not one per case)."""
    new = table[~table["center_id"].isin(list(CENTERS))]
    if len(new):
        counts = new.groupby("center_id").size()
        listed = ", ".join(f"{int(k)} ({n} case(s), named {center_name(int(k))})" for k, n in counts.items())
        log.warning("%s: CenterID(s) not in HECKTOR 2022 (1..7): %s; they are kept as new centres", path, listed)


def parse_endpoint(path: str | os.PathLike) -> tuple[pd.DataFrame, list[CaseProblem]]:
    """Parse the endpoint CSV.

    Returns:
        ``(table, errors)``: valid rows indexed by ``case_id`` with float columns
        ``relapse`` (0/1) and ``rfs_days`` (>= 0), and the per-case problems (negative or
        non-numeric RFS, Relapse not 0/1, duplicate ids); those rows are left out.

    Raises:
        HecktorFormatError: a whole-file problem (see :func:`read_hecktor_csv`).
    """
    path = Path(path)
    rows, errors = _parse_rows(path, ENDPOINT_HEADER, _endpoint_row)
    table = pd.DataFrame(rows, columns=["case_id", "relapse", "rfs_days"])
    return table.set_index("case_id", drop=False), errors


def parse_endpoint_if_present(path: Path) -> tuple[pd.DataFrame, list[CaseProblem]]:
    """:func:`parse_endpoint`, or an empty table when the root has no endpoint file.

    A root without one (e.g. new patients from ``import-dicom``) gives a manifest with empty
    endpoint columns, said in its record (``endpoints``): ``predict-survival`` scores it,
    training commands refuse it.
    """
    if path.exists():
        return parse_endpoint(path)
    log.warning("%s: no endpoint file; the manifest's endpoint columns stay empty (prediction only, no training)", path)
    return pd.DataFrame(columns=["case_id", "relapse", "rfs_days"]).set_index("case_id", drop=False), []


# --------------------------------------------------------------------------------------
# Image checks
# --------------------------------------------------------------------------------------


def _read_info(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _vec(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _grid_matches(a: Any, b: Any) -> str | None:
    """``None`` if two images (readers or images) share a grid, else a description."""
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        return f"size {tuple(b.GetSize())} differs from the CT's {tuple(a.GetSize())}"
    sa, sb = np.asarray(a.GetSpacing()), np.asarray(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=1e-3, atol=1e-4):
        return f"spacing {_vec(sb)} differs from the CT's {_vec(sa)}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-3):
        return f"direction {_vec(b.GetDirection())} differs from the CT's {_vec(a.GetDirection())}"
    # Half a voxel of origin tolerance: converters round origins differently.
    if np.any(np.abs(np.asarray(a.GetOrigin()) - np.asarray(b.GetOrigin())) > 0.5 * sa):
        return f"origin {_vec(b.GetOrigin())} differs from the CT's {_vec(a.GetOrigin())} by more than half a voxel"
    return None


def inspect_case(
    case_id: str,
    paths: dict[str, Path],
    *,
    checksums: bool = True,
    min_tumour_coverage: float = MIN_TUMOUR_COVERAGE,
) -> tuple[dict[str, Any], list[CaseProblem]]:
    """Validate one case's three NIfTI files and summarise them.

    Args:
        case_id: HECKTOR PatientID.
        paths: ``{"ct", "pet", "label"}`` absolute paths (:func:`case_paths`).
        checksums: compute the SHA-256 of each file.
        min_tumour_coverage: least share of the tumour's label voxels (labels 1 and 2)
            inside the PET field of view.

    Returns:
        ``(info, errors)``; ``info`` holds ``ct_sha256, pet_sha256, label_sha256`` ("" when
        skipped), ``has_gtvp``, ``has_gtvn`` and is only meaningful when ``errors`` is empty.
    """
    errors: list[CaseProblem] = []
    info: dict[str, Any] = {}
    readers: dict[str, sitk.ImageFileReader] = {}
    for kind in ("ct", "pet", "label"):
        path = paths[kind]
        if not path.is_file():
            errors.append(CaseProblem(case_id, str(path), f"{kind} file not found"))
            continue
        try:
            # One pass over the bytes: whole gzip stream (a truncated download) and the
            # NaN/inf count, which SimpleITK cannot give (it reads them as 0).
            n_nan, n_inf = nifti_nonfinite_counts(path, whole_stream=True)
            readers[kind] = _read_info(path)
        except (OSError, RuntimeError, zlib.error) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(CaseProblem(case_id, str(path), f"unreadable NIfTI ({first})"))
            continue
        if readers[kind].GetDimension() != 3:
            errors.append(
                CaseProblem(case_id, str(path), f"expected a 3D image, found {readers[kind].GetDimension()}D")
            )
            continue
        if n_nan or n_inf:
            role = kind if kind == "label" else kind.upper()
            errors.append(CaseProblem(case_id, str(path), nonfinite_message(role, n_nan, n_inf)))
            continue
        info[f"{kind}_sha256"] = sha256_file(path) if checksums else ""
    if errors:
        return info, errors
    label_path = paths["label"]
    mismatch = _grid_matches(readers["ct"], readers["label"])
    if mismatch:
        return info, [CaseProblem(case_id, str(label_path), f"label is not on the CT grid: {mismatch}")]
    try:
        label_img = sitk.ReadImage(str(label_path))
    except RuntimeError as exc:
        return info, [CaseProblem(case_id, str(label_path), f"unreadable NIfTI ({exc})")]
    # A view shares the image's buffer: label_img must stay alive while it is used.
    label = sitk.GetArrayViewFromImage(label_img)  # numpy [D, H, W] = (z, y, x)
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            return info, [CaseProblem(case_id, str(label_path), "label holds non-integer values")]
    if label.min() < 0 or label.max() > max(LABEL_VALUES):
        values = np.unique(label)
        bad = [v for v in values.tolist() if v not in LABEL_VALUES]
        return info, [CaseProblem(case_id, str(label_path), f"label values {bad[:5]} outside {list(LABEL_VALUES)}")]
    counts = np.bincount(label.astype(np.int64, copy=False).ravel(), minlength=3)
    info["has_gtvp"] = int(counts[1] > 0)
    info["has_gtvn"] = int(counts[2] > 0)
    # The label is on the CT grid, so only the PET can miss the tumour.
    tumour = tumour_points_mm(label_img, LABEL_VALUES[1:])
    try:
        check_tumour_coverage(readers["pet"], tumour, "PET", min_tumour_coverage)
    except InputCheckError as exc:
        return info, [CaseProblem(case_id, str(paths["pet"]), f"{exc} (label {label_path})")]
    return info, []


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


def _relpath(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _int_column(values: pd.Series) -> pd.Series:
    """Whole numbers as nullable ``Int64`` (so the CSV says ``1``, not ``1.0``)."""
    numeric = pd.to_numeric(values, errors="coerce")
    finite = numeric.dropna()
    if len(finite) and np.all(finite == np.round(finite)):
        return numeric.round().astype("Int64")
    return numeric


def _format_errors(errors: Sequence[CaseProblem]) -> str:
    lines = [str(e) for e in errors[:_MAX_LISTED]]
    more = len(errors) - len(lines)
    tail = f"\n... and {more} more problem(s)" if more > 0 else ""
    hint = "\n(use continue_on_error / --continue-on-error to skip bad cases and write a report)"
    return "\n".join(lines) + tail + hint


def write_error_report(errors: Sequence[CaseProblem], path: str | os.PathLike) -> None:
    """Write ``errors`` as a CSV with columns ``case_id,file,error`` (atomically)."""
    table = pd.DataFrame([(e.case_id, e.file, e.error) for e in errors], columns=list(ERROR_REPORT_COLUMNS))
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def default_error_report(manifest_path: str | os.PathLike) -> Path:
    """Default error report beside a manifest: ``<stem>.errors.csv``."""
    return Path(manifest_path).with_suffix(".errors.csv")


def manifest_sidecar_path(manifest_path: str | os.PathLike) -> Path:
    """Provenance record written beside a manifest: ``<stem>.json``."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_suffix(".json")


def check_manifest_absent(manifest_path: str | os.PathLike) -> None:
    """Refuse to replace an existing manifest or its provenance record.

    Raises:
        FileExistsError: naming the file and the ``--overwrite`` option.
    """
    for path in (Path(manifest_path), manifest_sidecar_path(manifest_path)):
        if path.exists():
            raise FileExistsError(
                f"{path} exists; pass --overwrite (overwrite=True) to replace it, or write the manifest elsewhere"
            )


def build_manifest(
    root: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    checksums: bool = True,
    continue_on_error: bool = False,
    error_report: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = True,
    min_tumour_coverage: float = MIN_TUMOUR_COVERAGE,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Validate a HECKTOR 2022 training root and write its manifest.

    Writes ``manifest_path`` (columns :data:`pipeline.manifest.MANIFEST_COLUMNS`, image
    paths relative to the manifest's folder) and a provenance record
    :func:`manifest_sidecar_path` (CSV sha256s, parameters, code version, and the demo
    cohort's ``seed``/``n_cases`` when ``root`` holds a ``demo_cohort.json``).

    Args:
        root: the training root (``imagesTr/``, ``labelsTr/``, the two CSVs).
        manifest_path: where to write the manifest CSV.
        checksums: compute each image's SHA-256 (``False`` leaves the columns empty).
        continue_on_error: leave bad cases out and write an error report instead of raising.
        error_report: report path; default :func:`default_error_report`
            (``data_manifest.csv`` -> ``data_manifest.errors.csv``). Only written
            with ``continue_on_error`` (always then, header-only when nothing was wrong).
        workers: threads that read images in parallel.
        progress: show a tqdm progress bar.
        min_tumour_coverage: least share of each case's tumour voxels inside its PET field
            of view, in [0, 1] (a case below is a problem like any other).
        overwrite: replace an existing manifest (or its provenance record); off, so a
            committed manifest is never rewritten by accident.

    Returns:
        The manifest as written (relative paths, ``RangeIndex``), sorted by case id.

    Raises:
        FileExistsError: the manifest or its record exists and ``overwrite`` is off.
        HecktorFormatError: any problem, unless ``continue_on_error`` (then only
            whole-file problems, or when no valid case is left). Nothing is written.
    """
    root = Path(root).resolve()
    manifest_path = Path(manifest_path)
    _check_build_args(root, manifest_path, overwrite=overwrite, min_tumour_coverage=min_tumour_coverage)
    clinical_file, endpoint_file = root / CLINICAL_CSV, root / ENDPOINT_CSV
    clinical, errors = parse_clinical(clinical_file)
    endpoint, endpoint_errors = parse_endpoint_if_present(endpoint_file)
    errors += endpoint_errors
    errors += _endpoint_without_clinical(root, endpoint_file, clinical, endpoint, errors)
    if errors and not continue_on_error:
        raise HecktorFormatError(_format_errors(errors), errors)

    case_ids = sorted(set(clinical.index) - {e.case_id for e in errors})
    _warn_orphan_images(root, clinical, errors)

    infos = _inspect_cases(
        root,
        case_ids,
        errors,
        checksums=checksums,
        workers=workers,
        progress=progress,
        min_tumour_coverage=min_tumour_coverage,
    )
    if errors and not continue_on_error:
        raise HecktorFormatError(_format_errors(errors), errors)

    good = [cid for cid in case_ids if cid in infos]
    _warn_task2_mismatch(clinical, endpoint, good)
    if not good:
        if continue_on_error:
            _write_report(errors, error_report, manifest_path)
        raise HecktorFormatError(
            f"{root}: no valid case (clinical CSV {clinical_file})" + (f"\n{_format_errors(errors)}" if errors else ""),
            errors,
        )
    manifest = _assemble(root, manifest_path, good, clinical, endpoint, infos)
    write_manifest(manifest, manifest_path)
    if continue_on_error:
        _write_report(errors, error_report, manifest_path)
    _write_sidecar(
        root,
        manifest_path,
        manifest,
        checksums=checksums,
        n_skipped=len({e.case_id for e in errors}),
        min_tumour_coverage=min_tumour_coverage,
    )
    log.info("manifest %s: %d cases, %d problem(s)", manifest_path, len(manifest), len(errors))
    return manifest


def _check_build_args(root: Path, manifest_path: Path, *, overwrite: bool, min_tumour_coverage: float) -> None:
    """:func:`build_manifest`'s checks before reading anything: no manifest to replace (unless
    ``overwrite``), a coverage share in [0, 1] and an existing root."""
    if not overwrite:
        check_manifest_absent(manifest_path)
    if not 0.0 <= float(min_tumour_coverage) <= 1.0:
        raise ValueError(f"min_tumour_coverage must be a share in [0, 1], got {min_tumour_coverage}")
    if not root.is_dir():
        raise HecktorFormatError(f"{root}: HECKTOR root not found")


def _warn_orphan_images(root: Path, clinical: pd.DataFrame, errors: Sequence[CaseProblem]) -> None:
    """Warn about the image sets of ``imagesTr/`` without a clinical row (ids already bad excepted)."""
    image_ids = {p.name.split("__")[0] for p in (root / IMAGES_DIR).glob("*__CT.nii.gz")}
    orphans = sorted(image_ids - set(clinical.index) - {e.case_id for e in errors})
    if orphans:
        log.warning(
            "%d image set(s) without a clinical row are ignored: %s%s",
            len(orphans),
            ", ".join(orphans[:5]),
            " ..." if len(orphans) > 5 else "",
        )


def _endpoint_without_clinical(
    root: Path, endpoint_file: Path, clinical: pd.DataFrame, endpoint: pd.DataFrame, errors: Sequence[CaseProblem]
) -> list[CaseProblem]:
    """A problem for each endpoint row without a clinical row (ids already bad excepted).

    Ids with a problem in either CSV are out, even if the other CSV is fine.
    """
    bad = {e.case_id for e in errors if e.case_id}
    out = []
    for cid in endpoint.index.difference(clinical.index):
        if cid in bad:
            continue
        missing = [str(p) for p in case_paths(root, cid).values() if not p.is_file()]
        what = f"endpoint row has no images (missing {missing[0]})" if missing else "endpoint row has no clinical row"
        out.append(CaseProblem(cid, str(endpoint_file), what))
    return out


def _inspect_cases(
    root: Path,
    case_ids: Sequence[str],
    errors: list[CaseProblem],
    *,
    checksums: bool,
    workers: int,
    progress: bool,
    min_tumour_coverage: float,
) -> dict[str, dict[str, Any]]:
    """:func:`inspect_case` of every case in threads: the good cases' information.

    The problems found are appended to ``errors``.
    """

    def work(cid: str) -> tuple[str, dict[str, Any], list[CaseProblem]]:
        info, errs = inspect_case(
            cid, case_paths(root, cid), checksums=checksums, min_tumour_coverage=min_tumour_coverage
        )
        return cid, info, errs

    infos: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for cid, info, errs in tqdm(
            pool.map(work, case_ids), total=len(case_ids), desc="reading cases", unit="case", disable=not progress
        ):
            if errs:
                errors += errs
            else:
                infos[cid] = info
    return infos


def _warn_task2_mismatch(clinical: pd.DataFrame, endpoint: pd.DataFrame, good: Sequence[str]) -> None:
    """Harmless inconsistencies of real releases (489 Task 2 cases, 488 endpoint rows): keep
    the endpoint CSV as the truth for has_endpoint, but say so."""
    task2 = clinical.loc[good, "task2"] == 1
    no_endpoint = [cid for cid in task2[task2].index if cid not in endpoint.index]
    not_task2 = [cid for cid in task2[~task2].index if cid in endpoint.index]
    if no_endpoint:
        log.warning("%d Task 2 case(s) have no endpoint row: %s", len(no_endpoint), ", ".join(no_endpoint[:5]))
    if not_task2:
        log.warning(
            "%d case(s) with an endpoint row are not flagged Task 2: %s", len(not_task2), ", ".join(not_task2[:5])
        )


def _write_report(errors: Sequence[CaseProblem], error_report: str | os.PathLike | None, manifest_path: Path) -> None:
    path = Path(error_report) if error_report else default_error_report(manifest_path)
    write_error_report(errors, path)


def _assemble(
    root: Path,
    manifest_path: Path,
    case_ids: list[str],
    clinical: pd.DataFrame,
    endpoint: pd.DataFrame,
    infos: dict[str, dict[str, Any]],
) -> pd.DataFrame:
    base = manifest_path.resolve().parent
    table = clinical.loc[case_ids].copy().reset_index(drop=True)
    for kind in ("ct", "pet", "label"):
        table[f"{kind}_path"] = [_relpath(case_paths(root, cid)[kind], base) for cid in case_ids]
        table[f"{kind}_sha256"] = [infos[cid][f"{kind}_sha256"] for cid in case_ids]
    table["has_endpoint"] = [int(cid in endpoint.index) for cid in case_ids]
    ep = endpoint.reindex(case_ids)
    table["relapse"] = ep["relapse"].to_numpy()
    table["rfs_days"] = ep["rfs_days"].to_numpy()
    table["has_gtvp"] = [infos[cid]["has_gtvp"] for cid in case_ids]
    table["has_gtvn"] = [infos[cid]["has_gtvn"] for cid in case_ids]
    for col in (
        "center_id",
        "task1",
        "task2",
        "relapse",
        "rfs_days",
        "age",
        "tobacco",
        "alcohol",
        "performance_status",
        "hpv_status",
        "surgery",
        "chemotherapy",
    ):
        table[col] = _int_column(table[col])
    table["weight"] = pd.to_numeric(table["weight"])
    return table.loc[:, list(MANIFEST_COLUMNS)]


def _write_sidecar(
    root: Path,
    manifest_path: Path,
    manifest: pd.DataFrame,
    *,
    checksums: bool,
    n_skipped: int,
    min_tumour_coverage: float,
) -> None:
    params = {
        "checksums": checksums,
        "label_values": list(LABEL_VALUES),
        "min_tumour_coverage": float(min_tumour_coverage),
    }
    record: dict[str, Any] = {
        "kind": "hecktor_manifest",
        "manifest": manifest_path.name,
        "manifest_sha256": sha256_file(manifest_path),
        "source_root": _relpath(root, manifest_path.resolve().parent),
        "clinical_csv_sha256": sha256_file(root / CLINICAL_CSV),
        "endpoint_csv_sha256": sha256_file(root / ENDPOINT_CSV) if (root / ENDPOINT_CSV).exists() else None,
        "endpoints": "from the endpoint file"
        if (root / ENDPOINT_CSV).exists()
        else f"none: the root has no {ENDPOINT_CSV}; endpoint columns empty (prediction only)",
        "params": params,
        "params_hash": params_hash(params),
        "n_cases": int(len(manifest)),
        "n_events": int(pd.to_numeric(manifest["relapse"]).fillna(0).sum()),
        "n_skipped_cases": int(n_skipped),
        "code_version": code_version(),
        "created": utc_now(),
    }
    demo = root / "demo_cohort.json"
    if demo.is_file():
        meta = read_json(demo)
        record["demo_cohort"] = {
            k: meta[k] for k in ("seed", "n_cases", "generator_version", "spacing_scale", "environment") if k in meta
        }
    write_json_atomic(manifest_sidecar_path(manifest_path), record)


def summarize_manifest(manifest: pd.DataFrame) -> dict[str, int]:
    """Counts for a one-line summary: cases, endpoint cases, events, centres."""
    relapse = pd.to_numeric(manifest["relapse"], errors="coerce").fillna(0)
    return {
        "cases": int(len(manifest)),
        "with_endpoint": int(pd.to_numeric(manifest["has_endpoint"]).sum()),
        "events": int(relapse.sum()),
        "centres": int(manifest["center_id"].nunique()),
    }
