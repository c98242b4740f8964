"""RT Structure Set contours -> a label mask on the CT grid.

Boundary rule (the one rasterisation rule of the project): a voxel belongs to an ROI when
its centre lies inside the ROI's polygons on that slice under the **even-odd rule**, taken
across all polygons of the ROI on the slice (so a polygon inside another is a hole, and
several polygons per slice are several islands). A centre exactly on an edge counts as
inside on the polygon's left (lower x) and lower-y edges and outside on the others
(half-open intervals), so two polygons sharing an edge never both claim a voxel. Several
ROIs mapped to one label are united; an ROI matching two ``--label`` rules is refused,
and where ROIs of two labels overlap the lower label keeps the voxels, with a warning.

A contour belongs to the CT slice nearest to its plane; one more than half a slice away from
every slice, or not parallel to the slices, is left out with a warning. Structure sets are
matched to the CT by ``FrameOfReferenceUID`` only: references to SOP instance UIDs that are
not in the export (common after anonymisation) are a warning, not a refusal.

Layouts: contour points are patient coordinates (mm, LPS); they are mapped to continuous
voxel indices (x, y, z) of the CT; the mask is numpy (z, y, x).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.volume import Geometry

#: Default ``--label`` rules: HECKTOR's own ROI names (case-insensitive regular expressions).
DEFAULT_LABELS: dict[int, str] = {1: r"^GTV_?p", 2: r"^GTV_?n"}


@dataclass
class Roi:
    """One ROI of a structure set: name, number, and its closed planar contours (Nx3 mm)."""

    name: str
    number: int
    file: str
    contours: list[np.ndarray] = field(default_factory=list)
    skipped_types: list[str] = field(default_factory=list)
    #: The FrameOfReferenceUID its contours are defined in (see :func:`roi_frame`).
    frame: str = ""

    def mask(self, geometry: Geometry, warnings: list[str]) -> np.ndarray:
        return roi_mask(self, geometry, warnings)


def read_rois(ds: pydicom.Dataset) -> list[Roi]:
    """Every ROI of an RTSTRUCT with its CLOSED_PLANAR contours (other types listed).

    A header scanned with deferred values is read again in full first (one parse instead of
    one file access per long contour).
    """
    if isinstance(getattr(ds, "filename", None), str):
        ds = pydicom.dcmread(ds.filename)
    rois = {
        int(r.ROINumber): Roi(str(r.ROIName), int(r.ROINumber), str(ds.filename), frame=roi_frame(ds, r))
        for r in ds.get("StructureSetROISequence", [])
    }
    for item in ds.get("ROIContourSequence", []):
        roi = rois.get(int(item.ReferencedROINumber))
        if roi is None:
            continue
        for c in item.get("ContourSequence", []):
            kind = str(c.get("ContourGeometricType", ""))
            if kind != "CLOSED_PLANAR":
                roi.skipped_types.append(kind)
                continue
            roi.contours.append(np.asarray(c.ContourData, dtype=np.float64).reshape(-1, 3))
    return list(rois.values())


def roi_frame(ds: pydicom.Dataset, roi: pydicom.Dataset) -> str:
    """The frame of reference an ROI's contours are defined in: its own
    ``ReferencedFrameOfReferenceUID`` (required by the standard), else the structure set's one
    referenced frame, else the file's ``FrameOfReferenceUID``; ``""`` when none is said."""
    if "ReferencedFrameOfReferenceUID" in roi:
        return str(roi.ReferencedFrameOfReferenceUID)
    referenced = {
        str(f.FrameOfReferenceUID)
        for f in ds.get("ReferencedFrameOfReferenceSequence", [])
        if "FrameOfReferenceUID" in f
    }
    if len(referenced) == 1:
        return referenced.pop()
    return str(ds.get("FrameOfReferenceUID", ""))


def check_placeable(
    by_label: dict[int, list[Any]], rules: dict[int, str], ct_frame: str, accepted_frames: set[str], patient: str
) -> None:
    """Refuse what cannot be placed on the CT: an ROI (or segment) mapped to a label whose
    frame of reference is neither the CT's nor one the user vouched for (``--accept-frame``),
    and an ROI without contour data.

    Raises:
        DicomImportError: naming the ROI, its file, its frame and the CT's.
    """
    for value, rois in sorted(by_label.items()):
        for roi in rois:
            frame = getattr(roi, "frame", "")
            if frame != ct_frame and frame not in accepted_frames:
                raise DicomImportError(
                    f"patient {patient}: ROI {roi.name!r} (label {value}, {roi.file}) is defined in frame of "
                    f"reference {frame or '(none given)'}, the CT in {ct_frame}: its contours cannot be placed "
                    "on the CT. If both frames are the same patient space (one scanner session, a registration "
                    f"applied before export), pass --accept-frame {frame or 'UID'} (recorded in the provenance)"
                )
            if isinstance(roi, Roi) and not roi.contours:
                extra = (
                    f" ({len(roi.skipped_types)} contour(s) of type {sorted(set(roi.skipped_types))} only)"
                    if roi.skipped_types
                    else ""
                )
                raise DicomImportError(
                    f"patient {patient}: ROI {roi.name!r} (label {value}, rule {rules[value]!r}, {roi.file}) has no "
                    f"closed planar contour data{extra}: it would give an empty label; fix the structure set or "
                    "make the --label pattern leave it out"
                )


