"""Classical peers of the CNN, evaluated on the SAME folds: clinical Cox, radiomics-lite Cox
and fast penalised-Cox heads on cached embeddings (or any imported feature table).

Every peer returns out-of-fold (OOF) predictions with the CNN's columns
(``case_id, fold, protocol, risk, time, event`` [, ``repeat``]; ``protocol = "fit"``,
``risk`` = the Cox linear predictor, a log-hazard), so :mod:`pipeline.metrics` and
:mod:`pipeline.stats` treat a peer and the CNN alike (e.g. a paired bootstrap of
"embedding head" vs "CNN").

Per fold, everything that is learnt is learnt on the training part only: the clinical
transform (:class:`pipeline.clinical.ClinicalTransform`), the imputation (training-fold
mean, :func:`pipeline.embeddings.training_fill`, which the CNN calls too) and standardisation of
numeric features, the PCA projection of embeddings, the Cox coefficients and the penalty
(inner CV on the training part).

Peers:

* ``clinical``: ridge Cox (Breslow ties; :func:`pipeline.cox.ridge_cox_path`, the objective of
  ``sksurv`` ``CoxPHSurvivalAnalysis(alpha)`` solved by a vectorised Newton method) on the
  nine clinical covariates.
* ``radiomics``: ridge Cox on radiomics-lite features computed from the preprocessed cache
  (:func:`radiomics_lite_features`): log(1 + volume ml), SUVmax, SUVmean,
  log(1 + TLG), optionally with the clinical covariates.
* ``embeddings``: elastic-net Cox (``CoxnetSurvivalAnalysis``) on FM embeddings (+ clinical
  by default). The penalty is chosen by inner stratified K-fold CV on the training part
  (highest mean inner C-index). The label-free feature pipeline (imputation,
  standardisation, PCA, clinical transform) is fitted once on the training part and shared
  by the inner splits: it sees no label, and the validation fold is never part of it.
  ``proj`` mirrors the CNN's projection size: the CNN learns one linear map per encoder
  to d in {64, 128, 256} or keeps the native size; for a Cox head the natural linear,
  label-free counterpart is a per-encoder PCA to d components fitted on the training
  part (d is capped at n_train - 1; a d above a block's width keeps every component, with
  a warning), ``None`` keeps every standardised feature and lets the penalty do the work.
  PCA scores are not whitened, so low-variance directions are penalised more, as ridge
  does on the original features.

External features (e.g. a radiomics CSV keyed by PatientID) enter the same heads through
:func:`pipeline.feature_tables.import_feature_table`, which writes the embeddings' HDF5
schema, with or without a preprocessed cache; :func:`pipeline.embeddings.load_embeddings`
reads both kinds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time as _time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from pipeline.artefacts import atomic_path, code_version, params_hash, sha256_file, utc_now, write_json_atomic
from pipeline.cache import SURVIVAL_MASK, SURVIVAL_PET, PreprocessedCache
from pipeline.clinical import ClinicalTransform
from pipeline.cox import fit_coxnet, fit_ridge
from pipeline.embeddings import load_embeddings, training_fill, training_scale
from pipeline.layout import OOF_COLUMNS, PeerRunLayout
from pipeline.manifest import CLINICAL_COLUMNS, read_manifest, survival_cases
from pipeline.metrics import (
    ONE_YEAR_DAYS,
    c_index_value,
    fold_metrics,
    ibs_time_grid,
    integrated_brier_score,
    summarise_folds,
)
from pipeline.runtime import DEFAULT_THREADS, compute_threads
from pipeline.splits import load_folds
from pipeline.stats import breslow_survival, mean_ci

PEERS = ("clinical", "radiomics", "embeddings")
PROTOCOL = "fit"
RADIOMICS_COLUMNS = ("volume_ml", "suv_max", "suv_mean", "tlg")
RADIOMICS_DESIGN = ("log_volume", "suv_max", "suv_mean", "log_tlg")


# ---------------------------------------------------------------------------------------------
# Radiomics-lite
# ---------------------------------------------------------------------------------------------


def radiomics_lite_features(cache: PreprocessedCache | str | os.PathLike, case_ids: Sequence[str]) -> pd.DataFrame:
    """Tumour volume, SUVmax, SUVmean and TLG of each case from the preprocessed cache.

    Read from the survival grid: ``survival/mask`` and ``survival/pet`` ([D, H, W], D =
    slice axis), with the voxel volume from that group's ``spacing_xyz`` (x, y, z in mm;
    the product does not depend on the axis order). The survival crop is a resized copy
    of the global crop, so the volume is that of the resampled mask (nearest neighbour),
    close to but not identical with the native-grid ``tumour_volume_ml`` attribute.

    Args:
        cache: preprocessed cache (object or root).
        case_ids: cases to compute, in output order.

    Returns:
        DataFrame indexed by ``case_id`` with ``n_voxels``, ``volume_ml``, ``suv_max``,
        ``suv_mean``, ``tlg`` (= SUVmean x volume ml). A case with an empty mask has
        volume 0, TLG 0 and NaN SUVs (imputed later by the training-fold mean).

    Raises:
        KeyError: when the cache lacks a case (all missing ones named).
        ValueError: when a case's mask and PET shapes differ, or its PET is not finite
            inside the tumour (naming case and file).
    """
    cache = cache if isinstance(cache, PreprocessedCache) else PreprocessedCache(cache)
    cache.require(list(case_ids))
    rows = []
    for cid in case_ids:
        arrs = cache.read(cid, (SURVIVAL_MASK, SURVIVAL_PET))
        mask, pet = arrs[SURVIVAL_MASK] > 0, arrs[SURVIVAL_PET]
        if mask.shape != pet.shape:
            raise ValueError(
                f"{cache.path(cid)}: case {cid!r} has {SURVIVAL_MASK} {list(mask.shape)} but "
                f"{SURVIVAL_PET} {list(pet.shape)}"
            )
        spacing = cache.geometry(cid, "survival").spacing_xyz
        voxel_ml = float(np.prod(spacing)) / 1000.0
        n = int(mask.sum())
        vol = n * voxel_ml
        if n:
            vals = pet[mask].astype(np.float64)
            if not np.all(np.isfinite(vals)):
                raise ValueError(f"{cache.path(cid)}: case {cid!r} has non-finite PET SUV inside the tumour mask")
            smax, smean = float(vals.max()), float(vals.mean())
        else:
            smax = smean = float("nan")
        rows.append(
            {
                "case_id": cid,
                "n_voxels": n,
                "volume_ml": vol,
                "suv_max": smax,
                "suv_mean": smean,
                "tlg": (smean * vol) if n else 0.0,
            }
        )
    return pd.DataFrame(rows).set_index("case_id")


def radiomics_design(features: pd.DataFrame) -> pd.DataFrame:
    """Cox design of the radiomics-lite peer: log1p(volume), SUVmax, SUVmean, log1p(TLG).

    ``log1p`` rather than ``log`` keeps empty-mask cases (volume 0) finite.
    """
    missing = [c for c in RADIOMICS_COLUMNS if c not in features.columns]
    if missing:
        raise ValueError(f"radiomics_design: feature frame lacks columns {missing}")
    return pd.DataFrame(
        {
            "log_volume": np.log1p(features["volume_ml"].astype(float)),
            "suv_max": features["suv_max"].astype(float),
            "suv_mean": features["suv_mean"].astype(float),
            "log_tlg": np.log1p(features["tlg"].astype(float)),
        },
        index=features.index,
    )


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


@dataclass
class HeadConfig:
    """Settings of a Cox head.

    Attributes:
        model: ``ridge`` (:func:`pipeline.cox.fit_ridge`) or ``coxnet`` (elastic net,
            :func:`pipeline.cox.fit_coxnet`); both choose their penalty by inner CV unless
            fixed.
        ridge_alpha: L2 weight of ``ridge`` on the summed partial log-likelihood
            (penalty 0.5 * alpha * ||beta||^2), or ``None`` (default) to choose it from
            :data:`pipeline.cox.RIDGE_ALPHAS` by inner CV on the training part: with ~20
            events and 13 clinical features a weak fixed penalty overfits to below-chance
            C-indices.
        proj: PCA components per embedding block (``None`` = no projection).
        with_clinical: append the clinical covariates.
        l1_ratio: elastic-net mixing of ``coxnet`` (1 = lasso; small = ridge-like).
        n_alphas, alpha_min_ratio: the ``coxnet`` penalty path.
        inner_folds: inner CV folds that choose the penalty.
        seed: seed of the inner folds.
    """

    model: str = "ridge"
    ridge_alpha: float | None = None
    proj: int | None = None
    with_clinical: bool = True
    l1_ratio: float = 0.1
    n_alphas: int = 30
    alpha_min_ratio: float = 0.01
    inner_folds: int = 3
    seed: int = 42

    def __post_init__(self) -> None:
        if self.model not in ("ridge", "coxnet"):
            raise ValueError(f"HeadConfig.model must be 'ridge' or 'coxnet', got {self.model!r}")
        if self.proj is not None and int(self.proj) < 1:
            raise ValueError(f"HeadConfig.proj must be a positive size or None, got {self.proj!r}")
        if not 0 < self.l1_ratio <= 1:
            raise ValueError(f"HeadConfig.l1_ratio must lie in (0, 1], got {self.l1_ratio}")
        if self.inner_folds < 2:
            raise ValueError(f"HeadConfig.inner_folds must be >= 2, got {self.inner_folds}")
        if self.ridge_alpha is not None and self.ridge_alpha < 0:
            raise ValueError(f"HeadConfig.ridge_alpha must be >= 0, got {self.ridge_alpha}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PeerResult:
    """OOF predictions of a head plus what each fold fitted.

    Attributes:
        oof: ``case_id, fold, protocol, risk, time, event`` [, ``repeat``].
        per_fold: one record per (repeat,) fold: sizes, features, chosen penalty,
            PCA explained variance, integrated Brier score (Breslow, on the fold).
        config: the :class:`HeadConfig` as a dict, plus the feature blocks used.
        seconds: wall time.
        train_risk: the fitted linear predictor on each fold's TRAINING part, same
            columns as ``oof`` (``fold`` = the validation fold it was fitted for), for
            Breslow baselines and training-median risk cut-offs (IBS, calibration, KM).
    """

    oof: pd.DataFrame
    per_fold: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    train_risk: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(OOF_COLUMNS)))


class _FoldFeatures:
    """Feature pipeline fitted on one training part: clinical transform, imputation,
    standardisation and optional PCA per numeric block."""

    def __init__(
        self, blocks: Mapping[str, pd.DataFrame], clinical: pd.DataFrame | None, project: Mapping[str, int | None]
    ):
        self.blocks, self.clinical, self.project = blocks, clinical, project
        self.info: dict[str, Any] = {}

    def fit(self, ids: list[str]) -> _FoldFeatures:
        self.ct = ClinicalTransform().fit(self.clinical.loc[ids]) if self.clinical is not None else None
        self.fitted: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, Any]] = {}
        for name, df in self.blocks.items():
            x = df.loc[ids].to_numpy(dtype=np.float64)
            # The training-fold mean, as pipeline.train.fit_fm_stats fills the CNN's embeddings:
            # the z-scoring below maps it to 0, so a missing value carries no signal.
            fill = training_fill(x)
            x = np.where(np.isnan(x), fill, x)
            mean, sd = x.mean(axis=0), training_scale(x)
            z = (x - mean) / sd
            pca = None
            d = self.project.get(name)
            if d is not None:
                k = int(min(d, z.shape[0] - 1, z.shape[1]))
                # "auto" picks a (seeded, deterministic) randomized SVD when k is well below
                # min(n, p): 10-20x faster than a full SVD on 400 x 768 embeddings.
                pca = PCA(n_components=k, svd_solver="auto", random_state=0).fit(z)
                self.info[f"{name}_pca_components"] = k
                self.info[f"{name}_pca_explained_variance"] = float(pca.explained_variance_ratio_.sum())
            self.fitted[name] = (fill, mean, sd, pca)
        return self

    def transform(self, ids: list[str]) -> np.ndarray:
        parts = []
        for name, df in self.blocks.items():
            fill, mean, sd, pca = self.fitted[name]
            x = df.loc[ids].to_numpy(dtype=np.float64)
            z = (np.where(np.isnan(x), fill, x) - mean) / sd
            parts.append(pca.transform(z) if pca is not None else z)
        if self.ct is not None:
            parts.append(self.ct.transform(self.clinical.loc[ids]).astype(np.float64))
        return np.hstack(parts)


def _fit_head(
    cfg: HeadConfig, x: np.ndarray, time: np.ndarray, event: np.ndarray
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """The head's Cox model (:mod:`pipeline.cox`) fitted on a training part: its linear
    predictor as a function of features, and what the fit chose (penalty, inner C-index)."""
    search = {"inner_folds": cfg.inner_folds, "seed": cfg.seed}
    if cfg.model == "ridge":
        model, info = fit_ridge(x, time, event, alpha=cfg.ridge_alpha, **search)
        return model.predict, info
    model, alpha, info = fit_coxnet(
        x, time, event, l1_ratio=cfg.l1_ratio, n_alphas=cfg.n_alphas, alpha_min_ratio=cfg.alpha_min_ratio, **search
    )
    return functools.partial(model.predict, alpha=alpha), info


def _fold_groups(folds: pd.DataFrame):
    if "repeat" in folds.columns:
        for r, g in folds.groupby("repeat", sort=True):
            yield int(r), g
    else:
        yield None, folds


@compute_threads(DEFAULT_THREADS)  # small dense algebra: one thread is fastest, alone and beside other work
def run_head(
    survival: pd.DataFrame,
    folds: pd.DataFrame,
    *,
    blocks: Mapping[str, pd.DataFrame] | None = None,
    clinical: pd.DataFrame | None = None,
    config: HeadConfig | None = None,
    project: Sequence[str] = (),
) -> PeerResult:
    """Fit a Cox head on every training part of ``folds`` and predict its validation fold.

    Args:
        survival: indexed by ``case_id`` with columns ``time`` (days) and ``event`` (0/1).
        folds: ``case_id, fold`` [, ``repeat``] (from :mod:`pipeline.splits`); the OOF
            covers exactly these cases.
        blocks: name -> numeric features indexed by ``case_id`` (NaN = missing, imputed
            with the training-fold mean).
        clinical: manifest rows indexed by ``case_id`` holding the clinical columns;
            used when ``config.with_clinical``.
        config: :class:`HeadConfig`.
        project: block names to which ``config.proj`` (PCA) applies.

    Returns:
        :class:`PeerResult`.

    Raises:
        ValueError: when there are no features, a case of ``folds`` lacks survival,
            features or clinical data (naming the cases), or a training part has no event.
    """

    t0 = _time.perf_counter()
    cfg = config or HeadConfig()
    blocks = dict(blocks or {})
    clin = clinical if cfg.with_clinical else None
    _check_head_inputs(survival, folds, blocks, clin)
    project_map = {b: (cfg.proj if b in project else None) for b in blocks}

    frames, train_frames, per_fold = [], [], []
    for rep, fg in _fold_groups(folds):
        fg = fg.assign(case_id=fg["case_id"].astype(str))
        for fold in sorted(fg["fold"].unique()):
            rec, out, fit = _fit_fold(cfg, survival, blocks, clin, project_map, fg, fold, rep)
            per_fold.append(rec)
            frames.append(out)
            train_frames.append(fit)
    oof = pd.concat(frames, ignore_index=True)
    conf = {
        **cfg.to_dict(),
        "blocks": {b: int(df.shape[1]) for b, df in blocks.items()},
        "projected_blocks": sorted(b for b in blocks if b in project and cfg.proj is not None),
        "clinical_columns": list(CLINICAL_COLUMNS) if clin is not None else [],
    }
    return PeerResult(
        oof=oof,
        per_fold=per_fold,
        config=conf,
        seconds=_time.perf_counter() - t0,
        train_risk=pd.concat(train_frames, ignore_index=True),
    )


def _fit_fold(
    cfg: HeadConfig,
    survival: pd.DataFrame,
    blocks: Mapping[str, pd.DataFrame],
    clin: pd.DataFrame | None,
    project_map: Mapping[str, int | None],
    fg: pd.DataFrame,
    fold: Any,
    rep: int | None,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """:func:`run_head` on one fold of ``fg`` (one repeat's folds): fit on the other folds and
    predict this one. Returns the fit's record (with the training C-index and the fold's IBS),
    the fold's risks and the training part's (:func:`_risk_frame`)."""
    tr_ids = sorted(fg.loc[fg["fold"] != fold, "case_id"])
    te_ids = sorted(fg.loc[fg["fold"] == fold, "case_id"])
    label = f"fold {fold}" + (f" (repeat {rep})" if rep is not None else "")
    t_tr = survival.loc[tr_ids, "time"].to_numpy(float)
    e_tr = survival.loc[tr_ids, "event"].to_numpy(int)
    t_te = survival.loc[te_ids, "time"].to_numpy(float)
    e_te = survival.loc[te_ids, "event"].to_numpy(int)
    if not tr_ids or e_tr.sum() == 0:
        raise ValueError(f"run_head ({label}): the training part has no event; cannot fit a Cox model")
    feats = _FoldFeatures(blocks, clin, project_map).fit(tr_ids)
    x_tr, x_te = feats.transform(tr_ids), feats.transform(te_ids)
    predict, info = _fit_head(cfg, x_tr, t_tr, e_tr)
    lp_tr, lp_te = predict(x_tr), predict(x_te)
    rec: dict[str, Any] = {
        "fold": int(fold),
        "n_train": len(tr_ids),
        "n_test": len(te_ids),
        "n_features": int(x_te.shape[1]),
        **info,
        **feats.info,
    }
    if rep is not None:
        rec["repeat"] = rep
    rec["train_c_index"] = c_index_value(t_tr, e_tr, lp_tr).value
    grid = ibs_time_grid(t_tr, t_te, n=50)
    try:
        surv = breslow_survival(lp_tr, t_tr, e_tr, lp_te, grid)
        rec["ibs"] = integrated_brier_score(t_tr, e_tr, t_te, e_te, surv, grid)
    except ValueError as exc:
        rec["ibs"], rec["ibs_reason"] = None, str(exc)
    out = _risk_frame(te_ids, fold, rep, lp_te, t_te, e_te)
    fit = _risk_frame(tr_ids, fold, rep, lp_tr, t_tr, e_tr)
    return rec, out, fit


def _risk_frame(
    case_ids: list[str], fold: Any, rep: int | None, risk: np.ndarray, time: np.ndarray, event: np.ndarray
) -> pd.DataFrame:
    """One fold's risks as rows ``[repeat,] case_id, fold, protocol, risk, time, event``."""
    frame = pd.DataFrame(
        {
            "case_id": case_ids,
            "fold": int(fold),
            "protocol": PROTOCOL,
            "risk": np.asarray(risk, dtype=float),
            "time": time,
            "event": event,
        }
    )
    if rep is not None:
        frame.insert(0, "repeat", rep)
    return frame


