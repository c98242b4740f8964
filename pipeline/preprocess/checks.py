"""Input checks before any resampling: finite voxels, PET tumour coverage, crop coverage."""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.cache import GridGeometry
from pipeline.preprocess.grid import direction_scale_matrix
from pipeline.preprocess.locate import _tumour_points

# --------------------------------------------------------------------------- input checks

#: Default least share of the tumour (its label voxels) inside the PET field of view.
MIN_TUMOUR_COVERAGE = 0.95
#: Default least share of the crop inside the CT field of view, and inside the PET's.
MIN_CROP_COVERAGE = 0.5


class InputCheckError(ValueError):
    """An input image fails a check (field of view, non-finite voxels); the message says
    which check, the measured figure and the option that sets its limit."""


def _geometry(image: Any) -> GridGeometry:
    """:class:`GridGeometry` of a SimpleITK image or header reader (or a geometry)."""
    if isinstance(image, GridGeometry):
        return image
    return GridGeometry(
        origin_xyz=tuple(image.GetOrigin()),
        spacing_xyz=tuple(image.GetSpacing()),
        direction=tuple(image.GetDirection()),
        size_xyz=tuple(image.GetSize()),
    )


def grid_points_mm(geom: GridGeometry) -> np.ndarray:
    """Physical centres of every voxel of a grid, ``[N, 3]`` (x, y, z) millimetres."""
    idx = np.indices(tuple(int(v) for v in geom.size_xyz), dtype=np.float64).reshape(3, -1).T
    return idx @ direction_scale_matrix(geom).T + np.asarray(geom.origin_xyz, np.float64)


def tumour_points_mm(label: sitk.Image, labels: Sequence[int]) -> np.ndarray:
    """Physical centres of the tumour voxels (values ``labels``) of a label, ``[N, 3]``."""
    idx, _, _ = _tumour_points(label, labels)
    geom = _geometry(label)
    return idx @ direction_scale_matrix(geom).T + np.asarray(geom.origin_xyz, np.float64)


def fov_share(image: Any, points_mm: np.ndarray) -> float:
    """Share of physical points inside an image's field of view.

    A point is inside when its continuous index lies in ``[-0.5, size - 0.5)`` on every
    axis (ITK's test: outside points get the padding value when resampled).

    Args:
        image: SimpleITK image, header reader or :class:`GridGeometry`.
        points_mm: ``[N, 3]`` (x, y, z) millimetres.

    Returns:
        The share in [0, 1]; 1.0 for no point.
    """
    if len(points_mm) == 0:
        return 1.0
    geom = _geometry(image)
    cont = (np.asarray(points_mm, np.float64) - np.asarray(geom.origin_xyz, np.float64)) @ np.linalg.inv(
        direction_scale_matrix(geom)
    ).T
    size = np.asarray(geom.size_xyz, np.float64)
    return float(np.all((cont >= -0.5) & (cont < size - 0.5), axis=1).mean())


def box_mm(points_mm: np.ndarray) -> str:
    """Axis-aligned physical box of points, e.g. ``x [-3, 40] y [...] z [...] mm``."""
    lo, hi = np.min(points_mm, axis=0), np.max(points_mm, axis=0)
    return " ".join(f"{a} [{lo[i]:.0f}, {hi[i]:.0f}]" for i, a in enumerate("xyz")) + " mm"


def fov_box_mm(image: Any) -> str:
    """Axis-aligned physical box of an image's voxel edges (as :func:`box_mm`)."""
    geom = _geometry(image)
    size = np.asarray(geom.size_xyz, np.float64)
    corners = np.array(
        [[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5) for z in (-0.5, size[2] - 0.5)]
    )
    return box_mm(corners @ direction_scale_matrix(geom).T + np.asarray(geom.origin_xyz, np.float64))


#: NIfTI datatype codes of floating-point data (the only ones that can hold NaN or inf).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK = 1 << 22


