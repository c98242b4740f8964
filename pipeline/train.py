"""Stage two: train DeepMTS+DAFT (optionally with FM embeddings) on one CV fold, or all.

The unit of work is one configuration x one fold (:func:`train_fold`), written to its own
folder with a completion marker, so a killed run, or a pre-empted cluster job, loses only
that fold. :func:`train_survival` runs every fold of one configuration and summarises.

Model selection, both reported and labelled:

* ``paper``: the epoch with the best C-index on the outer validation fold, reported on that
  same fold (the seed paper's protocol; optimistic because the fold both selects and scores).
* ``inner``: the epoch with the best C-index on an inner validation split carved from the
  training fold (stratified, ``inner_val_fraction``); the outer fold is only scored, never
  used for a decision. This is the unbiased estimate.

Both selections come from the same training trajectory (the network is fitted on the
training fold minus the inner split), so their difference is the selection optimism alone.
With ``inner_val_fraction=0`` the network is fitted on the whole training fold and only the
``paper`` selection exists, exactly the paper's protocol.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import os
import time as _time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sksurv.linear_model.coxph import BreslowEstimator
from torch.optim.swa_utils import AveragedModel, _group_tensors_by_device_and_dtype, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from models.deepmts import TUMOUR_INPUTS, DeepMTS, DeepMTSConfig
from models.losses import deepmts_loss
from pipeline.artefacts import (
    ProvenanceError,
    atomic_path,
    code_version,
    params_hash,
    read_json,
    write_json_atomic,
)
from pipeline.clinical import ClinicalTransform
from pipeline.dataset import AugmentConfig, SurvivalCohort, apply_affine, draw_affine
from pipeline.embeddings import training_fill, training_scale
from pipeline.layout import (
    CURVES_COLUMNS,
    OOF_COLUMNS,
    PROTOCOLS,
    SELECTION_SCORE,
    TRAIN_RISK_COLUMNS,
    RunLayout,
    folds_hash,
)
from pipeline.metrics import (
    NO_VALID_EPOCH,
    ONE_YEAR_DAYS,
    c_index_or_nan,
    c_index_value,
    metric_value,
    reason_text,
    summarise,
    time_dependent_auc,
)
from pipeline.runtime import (
    DEFAULT_THREADS,
    check_threads,
    compute_threads,
    default_workers,
    deterministic_kernels,
    environment_record,
)
from pipeline.sampling import EventBalancedBatchSampler
from pipeline.splits import inner_split
from pipeline.step_capture import CapturedStep

CALIBRATION_HORIZONS = (365.0, 730.0, 1095.0)  # days


#: Training arithmetic (:attr:`TrainConfig.precision`).
TRAIN_PRECISIONS = ("fp32", "bf16-autocast")
#: How an optimisation step runs (:attr:`TrainConfig.step_mode`).
STEP_MODES = ("auto", "eager", "graph")


@dataclass
class TrainConfig:
    """Training protocol; defaults are the seed paper's settings.

    Args:
        epochs: maximum epochs.
        steps_per_epoch: optimisation steps per epoch (event-balanced batches).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size on the CPU (:func:`eval_batch_size`).
        gpu_eval_batch_size: evaluation batch size on CUDA, where a larger batch costs less per
            case (the GPU is half idle at 16); the CPU keeps ``eval_batch_size``, whose
            batches its bits depend on.
        train_c_every: score the fit rows (the curves' ``train_c_index``, which shows
            under-fitting) every this many epochs and at the last epoch run; the other
            epochs evaluate only the rows a selection protocol or the outer fold needs. The
            risks, the selection and every reported metric are the same for any value (the
            selected epoch's training risks are recomputed from its checkpoint); only the
            curves' ``train_c_index`` column is NaN on the epochs skipped.
        lr: Adam learning rate after warm-up.
        warmup_epochs: linear warm-up length.
        lr_step_epochs: multiply the learning rate by ``lr_gamma`` every this many epochs.
        lr_gamma: step-decay factor.
        ema_decay: decay of the exponential moving average of weights used for evaluation.
        wd_classifier: weight decay on the risk head.
        wd_densenet: weight decay on the survival DenseNet.
        patience: early stopping after this many epochs without a better validation C-index.
        cox_weight: weight of the Cox loss in ``L = L_dice + cox_weight * L_cox``.
        seed: seed of the training randomness: initialisation and dropout (torch's global
            generator), batch order and augmentation, each offset by the fold.
            ``run-study --seeds S`` trains seed index s with ``seed + s`` to measure the
            training noise.
        split_seed: seed of the inner selection split (:func:`pipeline.splits.inner_split`,
            ``split_seed + fold``); ``None`` = ``seed``, which is what every run did before
            the two were separate (so such a run's numbers and ``config_hash`` are
            unchanged). Fixing it while ``seed`` varies keeps the same inner split, so the
            spread over seeds is training noise alone.
        inner_val_fraction: fraction of the training fold held out for the unbiased
            selection; 0 reproduces the paper's protocol only.
        select_from_epoch: first epoch (0-based) a selection protocol may choose; earlier
            epochs are trained and recorded but not selectable. 0 (paper) = every epoch.
        proj: FM projection size (64, 128, 256) or None for the native size ("orig").
        fm_standardise: z-score each embedding feature with training-fold statistics before
            the projection (not in the paper; keeps random-init and real encoders on one
            scale).
        tumour_input: "gate" (the seed paper), "binary" or "soft" (DeepMTS upstream); see
            :class:`models.deepmts.DeepMTSConfig`.
        model: further :class:`models.deepmts.DeepMTSConfig` overrides (e.g. narrow widths);
            ``{"preset": "demo" | "tiny", ...}`` starts from a named size
            (:data:`models.deepmts.PRESETS`). The input size always comes from the volumes.
        augment: augmentation ranges.
        device: "auto" (CUDA when present), "cpu" or "cuda".
        threads: CPU threads the fold computes on (torch, OpenMP, BLAS), whatever the shell's
            ``OMP_NUM_THREADS``; part of the result, since another count sums in another
            order (:mod:`pipeline.runtime`). Parallelism comes from folds in processes.
        precision: training arithmetic: "fp32" (default) or "bf16-autocast" (forward and loss
            under bfloat16 autocast; no gradient scaler needed; the Cox loss's logsumexp runs
            in fp32 under autocast). CUDA only: refused on CPU (:func:`training_device`).
        step_mode: how an optimisation step runs (:mod:`pipeline.step_capture`): "eager"; "graph"
            (the fixed-shape step copied into static buffers and, on CUDA, captured once in a
            CUDA graph and replayed: one launch per step instead of thousands; on the CPU the
            same static-buffer path without capture, bit for bit the eager step); "auto"
            (default) = "graph" on CUDA in fp32, else "eager".
    """

    epochs: int = 100
    steps_per_epoch: int = 50
    batch_size: int = 8
    eval_batch_size: int = 16
    gpu_eval_batch_size: int = 64
    train_c_every: int = 5
    lr: float = 1e-3
    warmup_epochs: int = 5
    lr_step_epochs: int = 25
    lr_gamma: float = 0.3
    ema_decay: float = 0.999
    wd_classifier: float = 0.1
    wd_densenet: float = 1e-4
    patience: int = 40
    cox_weight: float = 2.0
    seed: int = 42
    split_seed: int | None = None
    inner_val_fraction: float = 0.2
    select_from_epoch: int = 0
    proj: int | None = None
    fm_standardise: bool = True
    tumour_input: str = "gate"
    model: dict[str, Any] = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    device: str = "auto"
    threads: int = DEFAULT_THREADS
    precision: str = "fp32"
    step_mode: str = "auto"

    def __post_init__(self):
        if self.split_seed is None:
            self.split_seed = self.seed
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        for name in (
            "epochs",
            "steps_per_epoch",
            "batch_size",
            "eval_batch_size",
            "gpu_eval_batch_size",
            "train_c_every",
            "patience",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for the Cox loss, got {self.batch_size}")
        if not 0.0 <= self.inner_val_fraction < 0.5:
            raise ValueError(f"inner_val_fraction must lie in [0, 0.5), got {self.inner_val_fraction}")
        if not 0 <= self.select_from_epoch < self.epochs:
            raise ValueError(
                f"select_from_epoch must lie in [0, epochs={self.epochs}), got {self.select_from_epoch}: "
                "lower --select-from-epoch (or select_from_epoch in the training config) or raise --epochs"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.proj is not None and int(self.proj) < 1:
            raise ValueError(f"proj must be a positive size or None ('orig'), got {self.proj}")
        self.threads = check_threads(self.threads)
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        if self.step_mode == "graph" and self.precision != "fp32":
            raise ValueError(
                f"step_mode 'graph' needs precision 'fp32' (autocast's weight cache cannot be "
                f"captured), got {self.precision!r}: use --step-mode eager or auto"
            )
        if self.tumour_input not in TUMOUR_INPUTS:
            raise ValueError(f"tumour_input must be one of {TUMOUR_INPUTS}, got {self.tumour_input!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}")
        return cls(**d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``epoch`` (0-based): linear warm-up, then step decay."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    return cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)


@dataclass
class FoldData:
    """Tensors for one fold: fitted on ``fit`` rows only, applied to every split."""

    fit: np.ndarray
    inner: np.ndarray
    outer: np.ndarray
    clinical: torch.Tensor  # [N, n_clinical] for all cohort rows
    fm: dict[str, torch.Tensor]  # embedding dataset (encoder) -> [N, dim]
    clinical_transform: ClinicalTransform
    fm_stats: dict[str, dict[str, list[float]]]


def fit_fm_stats(train: np.ndarray, standardise: bool) -> dict[str, list[float]]:
    """Per-feature fill value, centre and scale of an embedding matrix, from training rows.

    ``fill`` (the training mean) replaces missing values, which imported feature tables may
    hold; ``mean``/``sd`` z-score the features when ``standardise``, else they are 0 and 1.
    """
    fill = training_fill(train)
    if not standardise:
        return {"fill": fill.tolist(), "mean": [0.0] * len(fill), "sd": [1.0] * len(fill)}
    sd = training_scale(np.where(np.isnan(train), fill, train))
    return {"fill": fill.tolist(), "mean": fill.tolist(), "sd": sd.tolist()}


def apply_fm_stats(mat: np.ndarray, stats: dict[str, list[float]]) -> torch.Tensor:
    """Fill and standardise an embedding matrix ``[N, dim]`` with :func:`fit_fm_stats` output."""
    mat = np.asarray(mat, dtype=np.float64)
    mat = (np.where(np.isnan(mat), np.asarray(stats["fill"]), mat) - np.asarray(stats["mean"])) / np.asarray(
        stats["sd"]
    )
    return torch.from_numpy(mat.astype(np.float32))


def prepare_fold(cohort: SurvivalCohort, folds: pd.DataFrame, fold: int, cfg: TrainConfig) -> FoldData:
    """Split rows and fit the clinical transform and FM standardisation on the fit rows.

    The inner split is seeded by ``cfg.split_seed + fold`` (not by the training seed), so
    runs that differ only in ``cfg.seed`` select on identical inner cases. Validation rows
    (inner and outer) never influence any fitted statistic.
    """
    fold_of = folds.set_index("case_id").loc[cohort.case_ids, "fold"].to_numpy()
    outer = np.flatnonzero(fold_of == fold)
    train = np.flatnonzero(fold_of != fold)
    if len(outer) == 0:
        raise ValueError(f"fold {fold} has no validation case")
    if cfg.inner_val_fraction > 0:
        train_ids = [cohort.case_ids[i] for i in train]
        fit_ids, inner_ids = inner_split(
            train_ids,
            cohort.time[train],
            cohort.event[train],
            val_fraction=cfg.inner_val_fraction,
            seed=cfg.split_seed + fold,
        )
        fit, inner = cohort.indices(fit_ids), cohort.indices(inner_ids)
    else:
        fit, inner = train, np.empty(0, dtype=np.int64)
    if cohort.event[fit].sum() == 0:
        raise ValueError(f"fold {fold}: the training part has no event; cannot fit a Cox model")

    transform = ClinicalTransform().fit(cohort.clinical.iloc[fit])
    clinical = torch.from_numpy(transform.transform(cohort.clinical)).float()
    stats = {
        name: fit_fm_stats(np.asarray(mat, dtype=np.float64)[fit], cfg.fm_standardise)
        for name, mat in cohort.embeddings.items()
    }
    fm = {name: apply_fm_stats(mat, stats[name]) for name, mat in cohort.embeddings.items()}
    return FoldData(fit, inner, outer, clinical, fm, transform, stats)


def build_model(cohort: SurvivalCohort, n_clinical: int, cfg: TrainConfig) -> DeepMTS:
    overrides = dict(cfg.model)
    preset = overrides.pop("preset", "paper")
    overrides.update(
        fm_dims={name: int(m.shape[1]) for name, m in cohort.embeddings.items()},
        fm_proj=cfg.proj,
        tumour_input=cfg.tumour_input,
        input_size=tuple(int(s) for s in cohort.images.shape[2:]),
    )
    return DeepMTS(DeepMTSConfig.from_preset(preset, n_clinical, **overrides))


def memory_format(device: torch.device) -> torch.memory_format:
    """The 5-D memory layout for ``device``: channels-last 3D on CPU and CUDA (measured).

    On CPU oneDNN's convolutions run ~2x faster in it at the demo's few channels per level;
    on an H200 the paper-size step's floor drops from 0.128 to 0.092 s, mostly in cuDNN's 3-D
    batch norm (benchmarks/gpu.md). Other devices keep the default layout."""
    return torch.channels_last_3d if torch.device(device).type in ("cpu", "cuda") else torch.contiguous_format


def to_model_layout(volume: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ``[B, C, D, H, W]`` batch on ``device`` in its :func:`memory_format`.

    Same shape and values; only the strides change. Pair with :func:`model_to_layout`.
    """
    return volume.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))


