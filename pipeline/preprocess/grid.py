"""Grids in physical space: the crop grid centred on the tumour and its size-only resizings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from pipeline.cache import GridGeometry

# --------------------------------------------------------------------------- geometry


def even_ceil(x: float, eps: float = 1e-6) -> int:
    """Smallest even integer >= ``x`` (``eps`` absorbs float noise, e.g. 40.0000001 -> 40)."""
    n = math.ceil(x - eps)
    return max(2, n + (n % 2))


def geometry_of(image: sitk.Image) -> GridGeometry:
    """The :class:`GridGeometry` of a SimpleITK image."""
    return GridGeometry(
        origin_xyz=tuple(image.GetOrigin()),
        spacing_xyz=tuple(image.GetSpacing()),
        direction=tuple(image.GetDirection()),
        size_xyz=tuple(image.GetSize()),
    )


def direction_scale_matrix(geom: GridGeometry) -> np.ndarray:
    """Index (x, y, z) -> physical offset: ``direction @ diag(spacing)``."""
    d = np.asarray(geom.direction, dtype=np.float64).reshape(3, 3)
    return d @ np.diag(np.asarray(geom.spacing_xyz, dtype=np.float64))


def centred_grid(
    centre_mm_xyz: Sequence[float],
    size_xyz: Sequence[int],
    spacing_xyz: Sequence[float],
    direction: Sequence[float],
) -> GridGeometry:
    """A grid whose physical box is centred on ``centre_mm_xyz``.

    The centre is at continuous index ``(size - 1) / 2`` on every axis, so for even sizes
    it lies on the boundary between the two middle voxels.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    half = (np.asarray(size_xyz, dtype=np.float64) - 1.0) / 2.0
    spacing = np.asarray(spacing_xyz, np.float64)
    origin = np.asarray(centre_mm_xyz, np.float64) - d @ (spacing * half)
    return GridGeometry(
        origin_xyz=tuple(float(v) for v in origin),
        spacing_xyz=tuple(float(v) for v in spacing_xyz),
        direction=tuple(float(v) for v in direction),
        size_xyz=tuple(int(v) for v in size_xyz),
    )


def resized_grid(grid: GridGeometry, size_xyz: Sequence[int]) -> GridGeometry:
    """Same physical box as ``grid`` with ``size_xyz`` voxels (voxel-centre convention).

    ``spacing' = size * spacing / size'``; ``origin' = origin + direction @ ((spacing' -
    spacing) / 2)``: the outer voxel edges of both grids coincide.
    """
    sp = np.asarray(grid.spacing_xyz, np.float64)
    new_sp = np.asarray(grid.size_xyz, np.float64) * sp / np.asarray(size_xyz, np.float64)
    d = np.asarray(grid.direction, np.float64).reshape(3, 3)
    origin = np.asarray(grid.origin_xyz, np.float64) + d @ ((new_sp - sp) / 2.0)
    return GridGeometry(
        origin_xyz=tuple(float(v) for v in origin),
        spacing_xyz=tuple(float(v) for v in new_sp),
        direction=tuple(grid.direction),
        size_xyz=tuple(int(v) for v in size_xyz),
    )