def _file_chunks(path: str | os.PathLike, chunk_size: int = _CHUNK):
    """The bytes of a file, decompressed when it ends in ``.gz``, in bounded pieces.

    Raises:
        OSError: a truncated gzip stream; ``zlib.error`` a corrupt one (CRC, data).
    """
    gz = str(path).endswith(".gz")
    decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gz else None
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            if decomp is None:
                yield chunk
                continue
            # Bounded output pieces, so a large volume never sits in memory at once.
            yield decomp.decompress(chunk, chunk_size)
            while decomp.unconsumed_tail:
                yield decomp.decompress(decomp.unconsumed_tail, chunk_size)
    if decomp is not None and not decomp.eof:
        raise OSError("truncated gzip stream")


def _nifti_layout(header: bytes) -> tuple[str, int, int, int]:
    """``(byte order, datatype code, voxel offset, values)`` of a NIfTI-1 or -2 header."""
    for order in "<>":
        if len(header) >= 4 and int(np.frombuffer(header[:4], f"{order}i4")[0]) in (348, 540):
            break
    else:
        raise OSError("not a NIfTI-1/2 header")
    if int(np.frombuffer(header[:4], f"{order}i4")[0]) == 348:
        dim = np.frombuffer(header[40:56], f"{order}i2").astype(np.int64)
        dtype = int(np.frombuffer(header[70:72], f"{order}i2")[0])
        offset = int(np.frombuffer(header[108:112], f"{order}f4")[0])
    else:
        if len(header) < 540:
            raise OSError("truncated NIfTI-2 header")
        dtype = int(np.frombuffer(header[12:14], f"{order}i2")[0])
        dim = np.frombuffer(header[16:80], f"{order}i8")
        offset = int(np.frombuffer(header[168:176], f"{order}i8")[0])
    n_dims = int(dim[0])
    if not 1 <= n_dims <= 7:
        raise OSError(f"NIfTI header with {n_dims} dimensions")
    return order, dtype, offset, int(np.prod(dim[1 : n_dims + 1]))


