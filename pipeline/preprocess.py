"""PET/CT preprocessing into the preprocessed cache (paper section 3 and appendix A).

Steps (sizes in SimpleITK (x, y, z) order; arrays in numpy/torch ``[D, H, W]`` = (z, y, x)):

1. CT, PET and mask go into one physical frame at ``spacing_mm_xyz`` (1 x 1 x 3 mm) with
   the CT's direction: linear interpolation for images, nearest for the mask, PET straight
   into the CT frame. Only the crop region is ever resampled: the crop's output grid is
   built directly and every native volume is resampled once onto it.
2. Tumour centre (:func:`locate_tumour`): physical centroid of the tumour voxels (labels
   ``tumour_labels``) on the native label grid; then refined = centroid of the mask
   resampled (nearest) onto a 1 x 1 x 3 mm grid centred on the native centroid. At both
   steps the **bounding-box centre replaces the centroid when the voxel nearest to the
   centroid is not tumour** (a non-convex or multi-part mask whose centroid falls in a gap,
   e.g. a primary plus a distant node); the centre then stays central to the whole extent.
   If the refined mask is empty (a tumour thinner than the new slice spacing), the native
   centre is kept. An empty native mask is an error naming the case and label file.
3. Global crop **G** (:func:`compute_crop_size`): per case, the extent needed around the
   centre = 2 x the largest distance, along each CT axis, from the centre to the far edge
   of any native tumour voxel, in voxels of ``spacing_mm_xyz``, rounded up to an **even**
   integer; G = per-axis maximum over the cohort. Because it is measured on native voxel
   edges, a crop of size G around any case's centre contains every tumour voxel whole.
4. Crop grid (:func:`centred_grid`): size G, spacing 1 x 1 x 3 mm, CT direction, origin
   placed so that the physical box is centred on the tumour centre (the centre lies at
   continuous index ``(G - 1) / 2``, the boundary between voxels ``G/2 - 1`` and ``G/2``).
   Outside the native image: images padded with that volume's minimum, mask with 0.
5. Size-only resampling of the crop (:func:`resized_grid`) to ``survival_size_xyz``
   (80 x 80 x 48: PET, CT, mask), ``ctfm_size_xyz`` (128 x 128 x 48: CT) and
   ``petfm_size_xyz`` (128^3: PET). Same physical box (voxel-centre convention, like
   ``align_corners=False``): ``spacing' = G * spacing / n`` and
   ``origin' = origin + direction @ ((spacing' - spacing) / 2)``, so the outer voxel *edges*
   coincide and the tumour centre sits at continuous index ``(n - 1) / 2``. Linear for
   images, nearest for the mask.
6. FM normalisation (:func:`normalise_ct_fm`, :func:`normalise_pet_fm`): CT clip
   [-1000, 2000] HU then (x + 1000) / 3000 -> [0, 1]; PET clip to its own p0.5 / p99.5
   computed over **all voxels of the 128^3 PET-FM input** (the resized crop, padding
   included) then min-max -> [0, 1]; if p99.5 == p0.5 (a constant crop) the output is 0.

The cache stores the survival volumes in physical units (HU, SUV); the survival-network
normalisation, which the paper does not give, is applied at load time by
:func:`survival_input` (see :class:`PreprocessParams` for the choice and why).

Input checks, before any resampling (:class:`InputCheckError`, each message naming the
check, the measured figure and the option setting its limit): no NaN or infinite voxel in
CT or PET (counted on a NIfTI file's bytes, since SimpleITK reads them as 0); the PET field
of view holds at least ``min_tumour_coverage`` (default 95 %) of the tumour's voxels; the CT
and the PET fields of view each hold at least ``min_crop_coverage`` (default 50 %) of the
crop (measured on the survival grid's voxel centres, which sample the crop's box evenly).
A PET whose header places it away from the CT would otherwise give an all-padding PET
crop without a word. The limits decide acceptance only, so they are not part of
:class:`PreprocessParams` (nor of its hash); the measured shares are per-case attributes.

Two passes (:func:`preprocess_cohort`): pass 1 reads only the labels and measures G; pass 2
writes one HDF5 per case through :func:`pipeline.cache.write_case` (atomic), in parallel,
skipping cases whose file already holds the same fingerprint and passed the input checks
under the current limits; ``cohort.json`` is written last, only when every case succeeded.
New patients reuse a training cache's G and parameters through ``reference_cache``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipeline.artefacts import code_version, params_hash, sha256_file, utc_now
from pipeline.cache import (
    COHORT_FILE,
    GridGeometry,
    PreprocessedCache,
    case_file,
    case_fingerprint,
    write_case,
    write_cohort_record,
)
from pipeline.manifest import read_manifest
from pipeline.pool import Job, JobFailed, JobPool

log = logging.getLogger(__name__)

#: Channel order of :func:`survival_input` (``[C, D, H, W]``).
SURVIVAL_CHANNELS: tuple[str, ...] = ("pet", "ct")

#: Datasets of one case in the cache, in write order.
CASE_DATASETS: tuple[str, ...] = (
    "survival/pet", "survival/ct", "survival/mask", "ctfm/ct", "petfm/pet",
)

BACKENDS = ("sitk", "torch")


class CaseError(ValueError):
    """Preprocessing of one case failed; the message names the case and its files."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class PreprocessParams:
    """Every preprocessing parameter (paper defaults); hashed into the cache provenance.

    Sizes and spacings are SimpleITK (x, y, z) order: the last entry is the slice axis.

    Attributes:
        spacing_mm_xyz: resampling spacing of the crop (step 1).
        survival_size_xyz: survival-network input size (step 5). The paper network is
            built for the default; the demo's smaller size (:mod:`pipeline.demo`) goes with
            its narrow network (``train-survival --preset demo``).
        ctfm_size_xyz: CT-FM input size.
        petfm_size_xyz: PET-FM input size.
        tumour_labels: label values that form the tumour (1 = GTVp, 2 = GTVn).
        ct_fm_window_hu: CT-FM clip window, mapped to [0, 1].
        pet_fm_percentiles: PET-FM clip percentiles, mapped to [0, 1].
        survival_ct_window_hu: survival-network CT window, mapped linearly to [-1, 1].
            Not in the paper: [-1024, 1024] keeps soft tissue, bone and air apart
            while bounding the input.
        survival_pet_window_suv: survival-network PET clip in SUV (not in the paper).
        survival_pet_scale_suv: divisor applied after the PET clip, so SUV 5 -> 1 and the
            default range is [0, 5]. PET stays on an **absolute** SUV scale because uptake
            level is prognostic; per-case z-scoring or min-max would erase it.
        crop_size_vox_xyz: the global crop G (even, voxels at ``spacing_mm_xyz``); ``None``
            until measured on a cohort, or copied from a reference cache.
    """

    spacing_mm_xyz: tuple[float, float, float] = (1.0, 1.0, 3.0)
    survival_size_xyz: tuple[int, int, int] = (80, 80, 48)
    ctfm_size_xyz: tuple[int, int, int] = (128, 128, 48)
    petfm_size_xyz: tuple[int, int, int] = (128, 128, 128)
    tumour_labels: tuple[int, ...] = (1, 2)
    ct_fm_window_hu: tuple[float, float] = (-1000.0, 2000.0)
    pet_fm_percentiles: tuple[float, float] = (0.5, 99.5)
    survival_ct_window_hu: tuple[float, float] = (-1024.0, 1024.0)
    survival_pet_window_suv: tuple[float, float] = (0.0, 25.0)
    survival_pet_scale_suv: float = 5.0
    crop_size_vox_xyz: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        def setf(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        setf("spacing_mm_xyz", _floats(self.spacing_mm_xyz, 3, "spacing_mm_xyz"))
        if min(self.spacing_mm_xyz) <= 0:
            raise ValueError(f"spacing_mm_xyz must be positive, got {self.spacing_mm_xyz}")
        for name in ("survival_size_xyz", "ctfm_size_xyz", "petfm_size_xyz"):
            value = _ints(getattr(self, name), 3, name)
            if min(value) < 2:
                raise ValueError(f"{name} must be >= 2 per axis, got {value}")
            setf(name, value)
        labels = tuple(int(v) for v in self.tumour_labels)
        if not labels or any(v <= 0 for v in labels) or len(set(labels)) != len(labels):
            raise ValueError(
                f"tumour_labels must be distinct positive label values, got {self.tumour_labels}"
            )
        setf("tumour_labels", tuple(sorted(labels)))
        for name in ("ct_fm_window_hu", "pet_fm_percentiles", "survival_ct_window_hu",
                     "survival_pet_window_suv"):
            lo, hi = _floats(getattr(self, name), 2, name)
            if not lo < hi:
                raise ValueError(f"{name} must be (low, high) with low < high, got {(lo, hi)}")
            setf(name, (lo, hi))
        lo, hi = self.pet_fm_percentiles
        if lo < 0 or hi > 100:
            raise ValueError(f"pet_fm_percentiles must lie in [0, 100], got {(lo, hi)}")
        setf("survival_pet_scale_suv", float(self.survival_pet_scale_suv))
        if self.survival_pet_scale_suv <= 0:
            raise ValueError(
                f"survival_pet_scale_suv must be positive, got {self.survival_pet_scale_suv}"
            )
        if self.crop_size_vox_xyz is not None:
            g = _ints(self.crop_size_vox_xyz, 3, "crop_size_vox_xyz")
            if any(v < 2 or v % 2 for v in g):
                raise ValueError(f"crop_size_vox_xyz must be even and >= 2 per axis, got {g}")
            setf("crop_size_vox_xyz", g)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every parameter (lists for tuples), for provenance."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessParams:
        """Inverse of :meth:`as_dict` (e.g. ``cohort.json`` ``params``).

        Raises:
            ValueError: on a key this version does not know (so a cache made with other
                settings is never read with silently different ones).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing parameters {unknown}; known: {sorted(known)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kwargs)

    def hash(self) -> str:
        """:func:`pipeline.artefacts.params_hash` of :meth:`as_dict` (G included)."""
        return params_hash(self.as_dict())


def _floats(value: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {n} finite numbers, got {value!r}")
    return out


def _ints(value: Any, n: int, name: str) -> tuple[int, ...]:
    vals = _floats(value, n, name)
    if any(v != int(v) for v in vals):
        raise ValueError(f"{name} must be {n} integers, got {value!r}")
    return tuple(int(v) for v in vals)


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


def _matrix(geom: GridGeometry) -> np.ndarray:
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


def _tumour_points(
    image: sitk.Image, labels: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _centre_of(
    idx: np.ndarray, mask: np.ndarray, offset: np.ndarray, geom: GridGeometry
) -> tuple[np.ndarray, str]:
    """Centroid of tumour voxels, or bbox centre when the centroid's voxel is not tumour."""
    m = _matrix(geom)
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
    idx: np.ndarray, geom: GridGeometry, centre: np.ndarray, direction: Sequence[float],
    spacing_xyz: Sequence[float],
) -> np.ndarray:
    """2 x max distance from ``centre`` to a tumour voxel's far edge, per axis of
    ``direction``, in voxels of ``spacing_xyz``."""
    d = np.asarray(direction, np.float64).reshape(3, 3)
    m = _matrix(geom)
    r = np.abs(d.T @ m)
    if np.all((r > 1e-9 * r.max()).sum(axis=1) == 1):
        # Label axes parallel to the crop axes: the extremes lie on the index bbox corners.
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        idx = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    pts = idx @ m.T + np.asarray(geom.origin_xyz, np.float64)
    q = (pts - centre) @ d  # coordinates along the crop axes
    half_voxel = 0.5 * np.abs(d.T @ m).sum(axis=1)
    return 2.0 * (np.abs(q).max(axis=0) + half_voxel) / np.asarray(spacing_xyz, np.float64)