def _check_head_inputs(
    survival: pd.DataFrame, folds: pd.DataFrame, blocks: Mapping[str, pd.DataFrame], clin: pd.DataFrame | None
) -> None:
    """:func:`run_head`'s inputs: some features, the columns it reads, every fold case present."""
    if not blocks and clin is None:
        raise ValueError("run_head: no features (no blocks and with_clinical is False or no clinical frame)")
    for c in ("case_id", "fold"):
        if c not in folds.columns:
            raise ValueError(f"run_head: folds frame lacks column {c!r}")
    ids_all = sorted(set(folds["case_id"].astype(str)))
    for what, frame in [("survival", survival), ("clinical", clin), *blocks.items()]:
        if frame is None:
            continue
        missing = [c for c in ids_all if c not in frame.index]
        if missing:
            raise ValueError(f"run_head: {what} data lacks {len(missing)} case(s) of the folds: {missing[:20]}")
    for c in ("time", "event"):
        if c not in survival.columns:
            raise ValueError(f"run_head: survival frame lacks column {c!r}")


def survival_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """``time`` / ``event`` indexed by case id from manifest rows with an endpoint."""
    df = pd.DataFrame({"time": manifest["rfs_days"].astype(float), "event": manifest["relapse"].astype(int)})
    df.index = manifest["case_id"].astype(str).to_numpy() if "case_id" in manifest.columns else manifest.index
    df.index.name = "case_id"
    return df


