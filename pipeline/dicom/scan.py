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
from collections.abc import Iterable
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


def _walk(src: Path, links: dict[str, int]) -> list[Path]:
    """Every file under ``src``, following symbolic links to folders and files (each real
    folder once, so a link loop ends); counts links followed and broken ones in ``links``."""
    files, seen_dirs = [], set()
    for top, dirs, names in os.walk(src, followlinks=True):
        real = os.path.realpath(top)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        for d in dirs:
            if os.path.islink(os.path.join(top, d)):
                links["folders"] += 1
        for name in names:
            path = Path(top) / name
            if path.is_symlink():
                if not path.exists():
                    links["broken"] += 1
                    continue
                links["files"] += 1
            if path.is_file():
                files.append(path)
    return files


def scan_folder(
    src: str | os.PathLike | Iterable[str | os.PathLike], notes: list[str] | None = None
) -> dict[str, dict[str, Series]]:
    """Every DICOM file under ``src`` (one folder or several): ``{PatientID: {SeriesInstanceUID: Series}}``.

    Symbolic links to folders and files are followed (an export is often a folder of links);
    how many is said in ``notes``. A file reached twice (through a link and directly, or from
    two sources) is read once. Non-DICOM files (CSVs, READMEs, DICOMDIR) are skipped. A SOP
    instance UID seen in two different files is refused (the same image exported twice would
    give duplicate slices).

    Raises:
        DicomImportError: no DICOM file at all (with the links followed and broken ones
            counted), a file without PatientID or SeriesInstanceUID, or a repeated
            SOPInstanceUID (both files named).
    """
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    patients: dict[str, dict[str, Series]] = defaultdict(dict)
    seen: dict[str, Path] = {}
    read: set[str] = set()
    links = {"folders": 0, "files": 0, "broken": 0}
    n_files = 0
    for folder in sources:
        for path in sorted(_walk(folder, links)):
            real = os.path.realpath(path)
            if real in read:
                continue
            read.add(real)
            n_files += 1
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
    followed = links["folders"] + links["files"]
    said = f"followed {links['folders']} symbolic link(s) to folders and {links['files']} to files" if followed else ""
    if links["broken"]:
        said += ("; " if said else "") + f"{links['broken']} broken symbolic link(s) skipped"
    if notes is not None and said:
        notes.append(said)
    if not patients:
        where = ", ".join(str(s) for s in sources)
        raise DicomImportError(
            f"{where}: no DICOM file found ({n_files} file(s) read"
            + (f"; {said}" if said else "; no symbolic link found")
            + ")"
        )
    return dict(patients)