def _sitk_resample(
    image: sitk.Image, grid: GridGeometry, *, linear: bool, default: float,
    pixel_type: int | None = None,
) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(grid.origin_xyz)
    f.SetOutputSpacing(grid.spacing_xyz)
    f.SetOutputDirection(grid.direction)
    f.SetSize([int(v) for v in grid.size_xyz])
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(float(default))
    # Linear output must be float: resampling an int16 CT into int16 would round HU.
    f.SetOutputPixelType(sitk.sitkFloat32 if pixel_type is None else pixel_type)
    return f.Execute(image)


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
    resampled = _sitk_resample(label, ref_grid, linear=False, default=0,
                               pixel_type=label.GetPixelID())
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
    return GridGeometry(origin_xyz=tuple(image.GetOrigin()), spacing_xyz=tuple(image.GetSpacing()),
                        direction=tuple(image.GetDirection()), size_xyz=tuple(image.GetSize()))


def grid_points_mm(geom: GridGeometry) -> np.ndarray:
    """Physical centres of every voxel of a grid, ``[N, 3]`` (x, y, z) millimetres."""
    idx = np.indices(tuple(int(v) for v in geom.size_xyz), dtype=np.float64).reshape(3, -1).T
    return idx @ _matrix(geom).T + np.asarray(geom.origin_xyz, np.float64)


