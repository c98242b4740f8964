"""One case, steps 1-6: checks, tumour location, crop, resampling, normalisation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.cache import (
    CASE_DATASETS,
    CENTER_MM_XYZ,
    CENTER_SOURCE,
    CTFM_CT,
    NATIVE_CENTER_MM_XYZ,
    PETFM_PET,
    SURVIVAL_CT,
    SURVIVAL_MASK,
    SURVIVAL_PET,
    GridGeometry,
)
from pipeline.preprocess.checks import (
    MIN_CROP_COVERAGE,
    MIN_TUMOUR_COVERAGE,
    check_crop_coverage,
    check_finite,
    check_share,
    check_tumour_coverage,
    tumour_points_mm,
)
from pipeline.preprocess.grid import centred_grid, resized_grid
from pipeline.preprocess.locate import TumourLocation, locate_tumour
from pipeline.preprocess.normalise import normalise_ct_fm, normalise_pet_fm
from pipeline.preprocess.params import BACKENDS, PreprocessParams
from pipeline.preprocess.resample import resample_case_sitk, resample_case_torch

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
    min_tumour_coverage = check_share(min_tumour_coverage, "min_tumour_coverage")
    min_crop_coverage = check_share(min_crop_coverage, "min_crop_coverage")
    check_finite(ct, "CT")
    check_finite(pet, "PET")
    loc = locate_tumour(label, ct.GetDirection(), params, case_id=case_id, label_path=label_path)
    crop = centred_grid(loc.centre_mm_xyz, params.crop_size_vox_xyz, params.spacing_mm_xyz, ct.GetDirection())
    grids = {
        "survival": resized_grid(crop, params.survival_size_xyz),
        "ctfm": resized_grid(crop, params.ctfm_size_xyz),
        "petfm": resized_grid(crop, params.petfm_size_xyz),
    }
    coverage = _coverage(ct, pet, label, params, grids["survival"], min_tumour_coverage, min_crop_coverage)
    ct_min = float(sitk.GetArrayViewFromImage(ct).min())
    pet_min = float(sitk.GetArrayViewFromImage(pet).min())
    labels = np.asarray(params.tumour_labels)

    resample = resample_case_sitk if backend == "sitk" else partial(resample_case_torch, device=device)
    out, crop_arrays = resample(ct, pet, label, crop, grids, ct_min, pet_min, labels, keep_crop)

    out[CTFM_CT] = normalise_ct_fm(out[CTFM_CT], params)
    out[PETFM_PET], pet_fm_range = normalise_pet_fm(out[PETFM_PET], params)
    out[SURVIVAL_MASK] = out[SURVIVAL_MASK].astype(np.uint8)
    for name in (SURVIVAL_PET, SURVIVAL_CT):
        out[name] = out[name].astype(np.float32, copy=False)
    attrs = {
        **_case_attrs(loc, crop, params),
        "pad_value_ct": ct_min,
        "pad_value_pet": pet_min,
        "pet_fm_clip_suv": np.asarray(pet_fm_range, dtype=np.float64),
        "backend": backend,
        **coverage,
    }
    return CaseResult(
        arrays={k: out[k] for k in CASE_DATASETS},
        geometry=grids,
        crop_geometry=crop,
        location=loc,
        attrs=attrs,
        crop=crop_arrays,
    )


def _coverage(
    ct: sitk.Image,
    pet: sitk.Image,
    label: sitk.Image,
    params: PreprocessParams,
    survival_grid: GridGeometry,
    min_tumour_coverage: float,
    min_crop_coverage: float,
) -> dict[str, float]:
    """The coverage checks' measured shares; :class:`InputCheckError` below a limit.

    The survival grid samples the crop's box evenly: enough to measure its coverage.
    """
    return {
        "pet_tumour_coverage": check_tumour_coverage(
            pet, tumour_points_mm(label, params.tumour_labels), "PET", min_tumour_coverage
        ),
        "ct_crop_coverage": check_crop_coverage(ct, survival_grid, "CT", min_crop_coverage),
        "pet_crop_coverage": check_crop_coverage(pet, survival_grid, "PET", min_crop_coverage),
    }


def _case_attrs(loc: TumourLocation, crop: GridGeometry, params: PreprocessParams) -> dict[str, Any]:
    """Per-case attributes of the tumour location and the crop."""
    g = np.asarray(params.crop_size_vox_xyz)
    fits = bool(np.all(np.asarray(loc.crop_size_vox_xyz) <= g))
    return {
        CENTER_MM_XYZ: np.asarray(loc.centre_mm_xyz),
        NATIVE_CENTER_MM_XYZ: np.asarray(loc.native_centre_mm_xyz),
        CENTER_SOURCE: loc.centre_source,
        "tumour_volume_ml": loc.volume_ml,
        "tumour_crop_size_vox_xyz": np.asarray(loc.crop_size_vox_xyz, dtype=np.int64),
        "tumour_fits_crop": fits,
        "crop_origin_xyz": np.asarray(crop.origin_xyz),
        "crop_size_vox_xyz": np.asarray(crop.size_xyz, dtype=np.int64),
    }