def nifti_nonfinite_counts(path: str | os.PathLike, *, whole_stream: bool = False) -> tuple[int, int]:
    """NaN and infinite voxels stored in a NIfTI file (``.nii`` or ``.nii.gz``).

    Counted on the file's bytes: ITK's NIfTI reader (SimpleITK) silently replaces NaN and
    inf by 0, so the image it returns cannot show them.

    Args:
        path: the NIfTI file.
        whole_stream: decompress to the end even for integer data (a full gzip check);
            otherwise integer data stops after the header.

    Returns:
        ``(NaN voxels, infinite voxels)``; ``(0, 0)`` for integer data types.

    Raises:
        OSError: not a NIfTI-1/2 file, or a truncated gzip stream; ``zlib.error``: a
            corrupt one.
    """
    chunks = _file_chunks(path)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 540:  # the larger (NIfTI-2) header
            break
    order, dtype, offset, n_values = _nifti_layout(head)
    if dtype not in _NIFTI_FLOATS:
        if whole_stream:
            for _ in chunks:
                pass
        return 0, 0
    item = np.dtype(f"{order}{_NIFTI_FLOATS[dtype]}")
    skip, left, carry = offset, n_values * item.itemsize, b""
    n_nan = n_inf = 0
    for chunk in itertools.chain([head], chunks):
        cut = min(skip, len(chunk))
        data, skip = carry + chunk[cut:], skip - cut
        usable = min(len(data) - len(data) % item.itemsize, left)
        values = np.frombuffer(data, item, count=usable // item.itemsize)
        finite = np.isfinite(values)
        if not finite.all():
            nan = int(np.isnan(values).sum())
            n_nan, n_inf = n_nan + nan, n_inf + int(values.size - finite.sum()) - nan
        carry, left = data[usable:] if left > usable else b"", left - usable
        if not left and not whole_stream:
            return n_nan, n_inf
    if left:
        raise OSError(f"NIfTI data ends {left} bytes early")
    return n_nan, n_inf


def check_file_finite(path: str | os.PathLike, role: str) -> None:
    """Refuse a NIfTI file storing NaN or infinite voxels (other formats: see
    :func:`check_finite`, run on the read image).

    Raises:
        InputCheckError: naming the counts (the caller adds case and file).
        OSError: the file is not a readable NIfTI.
    """
    n_nan, n_inf = nifti_nonfinite_counts(path)
    if n_nan or n_inf:
        raise InputCheckError(nonfinite_message(role, n_nan, n_inf))


def nonfinite_message(role: str, n_nan: int, n_inf: int) -> str:
    """What :func:`check_finite` and :func:`check_file_finite` say (the check, the counts)."""
    return (
        f"finite-voxel check: {role} holds {n_nan + n_inf} non-finite voxel(s) "
        f"({n_nan} NaN, {n_inf} inf), which are no intensity; repair the file or leave "
        "the case out"
    )


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (its voxels can be checked on the file's bytes)."""
    return str(path).endswith((".nii", ".nii.gz"))


def nonfinite_counts(image: sitk.Image) -> tuple[int, int]:
    """``(NaN voxels, infinite voxels)`` of an image; ``(0, 0)`` for integer pixel types."""
    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.floating):
        return 0, 0
    if np.isfinite(arr).all():  # the common case: one pass
        return 0, 0
    n_nan = int(np.isnan(arr).sum())
    return n_nan, int(arr.size - np.isfinite(arr).sum() - n_nan)


def check_finite(image: sitk.Image, role: str) -> None:
    """Refuse an image holding NaN or infinite voxels.

    Raises:
        InputCheckError: naming the counts (the caller adds case and file).
    """
    n_nan, n_inf = nonfinite_counts(image)
    if n_nan or n_inf:
        raise InputCheckError(nonfinite_message(role, n_nan, n_inf))


def check_tumour_coverage(image: Any, tumour_mm: np.ndarray, role: str, minimum: float) -> float:
    """Share of the tumour voxels inside ``image``'s field of view, refused below ``minimum``.

    Args:
        image: the image whose field of view is tested (SimpleITK image or header reader).
        tumour_mm: tumour voxel centres ``[N, 3]`` (:func:`tumour_points_mm`).
        role: ``"PET"`` or ``"CT"``, named in the message.
        minimum: least share, in [0, 1] (``--min-tumour-coverage``).

    Returns:
        The share (1.0 when there is no tumour voxel).

    Raises:
        InputCheckError: below ``minimum``; the message gives the figure and both boxes.
    """
    share = fov_share(image, tumour_mm)
    if share < minimum:
        raise InputCheckError(
            f"tumour coverage check: {role} field of view covers {100 * share:.1f} % of the "
            f"tumour ({len(tumour_mm)} label voxels, centres within {box_mm(tumour_mm)}; "
            f"{role} box {fov_box_mm(image)}), below the {100 * minimum:g} % of "
            f"--min-tumour-coverage; check the {role} header's origin and direction against "
            "the label's"
        )
    return share


def check_crop_coverage(image: Any, crop: GridGeometry, role: str, minimum: float) -> float:
    """Share of a crop (its voxel centres) inside ``image``'s field of view, refused below
    ``minimum``; the rest of the crop would be padding.

    Raises:
        InputCheckError: below ``minimum`` (``--min-crop-coverage``).
    """
    points = grid_points_mm(crop)
    share = fov_share(image, points)
    if share < minimum:
        raise InputCheckError(
            f"crop coverage check: {role} field of view covers {100 * share:.1f} % of the "
            f"crop (box {fov_box_mm(crop)}; {role} box {fov_box_mm(image)}), below the "
            f"{100 * minimum:g} % of --min-crop-coverage; the rest would be padding"
        )
    return share


def check_share(value: float, name: str) -> float:
    """``value`` as a float share in [0, 1]; a ValueError naming ``name`` otherwise."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a share in [0, 1], got {value}")
    return value