def tumour_points_mm(label: sitk.Image, labels: Sequence[int]) -> np.ndarray:
    """Physical centres of the tumour voxels (values ``labels``) of a label, ``[N, 3]``."""
    idx, _, _ = _tumour_points(label, labels)
    geom = _geometry(label)
    return idx @ _matrix(geom).T + np.asarray(geom.origin_xyz, np.float64)


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
    cont = (np.asarray(points_mm, np.float64) - np.asarray(geom.origin_xyz, np.float64)) \
        @ np.linalg.inv(_matrix(geom)).T
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
    corners = np.array([[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5)
                        for z in (-0.5, size[2] - 0.5)])
    return box_mm(corners @ _matrix(geom).T + np.asarray(geom.origin_xyz, np.float64))


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
    return order, dtype, offset, int(np.prod(dim[1:n_dims + 1]))


def nifti_nonfinite_counts(path: str | os.PathLike, *, whole_stream: bool = False
                           ) -> tuple[int, int]:
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
    return (f"finite-voxel check: {role} holds {n_nan + n_inf} non-finite voxel(s) "
            f"({n_nan} NaN, {n_inf} inf), which are no intensity; repair the file or leave "
            "the case out")


def _is_nifti(path: str | os.PathLike) -> bool:
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
            "the label's")
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
            f"{100 * minimum:g} % of --min-crop-coverage; the rest would be padding")
    return share


