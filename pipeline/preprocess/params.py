"""Preprocessing parameters (:class:`PreprocessParams`) and the names shared by the stages."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.artefacts import params_hash
from pipeline.cache import CASE_DATASETS  # noqa: F401  (re-exported: named by the cache)

#: Channel order of :func:`survival_input` (``[C, D, H, W]``).
SURVIVAL_CHANNELS: tuple[str, ...] = ("pet", "ct")

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
            raise ValueError(f"tumour_labels must be distinct positive label values, got {self.tumour_labels}")
        setf("tumour_labels", tuple(sorted(labels)))
        for name in ("ct_fm_window_hu", "pet_fm_percentiles", "survival_ct_window_hu", "survival_pet_window_suv"):
            lo, hi = _floats(getattr(self, name), 2, name)
            if not lo < hi:
                raise ValueError(f"{name} must be (low, high) with low < high, got {(lo, hi)}")
            setf(name, (lo, hi))
        lo, hi = self.pet_fm_percentiles
        if lo < 0 or hi > 100:
            raise ValueError(f"pet_fm_percentiles must lie in [0, 100], got {(lo, hi)}")
        setf("survival_pet_scale_suv", float(self.survival_pet_scale_suv))
        if self.survival_pet_scale_suv <= 0:
            raise ValueError(f"survival_pet_scale_suv must be positive, got {self.survival_pet_scale_suv}")
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