def clinical_cox(manifest: pd.DataFrame, folds: pd.DataFrame, config: HeadConfig | None = None) -> PeerResult:
    """Clinical-only ridge Cox on the folds (manifest rows with endpoints)."""
    cfg = config or HeadConfig(model="ridge", with_clinical=True)
    if not cfg.with_clinical:
        raise ValueError("clinical_cox: with_clinical must be True for the clinical peer")
    m = _by_case(manifest)
    return run_head(survival_frame(m), folds, clinical=m, config=cfg)


def radiomics_cox(
    manifest: pd.DataFrame, folds: pd.DataFrame, features: pd.DataFrame, config: HeadConfig | None = None
) -> PeerResult:
    """Ridge Cox on the radiomics-lite design (:func:`radiomics_design` of ``features``)."""
    cfg = config or HeadConfig(model="ridge", with_clinical=False)
    m = _by_case(manifest)
    return run_head(survival_frame(m), folds, blocks={"radiomics": radiomics_design(features)}, clinical=m, config=cfg)


def embedding_blocks(features: pd.DataFrame, datasets: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Split a :func:`pipeline.embeddings.load_embeddings` frame into one block per dataset (``ct_000..`` -> ``ct``)."""
    names = list(datasets) if datasets else list(features.attrs.get("feature_datasets") or [])
    if not names:
        names = sorted({c.rsplit("_", 1)[0] for c in features.columns})
    out = {}
    for d in names:
        cols = [c for c in features.columns if re.fullmatch(rf"{re.escape(d)}_\d+", c)]
        if not cols:
            raise ValueError(f"embedding_blocks: no {d!r} columns (have {list(features.columns[:5])} ...)")
        out[d] = features[cols]
    return out


def embedding_head(
    manifest: pd.DataFrame,
    folds: pd.DataFrame,
    features: pd.DataFrame,
    config: HeadConfig | None = None,
    datasets: Sequence[str] | None = None,
) -> PeerResult:
    """Penalised Cox on embeddings (one PCA per dataset when ``config.proj``) + clinical.

    A ``config.proj`` above a block's width cannot project (PCA keeps at most as many
    components as features): the block keeps all its components and a warning says so.
    """
    cfg = config or HeadConfig(model="coxnet", with_clinical=True)
    blocks = embedding_blocks(features, datasets)
    for name, width in projection_excess(cfg.proj, {b: df.shape[1] for b, df in blocks.items()}).items():
        warnings.warn(
            f"proj {cfg.proj} exceeds the {width} features of {name!r}: a PCA keeps at "
            f"most {width} components, so {name!r} is not reduced",
            stacklevel=2,
        )
    m = _by_case(manifest)
    return run_head(survival_frame(m), folds, blocks=blocks, clinical=m, config=cfg, project=list(blocks))


def projection_excess(proj: int | None, widths: Mapping[str, int]) -> dict[str, int]:
    """Blocks (name -> width) narrower than the projection size ``proj``."""
    return {} if proj is None else {b: w for b, w in widths.items() if int(proj) > w}


def _by_case(manifest: pd.DataFrame) -> pd.DataFrame:
    if "case_id" in manifest.columns:
        m = manifest.copy()
        m.index = m["case_id"].astype(str).to_numpy()
        return m
    return manifest


# ---------------------------------------------------------------------------------------------
# One peer run on disk: oof_predictions.csv + summary.json
# ---------------------------------------------------------------------------------------------


def fit_peer_run(
    peer: str,
    *,
    manifest_path: str | os.PathLike,
    folds_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cache_root: str | os.PathLike | None = None,
    features_path: str | os.PathLike | None = None,
    datasets: Sequence[str] | None = None,
    config: HeadConfig | None = None,
    horizon: float = ONE_YEAR_DAYS,
) -> dict[str, Any]:
    """Fit one peer on the shared folds; write ``oof_predictions.csv``, ``train_risk.csv``, ``summary.json``.

    Args:
        peer: ``clinical``, ``radiomics`` or ``embeddings``.
        manifest_path: the case manifest; cases with an endpoint are used.
        folds_path: folds file of :func:`pipeline.splits.save_folds`; must hold exactly the
            manifest's endpoint cases.
        out_dir: run folder.
        cache_root: preprocessed cache (needed by ``radiomics``; checks ``embeddings``).
        features_path: embeddings / imported feature HDF5 (``embeddings`` peer).
        datasets: subset of the file's datasets (encoders, or an imported table).
        config: :class:`HeadConfig`; default ridge for clinical/radiomics (radiomics
            without clinical), coxnet + clinical for embeddings.
        horizon: time-dependent AUROC horizon in days.

    Returns:
        The summary written to ``summary.json``: per-fold C-index / AUROC
        (:func:`pipeline.metrics.fold_metrics`), mean +- SD (:func:`pipeline.metrics
        .summarise_folds`), t-intervals (:func:`pipeline.stats.mean_ci`), per-fold fit
        records, configuration and provenance (inputs' sha256, params hash, code version).
    """

    if peer not in PEERS:
        raise ValueError(f"fit_peer_run: unknown peer {peer!r}; choose one of {PEERS}")
    manifest = survival_cases(read_manifest(manifest_path))
    ids = manifest["case_id"].astype(str).tolist()
    if not ids:
        raise ValueError(f"{manifest_path}: no case with an endpoint")
    folds = load_folds(folds_path, expected_case_ids=ids)
    inputs: dict[str, Any] = {
        "manifest": str(manifest_path),
        "manifest_sha256": sha256_file(manifest_path),
        "folds": str(folds_path),
        "folds_sha256": sha256_file(folds_path),
    }
    cache = PreprocessedCache(cache_root) if cache_root is not None else None
    if cache is not None:
        inputs.update(cache=str(cache_root), cache_params_hash=cache.params_hash)
    res, feature_inputs = _fit_peer(
        peer, manifest, folds, ids, cache=cache, features_path=features_path, datasets=datasets, config=config
    )
    inputs.update(feature_inputs)
    per_fold = fold_metrics(res.oof, horizon=horizon)
    summ = summarise_folds(per_fold)
    params = {"peer": peer, **res.config, "horizon": horizon}
    summary = {
        "kind": "peer_run",
        "peer": peer,
        "protocol": PROTOCOL,
        "c_index": summ["c_index"],
        "auc_1y": summ["auroc"],
        "c_index_ci": mean_ci(per_fold["c_index"]),
        "auc_1y_ci": mean_ci(per_fold["auroc"]),
        "ibs": mean_ci([r["ibs"] if r.get("ibs") is not None else np.nan for r in res.per_fold]),
        "per_fold": json.loads(per_fold.to_json(orient="records")),
        "fit": res.per_fold,
        "params": params,
        "params_hash": params_hash(params),
        "inputs": inputs,
        "code_version": code_version(),
        "created": utc_now(),
        "n_cases": len(ids),
        "seconds": res.seconds,
    }
    _write_peer_run(out_dir, res, summary)
    return summary


def _fit_peer(
    peer: str,
    manifest: pd.DataFrame,
    folds: pd.DataFrame,
    ids: list[str],
    *,
    cache: PreprocessedCache | None,
    features_path: str | os.PathLike | None,
    datasets: Sequence[str] | None,
    config: HeadConfig | None,
) -> tuple[PeerResult, dict[str, Any]]:
    """Fit ``peer`` (its default :class:`HeadConfig` unless ``config``): the result, and the
    feature file's entries of ``summary.json``'s ``inputs`` (empty but for ``embeddings``)."""
    if peer == "clinical":
        cfg = config or HeadConfig(model="ridge", with_clinical=True)
        return clinical_cox(manifest, folds, cfg), {}
    if peer == "radiomics":
        if cache is None:
            raise ValueError("fit_peer_run: the radiomics peer needs the preprocessed cache (--cache)")
        cfg = config or HeadConfig(model="ridge", with_clinical=False)
        feats = radiomics_lite_features(cache, ids)
        return radiomics_cox(manifest, folds, feats, cfg), {}
    if features_path is None:
        raise ValueError("fit_peer_run: the embeddings peer needs --embeddings PATH")
    cfg = config or HeadConfig(model="coxnet", with_clinical=True)
    feats = load_embeddings(features_path, cache=cache, case_ids=ids, datasets=datasets)
    # summary.json's key keeps its name: finished peer runs hold it.
    feature_inputs = {
        "features": str(features_path),
        "features_sha256": feats.attrs["sha256"],
        "feature_modalities": feats.attrs["feature_datasets"],
    }
    return embedding_head(manifest, folds, feats, cfg, feats.attrs["feature_datasets"]), feature_inputs


def _write_peer_run(out_dir: str | os.PathLike, res: PeerResult, summary: dict[str, Any]) -> None:
    """Write a peer run's ``oof_predictions.csv``, ``train_risk.csv`` and ``summary.json`` (each atomically)."""
    layout = PeerRunLayout(out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.oof_predictions, suffix=".csv") as tmp:
        res.oof.to_csv(tmp, index=False)
    with atomic_path(layout.train_risk, suffix=".csv") as tmp:
        res.train_risk.to_csv(tmp, index=False)
    write_json_atomic(layout.summary, summary)
