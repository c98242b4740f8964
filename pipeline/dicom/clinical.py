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

Case ids: the ``PatientID`` as it is when it is a safe file name (letters, digits, ``.``,
``-``, ``_``, no ``__``), else refused, naming ``--pseudonymise``. With pseudonyms the cases
are ``P0001, P0002, ...`` in the order of the sorted PatientIDs, and the mapping
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
    return {"Gender": sex if sex in ("M", "F") else "", "Age": age if not math.isnan(age) else age_years(pet),
            "Weight": float(weight) if weight not in (None, "") else math.nan}


def case_ids(patient_ids: list[str], pseudonymise: bool) -> dict[str, str]:
    """PatientID -> case id (see the module doc)."""
    ordered = sorted(patient_ids)
    if pseudonymise:
        return {pid: f"P{i:04d}" for i, pid in enumerate(ordered, start=1)}
    for pid in ordered:
        if not _SAFE_ID.match(pid) or "__" in pid:
            raise DicomImportError(f"PatientID {pid!r} cannot name files (letters, digits, '.', '-', '_', "
                                   "no '__'); pass --pseudonymise to use P0001-style case ids")
    return {pid: pid for pid in ordered}


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "NaN"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def clinical_rows(headers: dict[str, dict[str, Any]], ids: dict[str, str], extra: dict[str, dict[str, str]],
                  endpoint_ids: set[str], center_id: int | None) -> list[list[str]]:
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
        cells: dict[str, Any] = {"Task 1": 1, "Task 2": int(pid in endpoint_ids),
                                 "CenterID": center_id if center_id is not None else "", **headers[pid]}
        for col, value in extra.get(pid, {}).items():
            if col in _MERGED and str(value).strip() not in ("", "NaN", "nan"):
                cells[col] = str(value).strip()
        if cells["CenterID"] in ("", None):
            raise DicomImportError(f"patient {pid}: no CenterID; give --center-id or a CenterID column in --clinical")
        rows.append([ids[pid]] + [_cell(cells.get(col, "")) for col in CLINICAL_HEADER[1:]])
    return rows
