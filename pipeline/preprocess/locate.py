"""Tumour location (step 2) and the per-case extent behind the global crop G (step 3)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.cache import GridGeometry
from pipeline.preprocess.grid import centred_grid, direction_scale_matrix, even_ceil, geometry_of
from pipeline.preprocess.params import PreprocessParams
from pipeline.preprocess.resample import sitk_resample

# --------------------------------------------------------------------------- tumour centre


@dataclass(frozen=True)
class TumourLocation:
    """Where the tumour is, and how big a crop it needs (x, y, z order, millimetres).

    Attributes:
        centre_mm_xyz: the crop centre (refined on the resampled mask).
        native_centre_mm_xyz: the centre measured on the native label grid.
        centre_source: ``"centroid"`` or ``"bbox_centre"`` (fallback, see module doc) for
            the refined centre, or ``"native"`` when the refined mask was empty.
        extent_vox_xyz: 2 x largest centre-to-voxel-edge distance, in crop voxels.
        crop_size_vox_xyz: ``extent_vox_xyz`` rounded up to even integers.
        n_voxels: tumour voxels on the native label grid.
        volume_ml: tumour volume on the native label grid, millilitres.
    """

    centre_mm_xyz: tuple[float, float, float]
    native_centre_mm_xyz: tuple[float, float, float]
    centre_source: str
    extent_vox_xyz: tuple[float, float, float]
    crop_size_vox_xyz: tuple[int, int, int]
    n_voxels: int
    volume_ml: float


def _tumour_points(image: sitk.Image, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tumour voxels of a label image.

    Returns:
        ``(idx, block, offset)``: tumour voxel indices ``[N, 3]`` (x, y, z, float64), the
        boolean tumour mask ``[D, H, W]`` of the bounding block of all positive labels,
        and that block's first index (x, y, z).
    """
    arr = sitk.GetArrayViewFromImage(image)
    # Bounding block of positive labels from two max-reductions, so the label test and
    # np.nonzero run on the block only (a 512 x 512 x 150 label is mostly background).
    z_any = np.flatnonzero(arr.reshape(arr.shape[0], -1).max(axis=1) > 0)
    if len(z_any) == 0:
        return np.zeros((0, 3)), np.zeros((0, 0, 0), bool), np.zeros(3, np.int64)
    z0, z1 = z_any[0], z_any[-1] + 1
    plane = arr[z0:z1].max(axis=0) > 0
    y_any, x_any = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    y0, y1, x0, x1 = y_any[0], y_any[-1] + 1, x_any[0], x_any[-1] + 1
    block = arr[z0:z1, y0:y1, x0:x1]
    wanted = np.asarray(labels, dtype=block.dtype if block.dtype.kind in "iu" else None)
    mask = np.isin(block, wanted)
    offset = np.array([x0, y0, z0], dtype=np.int64)
    zyx = np.nonzero(mask)
    return np.stack(zyx[::-1], axis=1).astype(np.float64) + offset, mask, offset


def _centre_of(idx: np.ndarray, mask: np.ndarray, offset: np.ndarray, geom: GridGeometry) -> tuple[np.ndarray, str]:
    """Centroid of tumour voxels, or bbox centre when the centroid's voxel is not tumour."""
    m = direction_scale_matrix(geom)
    origin = np.asarray(geom.origin_xyz, np.float64)
    centroid_idx = idx.mean(axis=0)
    nearest = np.floor(centroid_idx + 0.5).astype(np.int64) - offset
    shape_xyz = np.asarray(mask.shape[::-1])
    inside = bool(np.all(nearest >= 0) and np.all(nearest < shape_xyz))
    if inside and mask[nearest[2], nearest[1], nearest[0]]:
        return origin + m @ centroid_idx, "centroid"
    bbox_idx = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    return origin + m @ bbox_idx, "bbox_centre"


def _extent_vox(
    idx: np.ndarray,
    geom: GridGeometry,
    centre: np.ndarray,
    direction: Sequence[float],
    spacing_xyz: Sequence[float],
) -> np.ndarray:
    """2 x max distance from ``centre`` to a tumour voxel's far edge, per axis of
    ``direction``, in voxels of ``spacing_xyz``."""
    d = np.asarray(direction, np.float64).reshape(3, 3)
    m = direction_scale_matrix(geom)
    r = np.abs(d.T @ m)
    if np.all((r > 1e-9 * r.max()).sum(axis=1) == 1):
        # Label axes parallel to the crop axes: the extremes lie on the index bbox corners.
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        idx = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    pts = idx @ m.T + np.asarray(geom.origin_xyz, np.float64)
    q = (pts - centre) @ d  # coordinates along the crop axes
    half_voxel = 0.5 * np.abs(d.T @ m).sum(axis=1)
    return 2.0 * (np.abs(q).max(axis=0) + half_voxel) / np.asarray(spacing_xyz, np.float64)


def locate_tumour(
    label: sitk.Image,
    ct_direction: Sequence[float],
    params: PreprocessParams,
    *,
    case_id: str = "",
    label_path: str | os.PathLike = "",
) -> TumourLocation:
    """Tumour centre and needed crop size of one case (steps 2-3).

    Args:
        label: label image (any integer labels; ``params.tumour_labels`` form the tumour).
        ct_direction: the CT direction (9 values, row-major); the crop axes.
        params: preprocessing parameters (``tumour_labels``, ``spacing_mm_xyz``).
        case_id: named in errors.
        label_path: named in errors.

    Returns:
        The :class:`TumourLocation`.

    Raises:
        ValueError: when the label holds no voxel of ``params.tumour_labels``.
    """
    geom = geometry_of(label)
    idx, mask, offset = _tumour_points(label, params.tumour_labels)
    if len(idx) == 0:
        found = np.unique(sitk.GetArrayViewFromImage(label)).tolist()[:10]
        raise ValueError(
            f"case {case_id!r}: label file {label_path} has no voxel with tumour labels "
            f"{list(params.tumour_labels)} (values found: {found}); the crop needs a tumour"
        )
    native_centre, _ = _centre_of(idx, mask, offset, geom)
    volume_ml = float(len(idx) * np.prod(geom.spacing_xyz) / 1000.0)

    # Refine on the mask resampled (nearest) onto a crop-spacing grid around the tumour.
    extent = _extent_vox(idx, geom, native_centre, ct_direction, params.spacing_mm_xyz)
    size = [even_ceil(e) + 2 for e in extent]
    ref_grid = centred_grid(native_centre, size, params.spacing_mm_xyz, ct_direction)
    resampled = sitk_resample(label, ref_grid, linear=False, default=0, pixel_type=label.GetPixelID())
    r_idx, r_mask, r_offset = _tumour_points(resampled, params.tumour_labels)
    if len(r_idx):
        centre, source = _centre_of(r_idx, r_mask, r_offset, ref_grid)
    else:
        centre, source = native_centre, "native"
    extent = _extent_vox(idx, geom, centre, ct_direction, params.spacing_mm_xyz)
    return TumourLocation(
        centre_mm_xyz=tuple(float(v) for v in centre),
        native_centre_mm_xyz=tuple(float(v) for v in native_centre),
        centre_source=source,
        extent_vox_xyz=tuple(float(v) for v in extent),
        crop_size_vox_xyz=tuple(even_ceil(e) for e in extent),
        n_voxels=int(len(idx)),
        volume_ml=volume_ml,
    )