def model_to_layout(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network on ``device`` with its 5-D conv weights in the :func:`memory_format`."""
    return model.to(device).to(memory_format=memory_format(device))


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    cohort: SurvivalCohort,
    rows: np.ndarray,
    data: FoldData,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Log-risk for ``rows`` (higher = earlier relapse)."""
    return evaluate_rows(model, cohort, rows, data, batch_size, device)[0]


@torch.inference_mode()
def evaluate_rows(
    model: torch.nn.Module,
    cohort: SurvivalCohort,
    rows: np.ndarray,
    data: FoldData,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-risk and tumour Dice per row, in evaluation mode.

    Returns:
        ``(risk [n], dice [n])``: the log-risk (higher = earlier relapse) and the hard Dice of
        the thresholded tumour map (``seg_prob > gate_threshold``) against the mask, NaN for
        cases without a tumour in the crop.
    """
    model.eval()
    threshold = getattr(getattr(model, "config", None), "gate_threshold", 0.5)
    risks, dices = [], []
    for start in range(0, len(rows), batch_size):
        idx = torch.as_tensor(rows[start : start + batch_size])
        fm = {k: v[idx].to(device) for k, v in data.fm.items()} or None
        res = model(to_model_layout(cohort.images[idx], device), data.clinical[idx].to(device), fm)
        risks.append(res["risk"].float())
        # Dice on the device: only [B] values leave it, not the segmentation volumes.
        dices.append(
            dice_per_sample(res["seg_prob"].float() > threshold, cohort.masks[idx].to(device, non_blocking=True) > 0.5)
        )
    if not risks:
        return np.empty(0), np.empty(0)
    return torch.cat(risks).cpu().numpy(), torch.cat(dices).cpu().numpy()


def dice_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float64 Dice per sample of two boolean ``[B, 1, D, H, W]`` maps on their device; NaN
    where the target is empty."""
    dims = tuple(range(1, pred.dim()))
    inter = (pred & target).sum(dims).double()
    target_sum = target.sum(dims).double()
    dice = 2 * inter / (pred.sum(dims).double() + target_sum).clamp(min=1)
    return torch.where(target_sum > 0, dice, torch.full_like(dice, float("nan")))


# --- one fold, in parts: set-up, one epoch, evaluation, selection, outputs --------------------


class DeviceEMA(AveragedModel):
    """The weights' exponential moving average (``AveragedModel`` over parameters and buffers
    with ``get_ema_multi_avg_fn(decay)``) whose update never waits for the device.

    torch's ``update_parameters`` branches on its device counter (``n_averaged == 0``,
    ``n_averaged > 0``): two host syncs per step on CUDA. Here the branch reads a Python
    count of the updates; the arithmetic is torch's, so the averages are identical.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._updates: int | None = 0

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(*args, **kwargs)
        self._updates = None  # read from the loaded counter at the next update (once)
        return result

    def update_parameters(self, model: torch.nn.Module) -> None:
        if self._updates is None:
            self._updates = int(self.n_averaged)
        mine = [p.detach() for p in itertools.chain(self.module.parameters(), self.module.buffers())]
        theirs = [
            p.detach().to(a.device)
            for a, p in zip(mine, itertools.chain(model.parameters(), model.buffers()), strict=True)
        ]
        if self._updates == 0:
            for averaged, current in zip(mine, theirs):
                averaged.copy_(current)
        else:
            for [averaged, current], _ in _group_tensors_by_device_and_dtype([mine, theirs]).values():
                # The EMA's multi_avg_fn ignores the count; the CPU counter is not copied over.
                self.multi_avg_fn(averaged, current, self.n_averaged)
        self.n_averaged += 1
        self._updates += 1


@dataclass
class FoldTraining:
    """What one fold's training holds between epochs (see :func:`setup_fold`)."""

    data: FoldData
    model: DeepMTS
    ema: DeviceEMA
    optimiser: torch.optim.Optimizer
    base_lrs: list[float]
    sampler: EventBalancedBatchSampler
    generator: torch.Generator
    device: torch.device
    #: The cohort's training tensors on ``device``, made once (:func:`cohort_on_device`).
    on_device: dict[str, torch.Tensor] = field(default_factory=dict)
    #: "eager" or "graph" (:func:`resolve_step_mode`), and the static-buffer step of "graph".
    step_mode: str = "eager"
    captured: CapturedStep | None = None


def training_device(cfg: TrainConfig) -> torch.device:
    """The device a fold trains on; bf16 autocast is refused on CPU, where it is slower than fp32
    and gave non-finite losses at random in this project's tests (the same fold, runs apart)."""
    device = resolve_device(cfg.device)
    if cfg.precision == "bf16-autocast" and device.type == "cpu":
        raise ValueError(
            "precision 'bf16-autocast' is for CUDA: on CPU it is slower than fp32 and gave "
            "non-finite losses at random; train on CPU with --precision fp32"
        )
    return device


def _check_finite(losses: dict[str, float], fold: int, epoch: int, cfg: TrainConfig) -> None:
    """Stop a fold whose training loss is no longer finite, naming where, rather than go on."""
    bad = {k: v for k, v in losses.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"fold {fold}, epoch {epoch}: non-finite training loss {bad} "
            f"(precision {cfg.precision}, lr {cfg.lr}); the fold is not marked done"
        )


def setup_fold(cohort: SurvivalCohort, folds: pd.DataFrame, fold: int, cfg: TrainConfig) -> FoldTraining:
    """Fit the fold's transforms and build the model, its EMA, the optimiser and the sampler."""
    device = training_device(cfg)
    torch.manual_seed(cfg.seed + fold)
    data = prepare_fold(cohort, folds, fold, cfg)
    model = model_to_layout(build_model(cohort, data.clinical.shape[1], cfg), device)
    ema = DeviceEMA(model, cfg.ema_decay)
    mode = resolve_step_mode(cfg, device)
    optimiser = make_optimiser(model, cfg, capturable=mode == "graph" and device.type == "cuda")
    sampler = EventBalancedBatchSampler(
        cohort.event[data.fit],
        batch_size=cfg.batch_size,
        steps_per_epoch=cfg.steps_per_epoch,
        seed=cfg.seed + fold,
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1000 + fold)
    return FoldTraining(
        data,
        model,
        ema,
        optimiser,
        [float(g["lr"]) for g in optimiser.param_groups],
        sampler,
        generator,
        device,
        step_mode=mode,
    )


def resolve_step_mode(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.step_mode`` with "auto" resolved: "graph" on CUDA in fp32, else "eager"."""
    if cfg.step_mode != "auto":
        return cfg.step_mode
    return "graph" if device.type == "cuda" and cfg.precision == "fp32" else "eager"


def make_optimiser(model: DeepMTS, cfg: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over the network's weight-decay groups (:meth:`models.deepmts.DeepMTS.param_groups`).

    Fused: one kernel for all ~150 small tensors (a demo step's Adam 4 ms -> 0.6 ms on CPU).
    ``capturable`` (a CUDA graph holds the step): the step count and the learning rate live on
    the device, the rate as a tensor that :func:`set_lr` fills in place between replays.
    """
    groups = model.param_groups(wd_classifier=cfg.wd_classifier, wd_densenet=cfg.wd_densenet)
    if not capturable:
        return torch.optim.Adam(groups, lr=cfg.lr, fused=True)
    device = next(model.parameters()).device
    for group in groups:
        group["lr"] = torch.tensor(float(group.get("lr", cfg.lr)), device=device)
    return torch.optim.Adam(groups, lr=torch.tensor(cfg.lr, device=device), fused=True, capturable=True)


def set_lr(optimiser: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Each group's rate = its base rate x ``factor``; a tensor rate (a captured step's) in place."""
    for group, lr in zip(optimiser.param_groups, base_lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr * factor)
        else:
            group["lr"] = lr * factor


def cohort_on_device(state: FoldTraining, cohort: SurvivalCohort) -> dict[str, torch.Tensor]:
    """The tensors a training step indexes, on the training device, moved once per fold (the
    paper cohort is ~1.8 GB): ``images``, ``masks``, ``time``, ``event``, ``clinical`` and
    ``fm:<name>``. On CPU they are the cohort's own tensors (no copy)."""
    if not state.on_device:
        dev = state.device
        state.on_device.update(
            images=cohort.images.to(dev),
            masks=cohort.masks.to(dev),
            time=torch.as_tensor(cohort.time).to(dev),
            event=torch.as_tensor(cohort.event).to(dev),
            clinical=state.data.clinical.to(dev),
            **{f"fm:{k}": v.to(dev) for k, v in state.data.fm.items()},
        )
    return state.on_device


def train_step(
    state: FoldTraining, on: dict[str, torch.Tensor], idx: torch.Tensor, cfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """One optimisation step on the rows ``idx`` (a tensor on the training device); returns the
    detached loss parts as tensors on the device: nothing here waits for the device.

    The host draws the batch's augmentation (:func:`pipeline.dataset.draw_affine`, from the
    fold's CPU generator); :func:`step_compute` does the rest on the device, eagerly or, in
    step mode "graph", through the fold's :class:`pipeline.step_capture.CapturedStep`.
    """
    theta = draw_affine((len(idx), *on["images"].shape[1:]), cfg.augment, state.generator)
    theta = theta.to(state.device, on["images"].dtype)
    if state.step_mode == "graph":
        if state.captured is None:
            state.captured = CapturedStep(functools.partial(step_compute, state, on, cfg=cfg), state.device)
        return state.captured(idx, theta)
    return step_compute(state, on, idx, theta, cfg=cfg)


def step_compute(
    state: FoldTraining, on: dict[str, torch.Tensor], idx: torch.Tensor, theta: torch.Tensor, *, cfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """The device part of a step: augmentation with ``theta [B, 3, 4]``, forward, loss, backward,
    Adam and the EMA update, on the rows ``idx [B]``. Fixed shapes and no host sync, so a CUDA
    graph can hold it."""
    img, msk = apply_affine(on["images"][idx], on["masks"][idx], theta)
    fm = {k[3:]: v[idx] for k, v in on.items() if k.startswith("fm:")} or None
    bf16 = cfg.precision == "bf16-autocast"
    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=bf16):
        res = state.model(to_model_layout(img, state.device), on["clinical"][idx], fm)
    if bf16:  # the losses in fp32: Dice's voxel sums and the Cox risk sets lose too much in bf16
        res = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in res.items()}
    loss, parts = deepmts_loss(res, msk, on["time"][idx], on["event"][idx], cox_weight=cfg.cox_weight)
    state.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    state.optimiser.step()
    state.ema.update_parameters(state.model)
    return dict(parts) | {"loss": loss.detach()}


def train_epoch(state: FoldTraining, cohort: SurvivalCohort, cfg: TrainConfig, epoch: int) -> dict[str, float]:
    """One epoch of event-balanced, augmented optimisation steps; returns the mean loss parts.

    The losses stay on the device until the epoch ends (one read per epoch, not per step).
    """
    set_lr(state.optimiser, state.base_lrs, lr_factor(epoch, cfg))
    state.sampler.set_epoch(epoch)
    state.model.train()
    on = cohort_on_device(state, cohort)
    fit_rows = torch.as_tensor(state.data.fit).to(state.device)
    losses = [
        train_step(state, on, fit_rows[torch.as_tensor(batch).to(state.device, non_blocking=True)], cfg)
        for batch in state.sampler
    ]
    # float64 means of the float32 values, as np.mean of float() per step gave them.
    return {k: float(np.mean(torch.stack([entry[k] for entry in losses]).cpu().double().numpy())) for k in losses[0]}


def eval_batch_size(cfg: TrainConfig, device: torch.device) -> int:
    """The evaluation batch on ``device``: ``gpu_eval_batch_size`` on CUDA, else ``eval_batch_size``."""
    return cfg.gpu_eval_batch_size if device.type == "cuda" else cfg.eval_batch_size


@dataclass
class Evaluation:
    """The evaluation model's risks and scores on the rows of a fold, at one epoch.

    ``risk`` is NaN on the fit rows when they were not evaluated (:func:`evaluate_fold` with
    ``fit=False``); :func:`evaluate_fit_rows` completes it.
    """

    risk: np.ndarray  # [N] log-risk, cohort row order
    scores: dict[str, float]
    #: Whether the fit rows were evaluated (``risk`` holds them, ``train_c_index`` is scored).
    fit_evaluated: bool = False


def _evaluation_parts(data: FoldData, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of one evaluation pass, ``fit | inner | outer`` in batches of ``batch_size``, cut
    at a batch boundary into ``(fit_only, rest)``: the batches holding fit rows alone, and the
    others (the first of which may start with the last fit rows).

    Evaluating either part alone runs exactly the batches a whole pass runs, so each row's
    risk has the same bits whichever parts an epoch evaluates.
    """
    rows = np.concatenate([data.fit, data.inner, data.outer])
    cut = (len(data.fit) // batch_size) * batch_size
    return rows[:cut], rows[cut:]


def evaluate_fold(
    model: torch.nn.Module,
    cohort: SurvivalCohort,
    data: FoldData,
    cfg: TrainConfig,
    device: torch.device,
    *,
    fit: bool = True,
) -> Evaluation:
    """One evaluation pass over the inner and outer rows, and over the fit rows when ``fit``.

    Scores: ``train_c_index`` (fit rows, evaluation mode, so under-fitting shows; NaN when
    ``fit`` is False), ``val_c_index_inner`` (NaN without an inner split),
    ``val_c_index_outer`` and ``val_dice_outer`` (mean hard Dice on outer cases with a tumour).
    """
    batch = eval_batch_size(cfg, device)
    _, rest = _evaluation_parts(data, batch)
    risk = np.full(len(cohort), np.nan)
    dice = np.full(len(cohort), np.nan)
    risk[rest], dice[rest] = evaluate_rows(model, cohort, rest, data, batch, device)
    outer_dice = dice[data.outer]
    t, e = cohort.time, cohort.event
    evaluation = Evaluation(
        risk,
        {
            "train_c_index": float("nan"),
            "val_c_index_inner": (
                c_index_or_nan(t[data.inner], e[data.inner], risk[data.inner]) if len(data.inner) else float("nan")
            ),
            "val_c_index_outer": c_index_or_nan(t[data.outer], e[data.outer], risk[data.outer]),
            "val_dice_outer": float(np.nanmean(outer_dice)) if np.isfinite(outer_dice).any() else float("nan"),
        },
    )
    if fit:
        evaluate_fit_rows(evaluation, model, cohort, data, cfg, device)
    return evaluation


def evaluate_fit_rows(
    evaluation: Evaluation,
    model: torch.nn.Module,
    cohort: SurvivalCohort,
    data: FoldData,
    cfg: TrainConfig,
    device: torch.device,
) -> None:
    """Complete ``evaluation`` (made by ``model``) with the fit rows' risks and ``train_c_index``."""
    if evaluation.fit_evaluated:
        return
    batch = eval_batch_size(cfg, device)
    fit_only, _ = _evaluation_parts(data, batch)
    evaluation.risk[fit_only] = evaluate_rows(model, cohort, fit_only, data, batch, device)[0]
    fit = data.fit
    evaluation.scores["train_c_index"] = c_index_or_nan(cohort.time[fit], cohort.event[fit], evaluation.risk[fit])
    evaluation.fit_evaluated = True


@dataclass
class Selected:
    """The best epoch so far of one selection protocol."""

    score: float = -math.inf
    epoch: int = -1
    evaluation: Evaluation | None = None


def select(
    best: dict[str, Selected], epoch: int, evaluation: Evaluation, model: torch.nn.Module, layout: RunLayout, fold: int
) -> bool:
    """Keep, per protocol, the epoch with the best selection score; checkpoint it atomically.

    Of equally scoring epochs the later one is kept: it has trained longer and, on the small
    validation splits where ties happen, a tie says nothing about which generalises better.
    The study report counts the cells where such a tie decided the checkpoint
    (:func:`pipeline.report.noise.selection_ties`, from ``curves.csv``).

    Returns:
        True when any protocol improved or tied (resets early stopping).
    """
    improved = False
    for proto, sel in best.items():
        score = evaluation.scores[SELECTION_SCORE[proto]]
        if np.isfinite(score) and score >= sel.score:
            best[proto] = Selected(score, epoch, evaluation)
            with atomic_path(layout.best(fold, proto), suffix=".pt") as tmp:
                torch.save(model.state_dict(), tmp)
            improved = True
    return improved


class PartTimes:
    """Wall seconds spent in each part of a fold's training, summed over epochs.

    Parts: ``set-up``, ``steps`` (optimisation steps with batch preparation, augmentation and
    the EMA update), ``evaluation`` (one pass per epoch plus the start), ``selection``
    (checkpoints) and ``outputs``. ``benchmarks/bench_cell.py`` compares them with the floor
    of the steps alone.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = _time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + _time.perf_counter() - t0


def train_fold(
    cohort: SurvivalCohort,
    folds: pd.DataFrame,
    fold: int,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    times: PartTimes | None = None,
) -> dict[str, Any]:
    """Train one fold and write ``<run_dir>/fold_<k>/`` (results, curves, checkpoints).

    Returns the fold's result record (also written to ``done.json``, last, as the
    completion marker). An existing marker is returned without training. ``times``, when
    given, receives the seconds spent in each part.
    """
    layout = RunLayout(run_dir)
    if layout.is_done(fold):
        return read_json(layout.done(fold))
    layout.fold_dir(fold).mkdir(parents=True, exist_ok=True)
    times = times if times is not None else PartTimes()
    # The fold's own thread count and deterministic kernels, whatever the caller's: the same
    # numbers from train-survival, a study worker or a test.
    with compute_threads(cfg.threads), deterministic_kernels():
        return _run_fold(layout, cohort, folds, fold, cfg, progress, times)


def _run_fold(
    layout: RunLayout,
    cohort: SurvivalCohort,
    folds: pd.DataFrame,
    fold: int,
    cfg: TrainConfig,
    progress: bool,
    times: PartTimes,
) -> dict[str, Any]:
    """:func:`train_fold`'s work: set-up, epochs with evaluation and selection, outputs."""
    with times.part("set-up"):
        state = setup_fold(cohort, folds, fold, cfg)
    protocols = PROTOCOLS if len(state.data.inner) else ("paper",)
    best = {p: Selected() for p in protocols}
    with times.part("evaluation"):
        start = evaluate_fold(state.ema.module, cohort, state.data, cfg, state.device).scores
    curves, stale = [], 0
    bar = tqdm(range(cfg.epochs), desc=f"fold {fold}", disable=not progress, leave=False)
    for epoch in bar:
        t0 = _time.perf_counter()
        with times.part("steps"):
            losses = train_epoch(state, cohort, cfg, epoch)
        _check_finite(losses, fold, epoch, cfg)
        with times.part("evaluation"):
            evaluation = evaluate_fold(
                state.ema.module, cohort, state.data, cfg, state.device, fit=(epoch + 1) % cfg.train_c_every == 0
            )
        if epoch >= cfg.select_from_epoch:
            with times.part("selection"):
                improved = select(best, epoch, evaluation, state.ema.module, layout, fold)
            stale = 0 if improved else stale + 1
        if stale >= cfg.patience or epoch == cfg.epochs - 1:  # the last epoch run: its training C always
            with times.part("evaluation"):
                evaluate_fit_rows(evaluation, state.ema.module, cohort, state.data, cfg, state.device)
        curves.append(
            {
                "epoch": epoch,
                "lr_factor": lr_factor(epoch, cfg),
                **losses,
                **evaluation.scores,
                "seconds": _time.perf_counter() - t0,
            }
        )
        bar.set_postfix(
            loss=f"{losses['loss']:.3f}",
            c_train=f"{evaluation.scores['train_c_index']:.3f}",
            c_inner=f"{evaluation.scores['val_c_index_inner']:.3f}",
        )
        if stale >= cfg.patience:
            break
    bar.close()
    with times.part("evaluation"):
        complete_selected(best, state, cohort, cfg, layout, fold)
    with times.part("outputs"):
        return write_fold_outputs(layout, cohort, fold, state, cfg, best, curves, start)


def complete_selected(
    best: dict[str, Selected],
    state: FoldTraining,
    cohort: SurvivalCohort,
    cfg: TrainConfig,
    layout: RunLayout,
    fold: int,
) -> None:
    """Give each protocol's selected evaluation its fit rows' risks (for the training risks,
    the calibration and ``train_c_index``), from the epoch's checkpoint when that epoch did
    not score them: the same weights and batches, so the same bits as scoring them then."""
    model = None
    for proto, sel in best.items():
        if sel.evaluation is None or sel.evaluation.fit_evaluated:
            continue
        if model is None:
            model = copy.deepcopy(state.ema.module)
        model.load_state_dict(torch.load(layout.best(fold, proto), map_location=state.device, weights_only=True))
        evaluate_fit_rows(sel.evaluation, model, cohort, state.data, cfg, state.device)


def write_fold_outputs(
    layout: RunLayout,
    cohort: SurvivalCohort,
    fold: int,
    state: FoldTraining,
    cfg: TrainConfig,
    best: dict[str, Selected],
    curves: list[dict[str, Any]],
    start: dict[str, float],
) -> dict[str, Any]:
    """Curves, out-of-fold risks, fold state and the ``done.json`` marker (last), all atomic."""
    data = state.data
    with atomic_path(layout.curves(fold), suffix=".csv") as tmp:
        pd.DataFrame(curves, columns=list(CURVES_COLUMNS)).to_csv(tmp, index=False)
    record: dict[str, Any] = {
        "fold": fold,
        "n_fit": len(data.fit),
        "n_inner": len(data.inner),
        "n_outer": len(data.outer),
        "epochs_run": len(curves),
        "start": start,
        "environment": environment_record(state.device, cfg.precision),
        "execution": execution_record(state, cfg),
        "protocols": {},
    }
    oof = []
    for proto, sel in best.items():
        record["protocols"][proto] = protocol_record(cohort, data, sel, curves)
        if sel.evaluation is not None:
            record["protocols"][proto]["calibration"] = training_calibration(
                cohort, np.concatenate([data.fit, data.inner]), sel.evaluation.risk, layout.train_risk(fold, proto)
            )
            oof.append(
                pd.DataFrame(
                    {
                        "case_id": [cohort.case_ids[i] for i in data.outer],
                        "fold": fold,
                        "protocol": proto,
                        "risk": sel.evaluation.risk[data.outer],
                        "time": cohort.time[data.outer],
                        "event": cohort.event[data.outer],
                    },
                    columns=list(OOF_COLUMNS),
                )
            )
    if oof:
        with atomic_path(layout.oof(fold), suffix=".csv") as tmp:
            pd.concat(oof).to_csv(tmp, index=False)
    write_json_atomic(
        layout.fold_state(fold),
        {
            "clinical_transform": data.clinical_transform.to_dict(),
            "fm_standardisation": data.fm_stats,
            "fit_case_ids": [cohort.case_ids[i] for i in data.fit],
            "inner_case_ids": [cohort.case_ids[i] for i in data.inner],
        },
    )
    write_json_atomic(layout.done(fold), record)
    return record


def execution_record(state: FoldTraining, cfg: TrainConfig) -> dict[str, Any]:
    """How the fold's steps and evaluations ran: the step mode, whether a CUDA graph replayed
    the steps (:mod:`pipeline.step_capture`), the evaluation batch and ``train_c_every``."""
    return {
        "step_mode": state.step_mode,
        "cuda_graph": bool(state.captured is not None and state.captured.captured),
        "eval_batch_size": eval_batch_size(cfg, state.device),
        "train_c_every": cfg.train_c_every,
    }


def protocol_record(
    cohort: SurvivalCohort, data: FoldData, sel: Selected, curves: list[dict[str, Any]]
) -> dict[str, Any]:
    """Scores of one protocol's selected epoch on the outer fold (or why there is none)."""
    if sel.evaluation is None:  # never finite: e.g. a validation split without comparable pairs
        return {
            "selected_epoch": None,
            "c_index": None,
            "c_index_undefined_reason": NO_VALID_EPOCH,
            "auc_1y": None,
            "auc_1y_undefined_reason": NO_VALID_EPOCH,
        }
    train_rows = np.concatenate([data.fit, data.inner])
    risk = sel.evaluation.risk[data.outer]
    ci = c_index_value(cohort.time[data.outer], cohort.event[data.outer], risk)
    auc = metric_value(
        time_dependent_auc,
        cohort.time[train_rows],
        cohort.event[train_rows],
        cohort.time[data.outer],
        cohort.event[data.outer],
        risk,
        horizon=ONE_YEAR_DAYS,
    )
    return {
        "selected_epoch": sel.epoch,
        "selection_c_index": sel.score,
        "c_index": ci.value,
        "c_index_undefined_reason": ci.reason,
        "auc_1y": auc.value,
        "auc_1y_undefined_reason": auc.reason,
        "train_c_index": sel.evaluation.scores["train_c_index"],
        "val_dice": sel.evaluation.scores["val_dice_outer"],
    }


def training_calibration(cohort: SurvivalCohort, rows: np.ndarray, risk: np.ndarray, path: Path) -> dict[str, Any]:
    """Risk cut-off and Breslow baseline hazard of the selected model on its training rows.

    Also writes ``path`` (``train_risk_<protocol>.csv``: case_id, risk, time, event). New
    patients are put in the high-risk group when their log-risk exceeds the training median,
    and get ``P(relapse by t) = 1 - exp(-H0(t) * exp(risk))``.
    """
    risk = risk[rows].astype(np.float64)
    time, event = cohort.time[rows], cohort.event[rows].astype(bool)
    # Kept so any survival curve (IBS, calibration) can be fitted on the training part later.
    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(
            {"case_id": [cohort.case_ids[i] for i in rows], "risk": risk, "time": time, "event": event.astype(int)},
            columns=list(TRAIN_RISK_COLUMNS),
        ).to_csv(tmp, index=False)
    breslow = BreslowEstimator().fit(risk, event, time)
    grid = breslow.cum_baseline_hazard_.x
    horizons = [h for h in CALIBRATION_HORIZONS if grid[0] <= h <= grid[-1]]
    return {
        "train_risk_median": float(np.median(risk)),
        "baseline_cum_hazard": {str(int(h)): float(breslow.cum_baseline_hazard_(h)) for h in horizons},
    }


#: TrainConfig fields left out of :func:`config_hash` at these values: the value every run had
#: before the field existed, so those runs keep their hash and resume.
HASH_NEUTRAL_DEFAULTS: dict[str, Any] = {"gpu_eval_batch_size": 64, "step_mode": "auto"}
#: TrainConfig fields never in :func:`config_hash`: they change no risk, selection or metric,
#: only how often a diagnostic is computed (recorded in ``run.json`` all the same).
HASH_EXCLUDED = ("train_c_every",)


def config_hash(config: dict[str, Any]) -> str:
    """The ``config_hash`` of a run's :meth:`TrainConfig.to_dict`.

    A ``split_seed`` equal to ``seed`` is left out of the hash: such a run is the run made
    before the two seeds were separate (its ``run.json`` has no ``split_seed``), so old
    run folders keep their hash and resume. So are :data:`HASH_NEUTRAL_DEFAULTS` at their
    value and :data:`HASH_EXCLUDED` always.
    """
    drop = set(HASH_EXCLUDED) | {k for k, v in HASH_NEUTRAL_DEFAULTS.items() if config.get(k, v) == v}
    if config.get("split_seed", config.get("seed")) == config.get("seed"):
        drop.add("split_seed")
    return params_hash({k: v for k, v in config.items() if k not in drop})


def run_provenance(cohort: SurvivalCohort, cfg: TrainConfig, folds_hash: str, cache_params_hash: str) -> dict[str, Any]:
    """What a run was made from; a resumed run must match it exactly."""
    emb = {k: v for k, v in cohort.embedding_attrs.items() if k != "created"}
    return {
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg.to_dict()),
        "folds_hash": folds_hash,
        "preprocessing_params_hash": cache_params_hash,
        "embeddings": emb,
        "modalities": sorted(cohort.embeddings),
        "case_ids_hash": params_hash({"ids": cohort.case_ids}),
    }


def start_run(run_dir: str | os.PathLike, provenance: dict[str, Any]) -> None:
    """Create ``run_dir`` with ``run.json``, or check an existing one matches."""
    path = RunLayout(run_dir).run_json
    if path.is_file():
        old = read_json(path)
        for key in ("config_hash", "folds_hash", "preprocessing_params_hash", "case_ids_hash", "modalities"):
            if old.get(key) != provenance.get(key):
                raise ProvenanceError(
                    f"{path}: cannot resume, {key} differs (run has {old.get(key)!r}, this "
                    f"invocation {provenance.get(key)!r}); use another --out folder"
                )
        return
    write_json_atomic(path, provenance | {"code_version": code_version()})


def summarise_run(run_dir: str | os.PathLike, n_folds: int) -> dict[str, Any]:
    """Collect finished folds into per-protocol mean +- SD; writes ``summary.json``."""
    layout = RunLayout(run_dir)
    records = [read_json(layout.done(k)) for k in range(n_folds) if layout.is_done(k)]
    summary: dict[str, Any] = {"n_folds_done": len(records), "n_folds": n_folds, "protocols": {}}
    for proto in PROTOCOLS:
        rows = [r["protocols"][proto] for r in records if proto in r["protocols"]]
        if not rows:
            continue
        summary["protocols"][proto] = {
            "c_index": summarise([r["c_index"] for r in rows]),
            "auc_1y": summarise([r["auc_1y"] for r in rows]),
            "per_fold": rows,
        }
    write_json_atomic(layout.summary, summary)
    oofs = [layout.oof(k) for k in range(n_folds)]
    frames = [pd.read_csv(p) for p in oofs if p.is_file()]
    if frames:
        with atomic_path(layout.oof_predictions, suffix=".csv") as tmp:
            pd.concat(frames).to_csv(tmp, index=False)
    return summary


def train_survival(
    cohort: SurvivalCohort,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    folds: pd.DataFrame,
    *,
    cache_params_hash: str,
    only_folds: list[int] | None = None,
    progress: bool = True,
    workers: int | None = 1,
) -> dict[str, Any]:
    """Train every fold (or ``only_folds``) of one configuration, skipping finished folds.

    Writes ``run.json`` (config and provenance), ``folds.csv``, ``fold_<k>/`` per fold,
    ``summary.json`` and ``oof_predictions.csv``; returns the summary. With ``workers`` > 1
    the folds train at once, each in its own process (:class:`pipeline.pool.JobPool`) on
    ``cfg.threads`` threads: the same numbers as one after the other (each fold computes
    alone on its own thread count, :func:`train_fold`). ``workers=None``: as many as the
    usable CPUs hold (:func:`pipeline.runtime.default_workers`).
    """
    device = training_device(cfg)  # an unusable device or precision fails here, before any fold starts
    layout = RunLayout(run_dir)
    n_folds = int(folds["fold"].nunique())
    start_run(layout.root, run_provenance(cohort, cfg, folds_hash(folds), cache_params_hash))
    if not layout.folds_csv.is_file():
        with atomic_path(layout.folds_csv, suffix=".csv") as tmp:
            folds.to_csv(tmp, index=False)
    todo = []
    for k in only_folds if only_folds is not None else range(n_folds):
        if layout.is_done(k):
            print(f"fold {k}: already done, skipped")
        else:
            todo.append(k)
    if workers is None:
        workers = default_workers(len(todo), cfg.threads, on_gpu=device.type == "cuda")
    if workers <= 1 or len(todo) <= 1:
        for k in todo:
            _print_fold(k, train_fold(cohort, folds, k, cfg, layout.root, progress=progress))
    else:
        _train_folds_in_pool(cohort, folds, todo, cfg, layout, workers, progress)
    return summarise_run(layout.root, n_folds)


def _train_folds_in_pool(
    cohort: SurvivalCohort,
    folds: pd.DataFrame,
    todo: list[int],
    cfg: TrainConfig,
    layout: RunLayout,
    workers: int,
    progress: bool,
) -> None:
    """Folds ``todo`` in ``workers`` processes; the cohort's tensors travel through shared
    memory (torch's pickling), not as copies. A failing fold stops the others and raises
    its original error, as it would one after the other."""
    from pipeline.pool import Job, JobPool

    jobs = [
        Job(f"fold {k}", train_fold, (cohort, folds, k, cfg, layout.root), {"progress": False}, ident={"fold": k})
        for k in todo
    ]
    with JobPool(min(workers, len(jobs))) as pool:
        for done in pool.run(jobs, bar="folds" if progress else None, unit="fold"):
            if not done.ok and isinstance(done.failed.original, Exception):
                raise done.failed.original
            _print_fold(done.job.ident["fold"], done.result())


def _print_fold(k: int, rec: dict[str, Any]) -> None:
    """One line per fold whatever the progress setting: these are results, not progress."""
    parts = ", ".join(
        f"{p}: C={_fmt_metric(r, 'c_index')} AUC1y={_fmt_metric(r, 'auc_1y')} (epoch {r['selected_epoch']})"
        for p, r in rec["protocols"].items()
    )
    print(f"fold {k}: {parts}")


def _fmt_metric(record: dict[str, Any], key: str) -> str:
    """A fold record's ``c_index`` or ``auc_1y``, or ``undefined (<reason in words>)``."""
    reason = record.get(f"{key}_undefined_reason")
    return _fmt(record[key]) if not reason else f"undefined ({reason_text(reason)})"


def _fmt(x: float | None) -> str:
    return "undefined" if x is None or not np.isfinite(x) else f"{x:.3f}"


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable mean +- SD per selection protocol."""
    lines = [f"folds done: {summary['n_folds_done']}/{summary['n_folds']}"]
    labels = {
        "paper": "paper protocol (selected and scored on the outer fold; optimistic)",
        "inner": "unbiased (selected on an inner split; outer fold scored once)",
    }
    for proto, res in summary["protocols"].items():
        c, a = res["c_index"], res["auc_1y"]
        lines.append(
            f"  {labels[proto]}:\n    C-index {_fmt(c['mean'])} +- {_fmt(c['sd'])}   "
            f"1-year AUROC {_fmt(a['mean'])} +- {_fmt(a['sd'])} "
            f"({a['n_defined']}/{a['n_total']} folds defined)"
        )
    return "\n".join(lines)
