"""One CT or PET series -> a SimpleITK image in physical (LPS) coordinates.

Geometry comes from the headers only: ``ImageOrientationPatient`` (row and column
direction cosines), ``PixelSpacing`` (row spacing = y, column spacing = x),
``ImagePositionPatient``. Slices are sorted by their position along the slice normal
``n = row x column`` (never by file name or InstanceNumber); the image's axes are
(row direction, column direction, n), so its direction matrix is right-handed and the
slice spacing is measured from the positions, not read from ``SliceThickness``.

Layouts: pixel data is (rows = y, columns = x) per slice; the stacked array is numpy
(z, y, x), which ``sitk.GetImageFromArray`` turns into an image indexed (x, y, z).

Refused, naming patient, series and the figure: mixed orientations, in-plane sizes or
spacings; duplicate slices (two at one position); a missing slice (a gap of about a whole
multiple of the spacing); uneven spacing beyond :data:`SPACING_TOLERANCE`; slices not stacked
along the normal (gantry tilt); multi-frame objects; fewer than two slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.dicom.errors import DicomImportError

#: Largest deviation of a slice gap from the median gap: max(0.01 mm, 1 % of the gap).
SPACING_TOLERANCE = (0.01, 0.01)
#: Largest difference of two slices' direction cosines to count as one orientation.
ORIENTATION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Sorted slice order and the grid of a series (mm, LPS)."""

    order: np.ndarray  # indices into the header list, along the normal
    origin: np.ndarray  # ImagePositionPatient of the first sorted slice
    direction: np.ndarray  # 3x3, columns = row dir, column dir, normal
    spacing: tuple[float, float, float]  # x, y, z
    size: tuple[int, int, int]  # x, y, z


def _where(patient: str, headers: list[pydicom.Dataset]) -> str:
    return f"patient {patient}, series {headers[0].get('SeriesInstanceUID', '?')} ({headers[0].get('Modality', '?')})"


def _same(headers: list[pydicom.Dataset], key: str, where: str, tol: float = 0.0) -> np.ndarray:
    """The value of ``key`` shared by every header, or a refusal naming the values seen."""
    missing = [h.filename for h in headers if key not in h or h[key].value in (None, "")]
    if missing:
        raise DicomImportError(f"{where}: tag {key} missing in {len(missing)} file(s), e.g. {missing[0]}")
    values = np.array([[float(v) for v in np.atleast_1d(h[key].value)] for h in headers])
    spread = np.abs(values - values[0]).max(axis=0)
    if np.any(spread > tol):
        distinct = sorted({tuple(np.round(v, 6)) for v in values})[:4]
        what = "orientations" if key == "ImageOrientationPatient" else f"{key} values"
        raise DicomImportError(f"{where}: mixed {what} across slices: {distinct}")
    return values[0]


def slice_geometry(headers: list[pydicom.Dataset], patient: str) -> Geometry:
    """Sort the slices along the normal and check that they form one even grid."""
    where = _where(patient, headers)
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise DicomImportError(f"{where}: multi-frame images are not supported (NumberOfFrames > 1)")
    if len(headers) < 2:
        raise DicomImportError(f"{where}: {len(headers)} slice; a volume needs at least 2")
    iop = _same(headers, "ImageOrientationPatient", where, ORIENTATION_TOLERANCE)
    rows, cols = int(_same(headers, "Rows", where)[0]), int(_same(headers, "Columns", where)[0])
    pixel = _same(headers, "PixelSpacing", where, 1e-6)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    pos, along = pos[order], along[order]
    _check_gaps(along, [headers[i].filename for i in order], where)
    inplane = (pos - pos[0]) @ np.column_stack([row_dir, col_dir])
    if np.abs(inplane).max() > max(0.01, 0.01 * float(pixel.min())):
        raise DicomImportError(
            f"{where}: slices are not stacked along their normal (in-plane shift up to "
            f"{np.abs(inplane).max():.3f} mm; gantry tilt is not supported)"
        )
    dz = float(np.median(np.diff(along)))
    return Geometry(
        order=order,
        origin=pos[0],
        direction=np.column_stack([row_dir, col_dir, normal]),
        spacing=(float(pixel[1]), float(pixel[0]), dz),
        size=(cols, rows, len(headers)),
    )


def _check_gaps(along: np.ndarray, files: list[str], where: str) -> None:
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DicomImportError(
            f"{where}: duplicate slices at position {along[i]:.3f} mm along the normal "
            f"({files[i]} and {files[i + 1]}); {dup.size} duplicate(s) in all"
        )
    step = float(np.median(gaps))
    tol = max(SPACING_TOLERANCE[0], SPACING_TOLERANCE[1] * step)
    bad = np.flatnonzero(np.abs(gaps - step) > tol)
    if not bad.size:
        return
    i = int(bad[0])
    ratio = gaps[i] / step
    if ratio > 1.5 and abs(ratio - round(ratio)) * step <= tol:
        raise DicomImportError(
            f"{where}: {round(ratio) - 1} missing slice(s) between positions "
            f"{along[i]:.3f} and {along[i + 1]:.3f} mm (gap {gaps[i]:.3f} mm, spacing "
            f"{step:.3f} mm)"
        )
    raise DicomImportError(
        f"{where}: uneven slice spacing: gap of {gaps[i]:.3f} mm at {along[i]:.3f} mm "
        f"against a median of {step:.3f} mm (tolerance {tol:.3f} mm)"
    )


def read_pixels(headers: list[pydicom.Dataset], geometry: Geometry, where: str, scale: float = 1.0) -> np.ndarray:
    """``scale x (stored value x RescaleSlope + RescaleIntercept)`` per slice, as (z, y, x).

    Whole-number slopes and intercepts with ``scale`` 1 (CT in HU) give int16 (float32 where a
    value falls outside int16); anything else float32, computed per slice in float64. The
    pixel data of each header is decoded once and then dropped from it, so a scanned folder
    does not hold every image in memory.
    """
    slices = [headers[i] for i in geometry.order]
    rescale = [
        (float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)) for ds in slices
    ]
    integral = scale == 1.0 and all(a == round(a) and b == round(b) for a, b in rescale)
    out = np.empty(geometry.size[::-1], dtype=np.int16 if integral else np.float32)
    for z, (ds, (slope, intercept)) in enumerate(zip(slices, rescale)):
        try:
            stored = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds; name the file
            syntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", "?")
            raise DicomImportError(
                f"{where}: pixel data of {ds.filename} unreadable (transfer syntax {syntax}): {exc}"
            ) from None
        if integral:
            values = np.multiply(stored, int(slope), dtype=np.int32) + int(intercept)
            if out.dtype == np.int16 and (values.min() < -32768 or values.max() > 32767):
                out = out.astype(np.float32)
            out[z] = values
        else:
            out[z] = (stored * slope + intercept) * scale
        del ds.PixelData
    return out


def to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of ``array`` (z, y, x) on ``geometry``."""
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetSpacing(geometry.spacing)
    image.SetDirection(tuple(float(v) for v in geometry.direction.ravel()))
    return image
