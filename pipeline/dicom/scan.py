"""Find every DICOM file under a folder and group it by patient and series, by tags only.

File and folder names carry no meaning: a file is DICOM if pydicom reads its header, and it
belongs where its ``PatientID``, ``SeriesInstanceUID`` and ``Modality`` say. Each file is
parsed once, with its large values (pixel data, long contour lists) deferred: pydicom reads
them from the file when first used, so the pixels of the chosen series are read once, by
:mod:`pipeline.dicom.volume`, and released after use.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.dicom.errors import DicomImportError


#: Values larger than this (bytes) are read from the file only when used.
DEFER_SIZE = 4096


@dataclass
class Series:
    """The files of one series (one ``SeriesInstanceUID``) of one patient.

    Attributes:
        uid: SeriesInstanceUID. modality: its Modality (CT, PT, RTSTRUCT, SEG, ...).
        headers: one pydicom dataset per file (large values deferred); ``filename`` is set.
    """

    uid: str
    modality: str
    headers: list[pydicom.Dataset] = field(default_factory=list)

    @property
    def frame_of_reference(self) -> str:
        return str(self.headers[0].get("FrameOfReferenceUID", ""))

    @property
    def description(self) -> str:
        return str(self.headers[0].get("SeriesDescription", ""))

    def summary(self) -> str:
        """``UID (CT, 59 files, "description")`` for messages."""
        desc = f', "{self.description}"' if self.description else ""
        return f"{self.uid} ({self.modality}, {len(self.headers)} file(s){desc})"


def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except (InvalidDicomError, EOFError, IsADirectoryError):
        return None
    except OSError as exc:
        raise DicomImportError(f"{path}: unreadable ({exc})") from None
    if "SOPInstanceUID" not in ds or "Modality" not in ds:
        return None  # a DICOMDIR or another non-image object
    return ds


def scan_folder(src: str | os.PathLike) -> dict[str, dict[str, Series]]:
    """Every DICOM file under ``src``: ``{PatientID: {SeriesInstanceUID: Series}}``.

    Non-DICOM files (CSVs, READMEs, DICOMDIR) are skipped. A SOP instance UID seen twice is
    refused (the same image exported twice would give duplicate slices).

    Raises:
        DicomImportError: no DICOM file at all, a file without PatientID or
            SeriesInstanceUID, or a repeated SOPInstanceUID (both files named).
    """
    src = Path(src)
    patients: dict[str, dict[str, Series]] = defaultdict(dict)
    seen: dict[str, Path] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        ds = _read_header(path)
        if ds is None:
            continue
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            raise DicomImportError(f"SOPInstanceUID {sop} is in two files: {seen[sop]} and {path}")
        seen[sop] = path
        pid, uid = str(ds.get("PatientID", "")).strip(), str(ds.get("SeriesInstanceUID", ""))
        if not pid or not uid:
            missing = "PatientID" if not pid else "SeriesInstanceUID"
            raise DicomImportError(f"{path}: no {missing}; every file must name its patient and series")
        series = patients[pid].setdefault(uid, Series(uid, str(ds.Modality)))
        series.headers.append(ds)
    if not patients:
        raise DicomImportError(f"{src}: no DICOM file found")
    return dict(patients)