def _check_share(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a share in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------- normalisation


def normalise_ct_fm(ct_hu: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """CT-FM input: clip to ``ct_fm_window_hu`` then min-max to [0, 1] (float32)."""
    lo, hi = params.ct_fm_window_hu
    return ((np.clip(ct_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_pet_fm(
    pet_suv: np.ndarray, params: PreprocessParams
) -> tuple[np.ndarray, tuple[float, float]]:
    """PET-FM input: clip to the volume's own percentiles then min-max to [0, 1].

    Args:
        pet_suv: the PET-FM volume (all its voxels, padding included, set the percentiles).
        params: ``pet_fm_percentiles``.

    Returns:
        ``(normalised float32 array, (p_low, p_high) in SUV)``; all zeros when
        ``p_high == p_low`` (a constant crop has no contrast to scale).
    """
    p_lo, p_hi = (float(v) for v in np.percentile(pet_suv, params.pet_fm_percentiles))
    if not p_hi > p_lo:
        return np.zeros(pet_suv.shape, np.float32), (p_lo, p_hi)
    # float64 so the clipped ends map to exactly 0 and 1.
    out = (np.clip(pet_suv.astype(np.float64), p_lo, p_hi) - p_lo) / (p_hi - p_lo)
    return out.astype(np.float32), (p_lo, p_hi)


def survival_input(arrays: Mapping[str, np.ndarray], params: PreprocessParams) -> np.ndarray:
    """Survival-network input ``[C, D, H, W]`` float32, channels :data:`SURVIVAL_CHANNELS`.

    PET: ``clip(SUV, *survival_pet_window_suv) / survival_pet_scale_suv`` (absolute SUV
    scale kept, default range [0, 5]); CT: ``survival_ct_window_hu`` mapped linearly to
    [-1, 1].

    Args:
        arrays: ``"survival/pet"`` (SUV) and ``"survival/ct"`` (HU), each ``[D, H, W]``
            as read from the cache.
        params: the cache's parameters (:meth:`PreprocessParams.from_dict`).

    Raises:
        ValueError: when a dataset is missing or the shapes differ.
    """
    missing = [k for k in ("survival/pet", "survival/ct") if k not in arrays]
    if missing:
        raise ValueError(f"survival_input: missing datasets {missing}")
    pet = np.asarray(arrays["survival/pet"], dtype=np.float32)
    ct = np.asarray(arrays["survival/ct"], dtype=np.float32)
    if pet.ndim != 3 or pet.shape != ct.shape:
        raise ValueError(
            f"survival_input: PET {pet.shape} and CT {ct.shape} must both be [D, H, W] and equal"
        )
    p_lo, p_hi = params.survival_pet_window_suv
    pet_n = np.clip(pet, p_lo, p_hi) / params.survival_pet_scale_suv
    c_lo, c_hi = params.survival_ct_window_hu
    ct_n = (np.clip(ct, c_lo, c_hi) - c_lo) / (c_hi - c_lo) * 2.0 - 1.0
    channels = {"pet": pet_n, "ct": ct_n}
    return np.stack([channels[c] for c in SURVIVAL_CHANNELS]).astype(np.float32)


# --------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    """One preprocessed case, ready for :func:`pipeline.cache.write_case`.

    Attributes:
        arrays: dataset name -> ``[D, H, W]`` array (:data:`CASE_DATASETS`).
        geometry: group (``survival``, ``ctfm``, ``petfm``) -> grid geometry.
        crop_geometry: the size-G crop grid at ``spacing_mm_xyz``.
        location: the tumour location used for the crop.
        attrs: per-case attributes (without provenance, added by the caller).
        crop: the size-G crop arrays (``ct``, ``pet``, ``mask``), only with ``keep_crop``.
    """

    arrays: dict[str, np.ndarray]
    geometry: dict[str, GridGeometry]
    crop_geometry: GridGeometry
    location: TumourLocation
    attrs: dict[str, Any]
    crop: dict[str, np.ndarray] = field(default_factory=dict)


def preprocess_case(
    ct: sitk.Image,
    pet: sitk.Image,
    label: sitk.Image,
    params: PreprocessParams,
    *,
    case_id: str = "",
    label_path: str | os.PathLike = "",
    backend: str = "sitk",
    device: str = "cpu",
    keep_crop: bool = False,
    min_tumour_coverage: float = MIN_TUMOUR_COVERAGE,
    min_crop_coverage: float = MIN_CROP_COVERAGE,
) -> CaseResult:
    """Steps 1-6 for one case, with the global crop ``params.crop_size_vox_xyz``.

    Before any resampling the inputs are checked: no NaN or infinite voxel in CT or PET,
    the PET field of view holds at least ``min_tumour_coverage`` of the tumour voxels, and
    the CT and PET fields of view each hold at least ``min_crop_coverage`` of the crop.

    Args:
        ct: CT in HU (any pixel type), its own grid.
        pet: PET in SUV, its own grid (resampled into the CT frame).
        label: tumour labels (normally on the CT grid; any grid works, it is resampled
            in physical space).
        params: parameters; ``crop_size_vox_xyz`` must be set.
        case_id: named in errors and logs.
        label_path: named in errors.
        backend: ``"sitk"`` (SimpleITK ``ResampleImageFilter``) or ``"torch"``
            (:func:`pipeline.resample_torch.resample_to_grid`). The tumour location is
            always measured with SimpleITK so both backends use the same centre.
        device: torch device for the ``"torch"`` backend.
        keep_crop: also return the size-G crop arrays.
        min_tumour_coverage: least share of the tumour voxels inside the PET field of view.
        min_crop_coverage: least share of the crop inside the CT, and the PET, field of view.

    Returns:
        The :class:`CaseResult`; ``attrs`` carries the measured shares
        (``pet_tumour_coverage``, ``ct_crop_coverage``, ``pet_crop_coverage``).

    Raises:
        InputCheckError: an input check fails (message: which check, the figure, the
            option setting its limit).
        ValueError: unknown backend, missing crop size or empty mask (naming the case).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if params.crop_size_vox_xyz is None:
        raise ValueError("preprocess_case: params.crop_size_vox_xyz (G) is not set")
    min_tumour_coverage = _check_share(min_tumour_coverage, "min_tumour_coverage")
    min_crop_coverage = _check_share(min_crop_coverage, "min_crop_coverage")
    check_finite(ct, "CT")
    check_finite(pet, "PET")
    loc = locate_tumour(label, ct.GetDirection(), params, case_id=case_id, label_path=label_path)
    crop = centred_grid(loc.centre_mm_xyz, params.crop_size_vox_xyz, params.spacing_mm_xyz,
                        ct.GetDirection())
    grids = {
        "survival": resized_grid(crop, params.survival_size_xyz),
        "ctfm": resized_grid(crop, params.ctfm_size_xyz),
        "petfm": resized_grid(crop, params.petfm_size_xyz),
    }
    # The survival grid samples the crop's box evenly: enough to measure its coverage.
    coverage = {
        "pet_tumour_coverage": check_tumour_coverage(
            pet, tumour_points_mm(label, params.tumour_labels), "PET", min_tumour_coverage),
        "ct_crop_coverage": check_crop_coverage(ct, grids["survival"], "CT", min_crop_coverage),
        "pet_crop_coverage": check_crop_coverage(pet, grids["survival"], "PET",
                                                 min_crop_coverage),
    }
    ct_min = float(sitk.GetArrayViewFromImage(ct).min())
    pet_min = float(sitk.GetArrayViewFromImage(pet).min())
    labels = np.asarray(params.tumour_labels)

    if backend == "sitk":
        ct_c = _sitk_resample(ct, crop, linear=True, default=ct_min)
        pet_c = _sitk_resample(pet, crop, linear=True, default=pet_min)
        lab_c = _sitk_resample(label, crop, linear=False, default=0, pixel_type=label.GetPixelID())
        mask_arr = np.isin(sitk.GetArrayViewFromImage(lab_c), labels).astype(np.uint8)
        mask_c = sitk.GetImageFromArray(mask_arr)
        mask_c.CopyInformation(lab_c)

        def arr(img: sitk.Image) -> np.ndarray:
            return sitk.GetArrayFromImage(img)

        out = {
            "survival/pet": arr(_sitk_resample(pet_c, grids["survival"], linear=True,
                                               default=pet_min)),
            "survival/ct": arr(_sitk_resample(ct_c, grids["survival"], linear=True,
                                              default=ct_min)),
            "survival/mask": arr(_sitk_resample(mask_c, grids["survival"], linear=False, default=0,
                                                pixel_type=sitk.sitkUInt8)),
            "ctfm/ct": arr(_sitk_resample(ct_c, grids["ctfm"], linear=True, default=ct_min)),
            "petfm/pet": arr(_sitk_resample(pet_c, grids["petfm"], linear=True, default=pet_min)),
        }
        crop_arrays = {"ct": arr(ct_c), "pet": arr(pet_c), "mask": arr(mask_c)} if keep_crop else {}
    else:
        out, crop_arrays = _torch_case(ct, pet, label, crop, grids, ct_min, pet_min, labels,
                                       device, keep_crop)

    out["ctfm/ct"] = normalise_ct_fm(out["ctfm/ct"], params)
    out["petfm/pet"], pet_fm_range = normalise_pet_fm(out["petfm/pet"], params)
    out["survival/mask"] = out["survival/mask"].astype(np.uint8)
    for name in ("survival/pet", "survival/ct"):
        out[name] = out[name].astype(np.float32, copy=False)

    g = np.asarray(params.crop_size_vox_xyz)
    fits = bool(np.all(np.asarray(loc.crop_size_vox_xyz) <= g))
    attrs = {
        "center_mm_xyz": np.asarray(loc.centre_mm_xyz),
        "native_center_mm_xyz": np.asarray(loc.native_centre_mm_xyz),
        "center_source": loc.centre_source,
        "tumour_volume_ml": loc.volume_ml,
        "tumour_crop_size_vox_xyz": np.asarray(loc.crop_size_vox_xyz, dtype=np.int64),
        "tumour_fits_crop": fits,
        "crop_origin_xyz": np.asarray(crop.origin_xyz),
        "crop_size_vox_xyz": np.asarray(crop.size_xyz, dtype=np.int64),
        "pad_value_ct": ct_min,
        "pad_value_pet": pet_min,
        "pet_fm_clip_suv": np.asarray(pet_fm_range, dtype=np.float64),
        "backend": backend,
        **coverage,
    }
    return CaseResult(arrays={k: out[k] for k in CASE_DATASETS}, geometry=grids,
                      crop_geometry=crop, location=loc, attrs=attrs, crop=crop_arrays)


def _torch_case(
    ct: sitk.Image, pet: sitk.Image, label: sitk.Image, crop: GridGeometry,
    grids: dict[str, GridGeometry], ct_min: float, pet_min: float, labels: np.ndarray,
    device: str, keep_crop: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    # local: torch, needed by the torch backend only (the default SimpleITK one runs without it)
    import torch

    from pipeline.resample_torch import resample_to_grid

    def native(img: sitk.Image, mode: str, default: float):
        # The numpy view shares SimpleITK's buffer: only the touched block is copied.
        return resample_to_grid(sitk.GetArrayViewFromImage(img), geometry_of(img), crop,
                                mode=mode, default_value=default, device=device,
                                out_dtype=None if mode == "nearest" else torch.float32)

    ct_c = native(ct, "linear", ct_min)
    pet_c = native(pet, "linear", pet_min)
    lab_c = native(label, "nearest", 0)
    lab_t = torch.as_tensor(labels, device=lab_c.device).to(lab_c.dtype)
    mask_c = torch.isin(lab_c, lab_t).to(torch.uint8)

    def resize(vol, group: str, mode: str, default: float) -> np.ndarray:
        res = resample_to_grid(vol, crop, grids[group], mode=mode, default_value=default,
                               device=device,
                               out_dtype=None if mode == "nearest" else torch.float32)
        return res.cpu().numpy()

    out = {
        "survival/pet": resize(pet_c, "survival", "linear", pet_min),
        "survival/ct": resize(ct_c, "survival", "linear", ct_min),
        "survival/mask": resize(mask_c, "survival", "nearest", 0),
        "ctfm/ct": resize(ct_c, "ctfm", "linear", ct_min),
        "petfm/pet": resize(pet_c, "petfm", "linear", pet_min),
    }
    crop_arrays = (
        {"ct": ct_c.cpu().numpy(), "pet": pet_c.cpu().numpy(), "mask": mask_c.cpu().numpy()}
        if keep_crop else {}
    )
    return out, crop_arrays


# --------------------------------------------------------------------------- cohort


def _read(path: str, case_id: str, role: str) -> sitk.Image:
    if not Path(path).is_file():
        raise CaseError(f"case {case_id!r}: {role} file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CaseError(f"case {case_id!r}: cannot read {role} file {path}: {first}") from None


def _read_direction(path: str, case_id: str) -> tuple[float, ...]:
    if not Path(path).is_file():
        raise CaseError(f"case {case_id!r}: CT file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CaseError(f"case {case_id!r}: cannot read the header of CT file {path}") from None
    return tuple(reader.GetDirection())


def _locate_task(task: dict[str, Any]) -> tuple[str, TumourLocation]:
    cid = task["case_id"]
    params = PreprocessParams.from_dict(task["params"])
    try:
        direction = _read_direction(task["ct_path"], cid)
        label = _read(task["label_path"], cid, "label")
        return cid, locate_tumour(label, direction, params, case_id=cid,
                                  label_path=task["label_path"])
    except CaseError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised naming the case and its file
        raise CaseError(f"case {cid!r} (label {task['label_path']}): "
                        f"{type(exc).__name__}: {exc}") from None


def _process_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pass 2 for one case (runs in a worker process): hash, skip or preprocess + write."""
    cid = task["case_id"]
    t0 = time.perf_counter()
    try:
        sha = {}
        for role in ("ct", "pet", "label"):
            sha[role] = task[f"{role}_sha256"] or sha256_file(task[f"{role}_path"])
        fingerprint = case_fingerprint(task["params_hash"], sha)
        path = case_file(task["cache_root"], cid)
        if path.is_file() and _done_and_checked(path, fingerprint, task):
            return {"case_id": cid, "status": "skipped", "seconds": 0.0}
        params = PreprocessParams.from_dict(task["params"])
        ct = _read(task["ct_path"], cid, "CT")
        pet = _read(task["pet_path"], cid, "PET")
        label = _read(task["label_path"], cid, "label")
        for role in ("CT", "PET"):
            image_path = task[f"{role.lower()}_path"]
            if _is_nifti(image_path):  # other formats: checked on the read image
                check_file_finite(image_path, role)
        result = preprocess_case(ct, pet, label, params, case_id=cid,
                                 label_path=task["label_path"], backend=task["backend"],
                                 device=task["device"],
                                 min_tumour_coverage=task["min_tumour_coverage"],
                                 min_crop_coverage=task["min_crop_coverage"])
        attrs = dict(result.attrs)
        attrs.update(params_hash=task["params_hash"], source_sha256=sha,
                     code_version=task["code_version"])
        write_case(task["cache_root"], cid, result.arrays, result.geometry, attrs)
        return {"case_id": cid, "status": "done", "seconds": time.perf_counter() - t0,
                "fits": bool(result.attrs["tumour_fits_crop"]),
                "needed": result.location.crop_size_vox_xyz}
    except CaseError:
        raise
    except InputCheckError as exc:
        raise CaseError(
            f"case {cid!r}: {exc} (CT {task['ct_path']}, PET {task['pet_path']}, label "
            f"{task['label_path']}); remove the case from --manifest to go on without it"
        ) from None
    except FileNotFoundError as exc:
        raise CaseError(f"case {cid!r}: file not found: {exc.filename}") from None
    except Exception as exc:  # noqa: BLE001 - re-raised naming the case and its files
        raise CaseError(
            f"case {cid!r} (CT {task['ct_path']}, PET {task['pet_path']}, label "
            f"{task['label_path']}): {type(exc).__name__}: {exc}"
        ) from None


def _done_and_checked(path: Path, fingerprint: str, task: dict[str, Any]) -> bool:
    """Whether a case file holds this fingerprint and passed today's input checks (a file
    written before the checks existed, or under laxer limits, is redone)."""
    limits = {"pet_tumour_coverage": task["min_tumour_coverage"],
              "ct_crop_coverage": task["min_crop_coverage"],
              "pet_crop_coverage": task["min_crop_coverage"]}
    with contextlib.suppress(OSError, KeyError):
        with h5py.File(path, "r") as h5:
            return (str(h5.attrs["fingerprint"]) == fingerprint
                    and all(float(h5.attrs[k]) >= v for k, v in limits.items()))
    return False


def _init_worker(threads: int) -> None:
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, threads))
    with contextlib.suppress(ImportError):
        import torch  # local: bound torch's threads too where it is installed (torch backend)

        torch.set_num_threads(max(1, threads))


def _threads(workers: int) -> int:
    """CPU threads per case: the cores shared by the workers."""
    return max(1, (os.cpu_count() or 1) // workers)


def _case_pool(workers: int, n_tasks: int) -> JobPool:
    """The pool of both passes (worker start-up paid once); one worker = in this process."""
    workers = max(1, min(int(workers), n_tasks))
    return JobPool(workers, in_process=workers == 1, initializer=_init_worker,
                   initargs=(_threads(workers),))


@contextlib.contextmanager
def _sitk_threads(n: int) -> Iterator[None]:
    prev = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(prev)


def _case_error(failed: JobFailed) -> CaseError:
    """The error to raise for a failed case: its own :class:`CaseError` (naming case and
    files), or one naming the case when the worker died or something else went wrong."""
    if isinstance(failed.original, CaseError):
        return failed.original
    hint = ("; finished cases are kept, rerun to resume, or use fewer workers"
            if failed.worker_died else "")
    return CaseError(f"case {failed.key!r}: {failed.error}{hint}")


def _run_cases(pool: JobPool, fn, tasks: list[dict[str, Any]], desc: str, progress: bool):
    """Yield ``fn(task)`` for every task, in completion order.

    The first failure cancels the cases not yet started and is raised (:func:`_case_error`);
    cases already written stay (each is complete and fingerprinted).
    """
    jobs = [Job(t["case_id"], fn, (t,)) for t in tasks]
    with _sitk_threads(_threads(pool.workers)) if pool.in_process else contextlib.nullcontext():
        for done in pool.run(jobs, bar=desc if progress else None, unit="case"):
            if not done.ok:
                raise _case_error(done.failed)
            yield done.value


def _tasks_from_manifest(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "case_id": str(row.case_id),
            "ct_path": row.ct_path, "pet_path": row.pet_path, "label_path": row.label_path,
            "ct_sha256": row.ct_sha256 or "", "pet_sha256": row.pet_sha256 or "",
            "label_sha256": row.label_sha256 or "",
        }
        for row in manifest.itertuples(index=False)
    ]


def locate_cohort(
    manifest_df: pd.DataFrame, params: PreprocessParams, workers: int = 2, *,
    progress: bool = True, _pool: JobPool | None = None,
) -> dict[str, TumourLocation]:
    """Pass 1: :func:`locate_tumour` for every case of a manifest (reads labels only).

    Args:
        manifest_df: manifest from :func:`pipeline.manifest.read_manifest` (absolute paths).
        params: preprocessing parameters.
        workers: worker processes.
        progress: show a tqdm bar.

    Returns:
        case id -> :class:`TumourLocation`, in manifest order.

    Raises:
        CaseError: naming the first case that fails (empty mask, unreadable file...).
    """
    tasks = _tasks_from_manifest(manifest_df)
    pdict = params.as_dict()
    for t in tasks:
        t["params"] = pdict
    own = _case_pool(workers, len(tasks)) if _pool is None else contextlib.nullcontext(_pool)
    with own as pool:
        found = dict(_run_cases(pool, _locate_task, tasks, "locate tumours", progress))
    return {t["case_id"]: found[t["case_id"]] for t in tasks}


def compute_crop_size(
    manifest_df: pd.DataFrame, params: PreprocessParams, workers: int = 2, *,
    progress: bool = True, _pool: JobPool | None = None,
) -> tuple[int, int, int]:
    """Pass 1: the global crop G (x, y, z voxels at ``spacing_mm_xyz``, each even).

    G is the per-axis maximum over the manifest's cases of
    :attr:`TumourLocation.crop_size_vox_xyz`.

    Raises:
        ValueError: for an empty manifest; :class:`CaseError` naming a failing case.
    """
    if len(manifest_df) == 0:
        raise ValueError("compute_crop_size: the manifest has no case")
    locs = locate_cohort(manifest_df, params, workers, progress=progress, _pool=_pool)
    sizes = np.asarray([loc.crop_size_vox_xyz for loc in locs.values()])
    return tuple(int(v) for v in sizes.max(axis=0))


@dataclass
class PreprocessReport:
    """Outcome of :func:`run_preprocessing`."""

    cache: PreprocessedCache
    processed: list[str]
    skipped: list[str]
    crop_size_vox_xyz: tuple[int, int, int]
    crop_size_source: str
    exceeding_crop: list[str]
    seconds: float


def run_preprocessing(
    manifest_path: str | os.PathLike,
    cache_root: str | os.PathLike,
    params: PreprocessParams | None = None,
    *,
    reference_cache: str | os.PathLike | None = None,
    workers: int = 2,
    backend: str = "sitk",
    device: str = "cpu",
    case_ids: Sequence[str] | None = None,
    progress: bool = True,
    min_tumour_coverage: float = MIN_TUMOUR_COVERAGE,
    min_crop_coverage: float = MIN_CROP_COVERAGE,
) -> PreprocessReport:
    """Preprocess every case of a manifest into the cache at ``cache_root``.

    Args:
        manifest_path: the manifest CSV. Empty sha256 columns are filled by hashing files.
        cache_root: output folder (``cohort.json`` + ``cases/<ID>.h5``).
        params: parameters (default :class:`PreprocessParams`). With ``crop_size_vox_xyz``
            unset, G is measured on this manifest (pass 1).
        reference_cache: an existing cache whose G and parameters are reused (new patients
            are cropped with the training cohort's G, never a recomputed one). ``params``,
            if given, must then equal the reference's.
        workers: worker processes for both passes (1 = in this process).
        backend: ``"sitk"`` or ``"torch"`` resampling.
        device: torch device for ``backend="torch"``.
        case_ids: only these cases of the manifest.
        progress: show tqdm bars.
        min_tumour_coverage: least share of each case's tumour voxels inside its PET field
            of view (default :data:`MIN_TUMOUR_COVERAGE`).
        min_crop_coverage: least share of each case's crop inside its CT field of view, and
            inside its PET's (default :data:`MIN_CROP_COVERAGE`).

    Returns:
        A :class:`PreprocessReport`: the complete cache, the cases processed and skipped,
        G and where it came from, the cases whose tumour exceeds G, the time taken.

    Raises:
        CaseError: naming the failing case and its files (for a failed input check: which
            check, the figure, the limit's option); ``cohort.json`` is then not written.
        ValueError: bad arguments, or parameters that contradict ``reference_cache``.
    """
    t0 = time.perf_counter()
    limits = {"min_tumour_coverage": _check_share(min_tumour_coverage, "min_tumour_coverage"),
              "min_crop_coverage": _check_share(min_crop_coverage, "min_crop_coverage")}
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sitk" and str(device) != "cpu":
        raise ValueError(f"device {device!r} needs backend 'torch' (SimpleITK runs on the CPU)")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    manifest_path = Path(manifest_path)
    cache_root = Path(cache_root)
    manifest = read_manifest(manifest_path)
    if case_ids is not None:
        missing = [c for c in case_ids if c not in manifest.index]
        if missing:
            raise ValueError(f"{manifest_path}: case ids not in the manifest: {missing}")
        manifest = manifest.loc[list(case_ids)]
    if len(manifest) == 0:
        raise ValueError(f"{manifest_path}: no case to preprocess")

    with _case_pool(workers, len(manifest)) as pool:
        if reference_cache is not None:
            if Path(reference_cache).resolve() == cache_root.resolve():
                raise ValueError(
                    f"reference cache {reference_cache} is the output folder; write new "
                    "cases to another folder (the reference must stay as it was trained on)"
                )
            ref = PreprocessedCache(reference_cache)
            ref_params = PreprocessParams.from_dict(ref.params)
            if ref_params.crop_size_vox_xyz is None:
                raise ValueError(f"reference cache {reference_cache} records no crop size G")
            if params is not None:
                mine = replace(params, crop_size_vox_xyz=ref_params.crop_size_vox_xyz).as_dict()
                diff = sorted(k for k, v in ref_params.as_dict().items() if mine[k] != v)
                if diff:
                    raise ValueError(
                        f"parameters {diff} differ from reference cache {reference_cache}; "
                        "a new case must be preprocessed exactly like the training cohort"
                    )
            params = ref_params
            source = str(Path(reference_cache).resolve())
        else:
            params = params or PreprocessParams()
            if params.crop_size_vox_xyz is not None:
                source = "given"
            else:
                g = compute_crop_size(manifest, params, workers, progress=progress, _pool=pool)
                params = replace(params, crop_size_vox_xyz=g)
                source = "cohort"
        phash = params.hash()

        # The cache is incomplete from now until every case is written.
        with contextlib.suppress(FileNotFoundError):
            (cache_root / COHORT_FILE).unlink()

        tasks = _tasks_from_manifest(manifest)
        pdict, version = params.as_dict(), code_version()
        for t in tasks:
            t.update(params=pdict, params_hash=phash, cache_root=str(cache_root),
                     backend=backend, device=str(device), code_version=version, **limits)
        processed, skipped, exceeding = [], [], []
        for res in _run_cases(pool, _process_task, tasks, "preprocess", progress):
            (processed if res["status"] == "done" else skipped).append(res["case_id"])
            if res["status"] == "done" and not res["fits"]:
                exceeding.append(res["case_id"])
                log.warning("case %s: tumour needs a crop of %s voxels, larger than G = %s; "
                            "its tumour is cut at the crop border", res["case_id"],
                            res["needed"], params.crop_size_vox_xyz)
        ids = [t["case_id"] for t in tasks]
        # Cases skipped now may have exceeded the crop in an earlier run: read it back.
        for cid in skipped:
            with h5py.File(case_file(cache_root, cid), "r") as h5:
                if not bool(h5.attrs.get("tumour_fits_crop", True)):
                    exceeding.append(cid)
    write_cohort_record(cache_root, {
        "params": pdict,
        "params_hash": phash,
        "crop_size_vox_xyz": list(params.crop_size_vox_xyz),
        "spacing_mm_xyz": list(params.spacing_mm_xyz),
        "crop_size_source": source,
        "manifest": str(manifest_path.resolve()),
        "manifest_sha256": sha256_file(manifest_path),
        "code_version": version,
        "created": utc_now(),
        "case_ids": ids,
        "backend": backend,
        "cases_exceeding_crop": sorted(exceeding),
        "survival_channels": list(SURVIVAL_CHANNELS),
        # Accept/refuse limits, not part of params: they never change a written array.
        "input_checks": limits,
    })
    return PreprocessReport(
        cache=PreprocessedCache(cache_root), processed=processed, skipped=skipped,
        crop_size_vox_xyz=params.crop_size_vox_xyz, crop_size_source=source,
        exceeding_crop=sorted(exceeding), seconds=time.perf_counter() - t0,
    )


def preprocess_cohort(*args: Any, **kwargs: Any) -> PreprocessedCache:
    """:func:`run_preprocessing` (same arguments), returning only the complete cache."""
    return run_preprocessing(*args, **kwargs).cache
