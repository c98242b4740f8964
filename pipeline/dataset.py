"""Stage-two inputs in memory, and the DeepMTS training augmentation.

:class:`SurvivalCohort` gathers, for the cases of a manifest that have an endpoint, the
survival-network volumes from the preprocessed cache, the raw clinical covariates, the
endpoint and (optionally) the cached FM embeddings read through
:func:`pipeline.embeddings.load_embeddings`. Volumes are held as one tensor so a training
step is an index, not a file read.

Layouts: ``images`` is ``[N, 2, D, H, W]`` (channels PET, CT, normalised by
:func:`pipeline.preprocess.survival_input`), ``masks`` is ``[N, 1, D, H, W]`` (0/1), with D
the slice (z) axis, H = y and W = x as in the cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.cache import SURVIVAL_CT, SURVIVAL_MASK, SURVIVAL_PET, PreprocessedCache
from pipeline.embeddings import read_embeddings
from pipeline.manifest import read_manifest, survival_cases
from pipeline.preprocess import PreprocessParams, survival_input


@dataclass
class SurvivalCohort:
    """Everything stage two reads, aligned by row.

    Attributes:
        case_ids: case ids, row order of every array below.
        images: ``[N, 2, D, H, W]`` float32, channels (PET, CT), normalised.
        masks: ``[N, 1, D, H, W]`` float32 tumour masks (0/1).
        time: ``[N]`` RFS in days.
        event: ``[N]`` 1 = relapse, 0 = censored.
        clinical: raw clinical covariates (manifest columns), indexed by case id.
        centre: centre code per case.
        embeddings: embedding dataset (an encoder, e.g. ``ct``) -> ``[N, dim]`` float32 cached
            FM embeddings.
        embedding_attrs: provenance of the embeddings file (empty without embeddings).
    """

    case_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    time: np.ndarray
    event: np.ndarray
    clinical: pd.DataFrame
    centre: np.ndarray
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    embedding_attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.case_ids)

    def indices(self, ids: list[str] | np.ndarray) -> np.ndarray:
        pos = {c: i for i, c in enumerate(self.case_ids)}
        return np.asarray([pos[c] for c in ids], dtype=np.int64)


def load_cohort(
    manifest_path: str | os.PathLike,
    cache_root: str | os.PathLike,
    embeddings_path: str | os.PathLike | None = None,
    datasets: tuple[str, ...] | None = None,
    *,
    require_endpoint: bool = True,
) -> SurvivalCohort:
    """Load the cases with an endpoint from the manifest, cache and embeddings.

    Args:
        manifest_path: the manifest CSV (cases with ``has_endpoint == 1`` are used, or
            every case when ``require_endpoint`` is False, e.g. new patients to predict;
            their ``time`` is NaN and ``event`` -1).
        cache_root: the preprocessed cache; must hold every such case.
        embeddings_path: optional stage-one HDF5; its provenance must match the cache.
        datasets: embedding datasets to keep (encoders ``ct``, ``pet``, or an imported feature
            table's name; default: all in the file).

    Raises:
        KeyError: a case is missing from the cache or the embeddings file.
        pipeline.artefacts.ProvenanceError: embeddings made from another preprocessing.
    """
    manifest = read_manifest(manifest_path)
    if require_endpoint:
        manifest = survival_cases(manifest)
        if manifest.empty:
            raise ValueError(f"{manifest_path}: no case has an endpoint (has_endpoint == 1)")
    cache = PreprocessedCache(cache_root)
    ids = manifest["case_id"].tolist()
    cache.require(ids)
    params = PreprocessParams.from_dict(cache.params)

    images, masks = [], []
    for cid in ids:
        arrays = cache.read(cid, (SURVIVAL_PET, SURVIVAL_CT, SURVIVAL_MASK))
        images.append(survival_input(arrays, params))
        masks.append(arrays[SURVIVAL_MASK][None].astype(np.float32))

    embeddings: dict[str, np.ndarray] = {}
    attrs: dict = {}
    if embeddings_path is not None:
        # The loader checks provenance against the cache and names missing cases.
        emb = read_embeddings(embeddings_path, cache=cache, case_ids=ids, datasets=datasets)
        embeddings = {d: emb.matrix(d) for d in emb.datasets}
        attrs = {
            "path": str(emb.path),
            "sha256": emb.sha256,
            "file": emb.attrs,
            "modalities": emb.dataset_attrs,  # the key run.json files hold them under
            "random_init": bool(emb.attrs.get("random_init", False)),
        }
    return SurvivalCohort(
        case_ids=ids,
        images=torch.from_numpy(np.stack(images)),
        masks=torch.from_numpy(np.stack(masks)),
        time=manifest["rfs_days"].to_numpy(dtype=np.float64),
        event=manifest["relapse"].fillna(-1).to_numpy(dtype=np.int64),
        clinical=manifest.set_index("case_id", drop=False),
        centre=manifest["center"].astype(str).to_numpy(),
        embeddings=embeddings,
        embedding_attrs=attrs,
    )


@dataclass(frozen=True)
class AugmentConfig:
    """DeepMTS augmentation: left-right flip, shifts and small in-plane rotations.

    Args:
        flip_prob: probability of a left-right (x, W axis) flip.
        max_shift_vox: uniform shift in voxels per axis, in ``[-max, max]``.
        max_rotation_deg: uniform rotation about the slice (z) axis, in degrees.
    """

    flip_prob: float = 0.5
    max_shift_vox: float = 10.0
    max_rotation_deg: float = 5.0

    def __post_init__(self):
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")
        if self.max_shift_vox < 0 or self.max_rotation_deg < 0:
            raise ValueError(
                f"shift and rotation bounds must be >= 0, got {self.max_shift_vox}, {self.max_rotation_deg}"
            )


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random rigid transform per sample (same for image and mask).

    Args:
        images: ``[B, C, D, H, W]``.
        masks: ``[B, 1, D, H, W]``.
        cfg: augmentation ranges.
        generator: CPU generator, so augmentation is reproducible by seed.

    Returns:
        Augmented ``(images, masks)``; images trilinear with border padding, masks
        nearest with zero padding, so the mask stays binary.
    """
    theta = draw_affine(images.shape, cfg, generator).to(images.device, images.dtype)
    return apply_affine(images, masks, theta)


def draw_affine(shape: Sequence[int], cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """The random part of :func:`augment_batch`, on the host: one rigid transform per sample.

    Args:
        shape: the batch's ``[B, C, D, H, W]``.
        cfg: augmentation ranges.
        generator: CPU generator.

    Returns:
        ``theta [B, 3, 4]`` (float32, CPU) for ``affine_grid``, in (x, y, z) = (W, H, D) order.
    """
    b, _, d, h, w = shape
    u = torch.rand(b, 5, generator=generator)
    flip = (u[:, 0] < cfg.flip_prob).float() * -2 + 1  # -1 flips x
    angle = (u[:, 1] * 2 - 1) * math.radians(cfg.max_rotation_deg)
    # Shifts in voxels -> normalised grid units ([-1, 1] spans the axis).
    shift = (u[:, 2:5] * 2 - 1) * cfg.max_shift_vox
    sx, sy, sz = shift[:, 0] * 2 / w, shift[:, 1] * 2 / h, shift[:, 2] * 2 / d
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 3, 4)
    # affine_grid works in (x, y, z) = (W, H, D) order.
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 2, 2] = 1.0
    theta[:, 0, 3], theta[:, 1, 3], theta[:, 2, 3] = sx, sy, sz
    return theta


def apply_affine(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The device part of :func:`augment_batch`: resample ``images`` ``[B, C, D, H, W]`` and
    ``masks`` ``[B, 1, D, H, W]`` with ``theta [B, 3, 4]`` (on their device); no host sync,
    fixed shapes, so a CUDA graph can hold it."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out_img = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out_mask = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_img, out_mask
