"""DICOM SEG segments -> masks on the CT grid.

A SEG object is one multi-frame image: each frame is one plane of one segment
(``PerFrameFunctionalGroupsSequence``: ``SegmentIdentificationSequence`` names the segment,
``PlanePositionSequence`` the plane's position; orientation and pixel spacing per frame or in
``SharedFunctionalGroupsSequence``). ``BINARY`` frames are 0/1, ``FRACTIONAL`` ones count as
inside at half of ``MaximumFractionalValue`` or more.

Boundary rule, the same as for contours: a CT voxel belongs to a segment when its centre lies
in a set SEG pixel (nearest neighbour: the pixel whose square holds the centre, half-open on
the upper side), on the frame in the CT slice nearest to the frame's plane (frames more than
half a slice away from every CT slice, or not parallel to them, are left out with a warning).
On a SEG drawn on the CT's own grid this gives back its pixels exactly.

Layouts: frame pixel data is (rows = y, columns = x); masks are numpy (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.volume import Geometry


@dataclass
class Segment:
    """One segment of a SEG object (``name`` = SegmentLabel), read lazily from ``file``."""

    name: str
    number: int
    file: str
    #: The SEG's FrameOfReferenceUID (the frame its planes are positioned in).
    frame: str = ""

    def mask(self, geometry: Geometry, warnings: list[str]) -> np.ndarray:
        return segment_mask(self, geometry, warnings)


def read_segments(ds: pydicom.Dataset) -> list[Segment]:
    """The segments a SEG object declares."""
    frame = str(ds.get("FrameOfReferenceUID", ""))
    return [
        Segment(str(s.get("SegmentLabel", s.SegmentNumber)), int(s.SegmentNumber), str(ds.filename), frame)
        for s in ds.get("SegmentSequence", [])
    ]


def _group(ds: pydicom.Dataset, frame: pydicom.Dataset, name: str) -> pydicom.Dataset:
    """A functional group of one frame, else the shared one."""
    if name in frame:
        return frame[name].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and name in shared[0]:
        return shared[0][name].value[0]
    raise DicomImportError(f"{ds.filename}: SEG frame without {name}")


def _frames(ds: pydicom.Dataset) -> np.ndarray:
    """Frames as bool (n, rows, columns)."""
    pixels = ds.pixel_array
    pixels = pixels.reshape(-1, int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        return pixels >= float(ds.get("MaximumFractionalValue", 255)) / 2.0
    return pixels > 0


def _frame_into(mask: np.ndarray, plane: np.ndarray, frame_affine: tuple, geometry: Geometry, off: list[int]) -> None:
    """Sample one frame at the CT voxel centres of its nearest slice (nearest neighbour)."""
    origin, row_dir, col_dir, (dy, dx) = frame_affine
    nx, ny, nz = geometry.size
    to_index = np.linalg.inv(geometry.direction * np.asarray(geometry.spacing))
    ct_index = to_index @ (origin - geometry.origin)
    k = int(np.round(ct_index[2]))
    normal = np.cross(row_dir, col_dir)
    if not 0 <= k < nz or abs(ct_index[2] - k) > 0.5 or abs(abs(normal @ geometry.direction[:, 2]) - 1) > 1e-4:
        off[0] += 1
        return
    jj, ii = np.mgrid[0:ny, 0:nx]
    ct_to_mm = geometry.direction * np.asarray(geometry.spacing)
    points = geometry.origin + np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=1) @ ct_to_mm.T
    rel = points - origin
    col = np.floor(rel @ row_dir / dx + 0.5).astype(np.int64)
    row = np.floor(rel @ col_dir / dy + 0.5).astype(np.int64)
    inside = (col >= 0) & (col < plane.shape[1]) & (row >= 0) & (row < plane.shape[0])
    hit = np.zeros(ii.size, dtype=bool)
    hit[inside] = plane[row[inside], col[inside]]
    mask[k] |= hit.reshape(ny, nx)


def segment_mask(segment: Segment, geometry: Geometry, warnings: list[str]) -> np.ndarray:
    """Mask (z, y, x) of one segment on the CT grid (see the module doc for the rule)."""
    ds = pydicom.dcmread(segment.file)
    frames = _frames(ds)
    nx, ny, nz = geometry.size
    mask = np.zeros((nz, ny, nx), dtype=bool)
    off = [0]
    for i, frame in enumerate(ds.get("PerFrameFunctionalGroupsSequence", [])):
        ident = _group(ds, frame, "SegmentIdentificationSequence")
        if int(ident.ReferencedSegmentNumber) != segment.number or not frames[i].any():
            continue
        iop = [float(v) for v in _group(ds, frame, "PlaneOrientationSequence").ImageOrientationPatient]
        spacing = [float(v) for v in _group(ds, frame, "PixelMeasuresSequence").PixelSpacing]
        ipp = np.array([float(v) for v in _group(ds, frame, "PlanePositionSequence").ImagePositionPatient])
        _frame_into(mask, frames[i], (ipp, np.array(iop[:3]), np.array(iop[3:]), spacing), geometry, off)
    if off[0]:
        warnings.append(
            f"segment {segment.name!r}: {off[0]} frame(s) off the CT slices or not parallel to them were left out"
        )
    return mask
