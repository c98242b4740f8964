"""FM-input normalisation (step 6) and the survival network's input at load time."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.preprocess.params import SURVIVAL_CHANNELS, PreprocessParams

# --------------------------------------------------------------------------- normalisation


def normalise_ct_fm(ct_hu: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """CT-FM input: clip to ``ct_fm_window_hu`` then min-max to [0, 1] (float32)."""
    lo, hi = params.ct_fm_window_hu
    return ((np.clip(ct_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_pet_fm(pet_suv: np.ndarray, params: PreprocessParams) -> tuple[np.ndarray, tuple[float, float]]:
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
        raise ValueError(f"survival_input: PET {pet.shape} and CT {ct.shape} must both be [D, H, W] and equal")
    p_lo, p_hi = params.survival_pet_window_suv
    pet_n = np.clip(pet, p_lo, p_hi) / params.survival_pet_scale_suv
    c_lo, c_hi = params.survival_ct_window_hu
    ct_n = (np.clip(ct, c_lo, c_hi) - c_lo) / (c_hi - c_lo) * 2.0 - 1.0
    channels = {"pet": pet_n, "ct": ct_n}
    return np.stack([channels[c] for c in SURVIVAL_CHANNELS]).astype(np.float32)
