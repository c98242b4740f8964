"""Clinical rows from DICOM headers, the ``--clinical`` merge, and pseudonyms.

From the headers (the CT's first slice): ``Age`` from ``PatientAge`` (``059Y``; months,
weeks and days as fractions of a year), else whole years between ``PatientBirthDate`` and
``StudyDate``; ``Gender`` from ``PatientSex`` (M/F, anything else empty); ``Weight`` from
``PatientWeight`` (kg, the PET's when the CT has none). ``Task 1`` is 1 (images and
contours), ``Task 2`` 1 when the case has an endpoint row (both describe the written root,
whatever ``--clinical`` says). The other HECKTOR columns are empty unless ``--clinical CSV``
(keyed by ``PatientID``, HECKTOR's column names) gives them; a value in that CSV wins over
the header's. ``CenterID`` comes from the CSV or
``--center-id``.

Columns of ``--clinical`` are HECKTOR's names; any other column is refused, listed, unless
``--clinical-column SRC=NAME`` maps it to a HECKTOR name or ``--ignore-column SRC`` drops it
(:func:`read_clinical`): a value is never dropped in silence. Patients without a row, and rows
without a patient, are named on the console.

Case ids: the ``PatientID`` as it is when it is a safe file name (letters, digits, ``.``,
``-``, ``_``, no ``__``), else refused, naming ``--pseudonymise``. With pseudonyms the cases
are ``<prefix>0001, <prefix>0002, ...`` (``--prefix``, default ``P``) in the order of the
sorted PatientIDs, continuing an existing mapping file: a PatientID already in it keeps its
id, new ones are numbered after the largest id of that prefix there. The mapping
(``case_id,PatientID``) is written only to the file the user names, never into the root.
"""

from __future__ import annotations

import math
import re
from datetime import date
from typing import Any

import pydicom

from pipeline.dicom.errors import DicomImportError
from pipeline.hecktor import CLINICAL_HEADER

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Columns ``--clinical`` may fill; Task 1 and Task 2 say what the written root holds.
_MERGED = tuple(c for c in CLINICAL_HEADER[1:] if c not in ("Task 1", "Task 2"))
_AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.2425}