def merge_warnings(by_label: dict[int, list[Any]], rules: dict[int, str]) -> list[str]:
    """One warning per label that several ROIs (or segments) were united into."""
    return [
        f"label {value} (rule {rules[value]!r}) unites {len(rois)} ROIs: "
        f"{', '.join(repr(r.name) for r in rois)}; if they are not one tumour, give each a --label rule "
        "of its own (e.g. an exact name: ^NAME$)"
        for value, rois in sorted(by_label.items())
        if len(rois) > 1
    ]


def match_labels(rois: list[Any], rules: dict[int, str], patient: str) -> dict[int, list[Any]]:
    """ROIs (or SEG segments: anything with ``name`` and ``mask``) per label by the rules
    (``re.search``, case-insensitive).

    Raises:
        DicomImportError: no ROI matches any rule (the ROI names found are listed), or one
            ROI matches two rules.
    """
    found: dict[int, list[Roi]] = {label: [] for label in rules}
    for roi in rois:
        hits = [label for label, pattern in rules.items() if re.search(pattern, roi.name, re.IGNORECASE)]
        if len(hits) > 1:
            raise DicomImportError(
                f"patient {patient}: ROI {roi.name!r} matches the rules of labels {hits}; "
                "make the --label patterns exclusive"
            )
        if hits:
            found[hits[0]].append(roi)
    if not any(found.values()):
        names = sorted({f"{r.name!r}" for r in rois})
        rules_text = ", ".join(f"{k}={v}" for k, v in rules.items())
        raise DicomImportError(
            f"patient {patient}: no ROI matches the --label rules ({rules_text}); ROI names "
            f"found: {', '.join(names) or 'none'}"
        )
    return found


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of polygons (each Kx2, continuous (x, y) voxel indices) at voxel centres.

    Scanline parity: every edge crossing row ``y = j`` (half-open in y) at ``x`` toggles the
    columns ``i >= x``; a voxel is inside when toggled an odd number of times.

    Returns:
        bool (rows, columns) = (y, x).
    """
    rows, cols = shape
    toggles = np.zeros((rows, cols + 1), dtype=np.int32)
    for poly in polygons:
        a, b = poly, np.roll(poly, -1, axis=0)
        lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
        first = np.clip(np.ceil(lo), 0, rows).astype(np.int64)
        last = np.clip(np.ceil(hi), 0, rows).astype(np.int64)  # exclusive
        count = last - first
        keep = count > 0
        if not keep.any():
            continue
        edge = np.repeat(np.flatnonzero(keep), count[keep])
        start = np.repeat(first[keep], count[keep])
        row = start + np.arange(edge.size) - np.repeat(np.cumsum(count[keep]) - count[keep], count[keep])
        t = (row - a[edge, 1]) / (b[edge, 1] - a[edge, 1])
        x = a[edge, 0] + t * (b[edge, 0] - a[edge, 0])
        col = np.clip(np.ceil(x), 0, cols).astype(np.int64)
        np.add.at(toggles, (row, col), 1)
    return (np.cumsum(toggles, axis=1)[:, :cols] % 2).astype(bool)


def roi_mask(roi: Roi, geometry: Geometry, warnings: list[str]) -> np.ndarray:
    """Mask (z, y, x) of one ROI on the grid (see the module doc for the rules)."""
    nx, ny, nz = geometry.size
    to_index = np.linalg.inv(geometry.direction * np.asarray(geometry.spacing))
    per_slice: dict[int, list[np.ndarray]] = {}
    off = 0
    for pts in roi.contours:
        idx = (pts - geometry.origin) @ to_index.T
        k = int(np.round(idx[:, 2].mean()))
        if np.ptp(idx[:, 2]) > 0.1 or not 0 <= k < nz or abs(idx[:, 2].mean() - k) > 0.5:
            off += 1
            continue
        per_slice.setdefault(k, []).append(idx[:, :2])
    if off:
        warnings.append(f"ROI {roi.name!r}: {off} contour(s) off the CT slices or not parallel to them were left out")
    if roi.skipped_types:
        warnings.append(
            f"ROI {roi.name!r}: {len(roi.skipped_types)} contour(s) not CLOSED_PLANAR "
            f"({sorted(set(roi.skipped_types))}) were left out"
        )
    mask = np.zeros((nz, ny, nx), dtype=bool)
    for k, polys in per_slice.items():
        mask[k] = fill_polygons(polys, (ny, nx))
    return mask


def label_mask(by_label: dict[int, list[Any]], geometry: Geometry, warnings: list[str]) -> np.ndarray:
    """uint8 label (z, y, x): each label's ROIs (or segments) united; where labels overlap the
    lower one keeps the voxels, with a warning.

    Raises:
        DicomImportError: an ROI or segment that covers no voxel.
    """
    nx, ny, nz = geometry.size
    label = np.zeros((nz, ny, nx), dtype=np.uint8)
    for value in sorted(by_label):
        for roi in by_label[value]:
            mask = roi.mask(geometry, warnings)
            if not mask.any():
                raise DicomImportError(
                    f"ROI {roi.name!r} (label {value}, {roi.file}) covers no voxel of the CT "
                    "(every contour off its slices or smaller than a voxel)"
                )
            clash = mask & (label != 0) & (label != value)
            if clash.any():
                warnings.append(
                    f"ROI {roi.name!r} (label {value}) overlaps an earlier label in "
                    f"{int(clash.sum())} voxel(s); the earlier label is kept"
                )
                mask &= ~clash
            label[mask] = value
    return label
