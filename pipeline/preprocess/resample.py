"""Resampling backends, pure functions of volumes and grids (no file I/O).

SimpleITK (``ResampleImageFilter``) and torch (:func:`pipeline.resample_torch.resample_to_grid`,
``grid_sample``) take the same native volumes and target grids and return the cache's
datasets as ``[D, H, W]`` = (z, y, x) arrays; grids are in SimpleITK (x, y, z) order.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.cache import (
    CTFM_CT,
    PETFM_PET,
    SURVIVAL_CT,
    SURVIVAL_MASK,
    SURVIVAL_PET,
    GridGeometry,
)
from pipeline.preprocess.grid import geometry_of


def sitk_resample(
    image: sitk.Image,
    grid: GridGeometry,
    *,
    linear: bool,
    default: float,
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


def resample_case_sitk(
    ct: sitk.Image,
    pet: sitk.Image,
    label: sitk.Image,
    crop: GridGeometry,
    grids: dict[str, GridGeometry],
    ct_min: float,
    pet_min: float,
    labels: np.ndarray,
    keep_crop: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Resample one case's native volumes onto its crop grid, then onto each group's grid.

    Images linear (padded with ``ct_min`` / ``pet_min``), the label nearest, then reduced to a
    0/1 mask of ``labels``. Returns the datasets of :data:`pipeline.cache.CASE_DATASETS`
    (``[D, H, W]``, before FM normalisation) and, with ``keep_crop``, the size-G crop arrays
    (``ct``, ``pet``, ``mask``).
    """
    ct_c = sitk_resample(ct, crop, linear=True, default=ct_min)
    pet_c = sitk_resample(pet, crop, linear=True, default=pet_min)
    lab_c = sitk_resample(label, crop, linear=False, default=0, pixel_type=label.GetPixelID())
    mask_arr = np.isin(sitk.GetArrayViewFromImage(lab_c), labels).astype(np.uint8)
    mask_c = sitk.GetImageFromArray(mask_arr)
    mask_c.CopyInformation(lab_c)

    def arr(img: sitk.Image) -> np.ndarray:
        return sitk.GetArrayFromImage(img)

    out = {
        SURVIVAL_PET: arr(sitk_resample(pet_c, grids["survival"], linear=True, default=pet_min)),
        SURVIVAL_CT: arr(sitk_resample(ct_c, grids["survival"], linear=True, default=ct_min)),
        SURVIVAL_MASK: arr(
            sitk_resample(mask_c, grids["survival"], linear=False, default=0, pixel_type=sitk.sitkUInt8)
        ),
        CTFM_CT: arr(sitk_resample(ct_c, grids["ctfm"], linear=True, default=ct_min)),
        PETFM_PET: arr(sitk_resample(pet_c, grids["petfm"], linear=True, default=pet_min)),
    }
    crop_arrays = {"ct": arr(ct_c), "pet": arr(pet_c), "mask": arr(mask_c)} if keep_crop else {}
    return out, crop_arrays


def resample_case_torch(
    ct: sitk.Image,
    pet: sitk.Image,
    label: sitk.Image,
    crop: GridGeometry,
    grids: dict[str, GridGeometry],
    ct_min: float,
    pet_min: float,
    labels: np.ndarray,
    keep_crop: bool,
    *,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`resample_case_sitk` with torch ``grid_sample`` on ``device``."""
    # local: torch, needed by the torch backend only (the default SimpleITK one runs without it)
    import torch

    from pipeline.resample_torch import resample_to_grid

    def native(img: sitk.Image, mode: str, default: float):
        # The numpy view shares SimpleITK's buffer: only the touched block is copied.
        return resample_to_grid(
            sitk.GetArrayViewFromImage(img),
            geometry_of(img),
            crop,
            mode=mode,
            default_value=default,
            device=device,
            out_dtype=None if mode == "nearest" else torch.float32,
        )

    ct_c = native(ct, "linear", ct_min)
    pet_c = native(pet, "linear", pet_min)
    lab_c = native(label, "nearest", 0)
    lab_t = torch.as_tensor(labels, device=lab_c.device).to(lab_c.dtype)
    mask_c = torch.isin(lab_c, lab_t).to(torch.uint8)

    def resize(vol, group: str, mode: str, default: float) -> np.ndarray:
        res = resample_to_grid(
            vol,
            crop,
            grids[group],
            mode=mode,
            default_value=default,
            device=device,
            out_dtype=None if mode == "nearest" else torch.float32,
        )
        return res.cpu().numpy()

    out = {
        SURVIVAL_PET: resize(pet_c, "survival", "linear", pet_min),
        SURVIVAL_CT: resize(ct_c, "survival", "linear", ct_min),
        SURVIVAL_MASK: resize(mask_c, "survival", "nearest", 0),
        CTFM_CT: resize(ct_c, "ctfm", "linear", ct_min),
        PETFM_PET: resize(pet_c, "petfm", "linear", pet_min),
    }
    crop_arrays = (
        {"ct": ct_c.cpu().numpy(), "pet": pet_c.cpu().numpy(), "mask": mask_c.cpu().numpy()} if keep_crop else {}
    )
    return out, crop_arrays