def age_years(ds: pydicom.Dataset) -> float:
    """Age at the study from PatientAge, else from PatientBirthDate and StudyDate; NaN if neither."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    m = re.fullmatch(r"(\d{1,3})([YMWD])", text)
    if m:
        value = int(m.group(1)) / _AGE_UNITS[m.group(2)]
        return float(value if m.group(2) == "Y" else round(value, 2))
    birth, study = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    try:
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        s = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    except ValueError:
        return math.nan
    return float(s.year - b.year - ((s.month, s.day) < (b.month, b.day)))


def header_row(ct: pydicom.Dataset, pet: pydicom.Dataset) -> dict[str, Any]:
    """HECKTOR clinical fields found in the headers (NaN / empty where DICOM has none)."""
    sex = str(ct.get("PatientSex", "") or pet.get("PatientSex", "") or "").strip().upper()
    weight = ct.get("PatientWeight") or pet.get("PatientWeight")
    age = age_years(ct)
    return {
        "Gender": sex if sex in ("M", "F") else "",
        "Age": age if not math.isnan(age) else age_years(pet),
        "Weight": float(weight) if weight not in (None, "") else math.nan,
    }


def check_prefix(prefix: str) -> str:
    """A pseudonym prefix that can name files (letters, digits, '.', '-', '_', no '__')."""
    if not _SAFE_ID.match(prefix) or "__" in prefix or prefix[-1].isdigit():
        raise DicomImportError(
            f"--prefix {prefix!r} cannot start case ids (letters, digits, '.', '-', '_', "
            "no '__', not ending in a digit)"
        )
    return prefix


def read_mapping(path) -> dict[str, str]:
    """An existing ``case_id,PatientID`` mapping as PatientID -> case id ({} when absent)."""
    import csv
    from pathlib import Path

    path = Path(path) if path is not None else None
    if path is None or not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["case_id", "PatientID"]:
        raise DicomImportError(f"--mapping {path}: not a case_id,PatientID file (header {rows[:1]})")
    out: dict[str, str] = {}
    for row in rows[1:]:
        if len(row) != 2:
            continue
        cid, pid = row[0].strip(), row[1].strip()
        if pid in out or cid in out.values():
            raise DicomImportError(f"--mapping {path}: {pid!r} / {cid!r} appears twice")
        out[pid] = cid
    return out


def next_pseudonyms(
    patient_ids: list[str], existing: dict[str, str], prefix: str = "P", taken: set[str] = frozenset()
) -> dict[str, str]:
    """New pseudonyms for ``patient_ids`` not in ``existing`` (PatientID -> case id), numbered
    after the largest ``<prefix>NNNN`` of ``existing`` and ``taken``, in sorted order."""
    used = set(existing.values()) | set(taken)
    numbers = [int(c[len(prefix) :]) for c in used if c.startswith(prefix) and c[len(prefix) :].isdigit()]
    start = max(numbers, default=0) + 1
    new = [p for p in sorted(patient_ids) if p not in existing]
    return {pid: f"{prefix}{n:04d}" for n, pid in enumerate(new, start=start)}


def case_ids(
    patient_ids: list[str], pseudonymise: bool, existing: dict[str, str] | None = None, prefix: str = "P"
) -> dict[str, str]:
    """PatientID -> case id (see the module doc); ``existing``: a mapping to continue."""
    ordered = sorted(patient_ids)
    if pseudonymise:
        existing = existing or {}
        ids = {p: existing[p] for p in ordered if p in existing}
        return {**ids, **next_pseudonyms(ordered, existing, prefix)}
    for pid in ordered:
        if not _SAFE_ID.match(pid) or "__" in pid:
            raise DicomImportError(
                f"PatientID {pid!r} cannot name files (letters, digits, '.', '-', '_', "
                "no '__'); pass --pseudonymise to use P0001-style case ids"
            )
    return {pid: pid for pid in ordered}


def read_clinical(
    path, column_map: dict[str, str] | None = None, ignore: tuple[str, ...] | list[str] = ()
) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """``--clinical``: PatientID -> {HECKTOR column: value}, and a record of what was done.

    Args:
        path: CSV keyed by ``PatientID``.
        column_map: file column -> HECKTOR column name (``--clinical-column``).
        ignore: file columns to drop on purpose (``--ignore-column``).

    Raises:
        DicomImportError: a column that is neither a HECKTOR name, mapped nor ignored (all
            listed), a mapping to an unknown name, or a mapped / ignored column not in the file.
    """
    from pipeline.hecktor import read_hecktor_csv

    column_map = dict(column_map or {})
    table = read_hecktor_csv(path, ("PatientID",))
    columns = [c for c in table.columns if c != "PatientID"]
    absent = [c for c in list(column_map) + list(ignore) if c not in columns]
    if absent:
        raise DicomImportError(
            f"--clinical {path}: --clinical-column / --ignore-column name column(s) "
            f"{absent} that the file does not have (its columns: {columns})"
        )
    bad = {src: dst for src, dst in column_map.items() if dst not in _MERGED}
    if bad:
        raise DicomImportError(f"--clinical-column {bad}: not HECKTOR clinical columns; the names are {list(_MERGED)}")
    known = set(CLINICAL_HEADER)
    unknown = [c for c in columns if c not in known and c not in column_map and c not in ignore]
    if unknown:
        raise DicomImportError(
            f"--clinical {path}: {len(unknown)} column(s) the import does not know: {unknown}. Map each to a "
            f"HECKTOR column with --clinical-column 'SRC=NAME' (NAME one of {list(_MERGED)}) or drop it with "
            "--ignore-column SRC; nothing is left out in silence"
        )
    renamed = table.rename(columns=column_map)
    targets = [column_map.get(c, c) for c in columns if c not in ignore]
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise DicomImportError(f"--clinical {path}: several columns give {twice}; map or ignore all but one")
    kept = [t for t in targets if t in _MERGED]
    rows = {str(row["PatientID"]).strip(): {c: row[c] for c in kept} for _, row in renamed.iterrows()}
    record = {
        "columns_used": kept,
        "mapped": column_map,
        "ignored": sorted(ignore),
        "not_used": sorted(t for t in targets if t not in _MERGED),
    }
    return rows, record


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "NaN"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def clinical_rows(
    headers: dict[str, dict[str, Any]],
    ids: dict[str, str],
    extra: dict[str, dict[str, str]],
    endpoint_ids: set[str],
    center_id: int | None,
) -> list[list[str]]:
    """Rows of the clinical CSV in :data:`CLINICAL_HEADER` order, one per imported patient.

    Args:
        headers: PatientID -> :func:`header_row`. ids: PatientID -> case id.
        extra: PatientID -> cells of ``--clinical`` (HECKTOR column names).
        endpoint_ids: PatientIDs that have an endpoint row. center_id: ``--center-id``.

    Raises:
        DicomImportError: a patient has no CenterID (neither in ``--clinical`` nor ``--center-id``).
    """
    rows = []
    for pid in sorted(headers, key=lambda p: ids[p]):
        cells: dict[str, Any] = {
            "Task 1": 1,
            "Task 2": int(pid in endpoint_ids),
            "CenterID": center_id if center_id is not None else "",
            **headers[pid],
        }
        for col, value in extra.get(pid, {}).items():
            if col in _MERGED and str(value).strip() not in ("", "NaN", "nan"):
                cells[col] = str(value).strip()
        if cells["CenterID"] in ("", None):
            raise DicomImportError(f"patient {pid}: no CenterID; give --center-id or a CenterID column in --clinical")
        rows.append([ids[pid]] + [_cell(cells.get(col, "")) for col in CLINICAL_HEADER[1:]])
    return rows
