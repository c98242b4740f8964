"""Prediction for new patients with a trained configuration's fold ensemble.

New cases go through the same chain as the training cohort, with every setting taken from
the training artefacts: preprocessing reuses the training cache's crop size G and
parameters, embeddings are computed with the same encoder, weights (sha256) and config,
each fold's clinical transform and FM standardisation are the ones fitted on its training
part. Anything that does not match is refused, naming both sides.

Per patient the output (:data:`PREDICTION_COLUMNS`) holds the ensemble log relative hazard
(the network's risk output, mean over folds: log of the hazard relative to the fold's
baseline; only differences between patients mean something) and its SD over folds; where the
patient lies among the training patients (``percentile_among_training``: the share of each
fold's training patients with a lower log relative hazard, averaged over folds); the risk
group with its rule (``high`` when at least half the folds put the patient above their
training median, i.e. the 50th percentile; :data:`RISK_GROUP_RULE`); and the probability of
relapse within one year in percent, ``100 (1 - exp(-H0(365) exp(risk)))`` averaged over
folds, with each fold's Breslow baseline hazard ``H0`` fitted on its training part. A high
group beside a small probability is no contradiction: the group ranks patients, the
probability is absolute.

What to be careful about, per patient: ``covariates_filled`` names each missing clinical
covariate and the value the folds filled it with (their training medians);
``out_of_distribution`` / ``out_of_distribution_reasons`` flag a tumour volume, an SUVmax (in
the survival crop) or a covariate outside the range of the run's training patients (the range
given), and more than half the covariates missing. When the run's embeddings come from
randomly initialised encoders (the demo), every row says so (``random_init_embeddings``), as
does the ``.json`` provenance record beside the CSV. A patient whose tumour is larger than G
(cut at the crop border) is flagged in its row (``tumour_cut_at_border``) and in the
record's ``warnings``. With pictures on, ``picture`` names the patient's PNG
(:mod:`pipeline.qc`) in ``<out stem>_pictures/``, beside an ``index.html`` of them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.artefacts import ProvenanceError, atomic_path, check_match, code_version, read_json, write_json_atomic
from pipeline.cache import PreprocessedCache
from pipeline.clinical import ClinicalTransform
from pipeline.dataset import SurvivalCohort, load_cohort
from pipeline.embedding_sets import ENCODERS, set_of_encoders
from pipeline.embeddings import RANDOM_INIT, read_embeddings
from pipeline.extraction import extract_embeddings
from pipeline.layout import RunLayout
from pipeline.manifest import CLINICAL_COLUMNS, read_manifest
from pipeline.preprocess import preprocess_cohort
from pipeline.train import (
    FoldData,
    TrainConfig,
    apply_fm_stats,
    build_model,
    eval_batch_size,
    model_to_layout,
    predict,
    resolve_device,
)

#: Embedding fields that must match between training and new patients. Precision is one of
#: them: bf16-autocast embeddings differ from fp32 ones by more than the heads tolerate.
_EMBEDDING_IDENTITY = (
    "encoder",
    "weights_sha256",
    "random_init_seed",
    "encoder_config",
    "pooling",
    "input_key",
    "precision",
)


#: The prediction CSV's columns, in order.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "case_id",
    "log_relative_hazard",
    "log_relative_hazard_sd_over_folds",
    "percentile_among_training",
    "risk_group",
    "risk_group_rule",
    "relapse_probability_1y_percent",
    "covariates_filled",
    "n_covariates_missing",
    "out_of_distribution",
    "out_of_distribution_reasons",
    "n_folds",
    "protocol",
    "random_init_embeddings",
    "tumour_cut_at_border",
    "picture",
)
#: How ``risk_group`` is defined.
RISK_GROUP_RULE = (
    "high = log relative hazard above the training median (50th percentile of each fold's training "
    "patients) in at least half of the folds; else low"
)


def run_is_random_init(run: dict[str, Any]) -> bool:
    """Whether a run's embeddings came from randomly initialised encoders.

    Args:
        run: the run's ``run.json`` record.
    """
    emb = run.get("embeddings") or {}
    return bool(emb.get("random_init")) or any(
        attrs.get("weights_sha256") == RANDOM_INIT for attrs in (emb.get("modalities") or {}).values()
    )


def embed_new_cases(
    run: dict[str, Any],
    cache: PreprocessedCache,
    out_dir: Path,
    *,
    weights: Mapping[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Compute the new cases' embeddings with the training run's encoders, or refuse.

    ``weights``: encoder -> weights file (found as extraction finds them when left out).
    """
    trained = run["embeddings"]["modalities"]  # run.json: dataset -> its attributes
    names = sorted(trained)
    unknown = [d for d in names if d not in ENCODERS]
    if unknown:
        raise ValueError(
            f"the run used imported features {unknown}: import them for the new cases with "
            "`import-features` and pass the file with --embeddings"
        )
    key = set_of_encoders(names)
    random_init = run_is_random_init(run)
    seeds = {trained[d].get("random_init_seed") for d in names} - {None, ""}
    encoder_kwargs = {d: json.loads(trained[d]["encoder_config"]) for d in names if trained[d].get("encoder_config")}
    precisions = {trained[d].get("precision") for d in names} - {None}
    if len(precisions) > 1:
        raise ProvenanceError(
            f"the run's encoders used different precisions {sorted(precisions)}: embed the new "
            "cases per encoder and pass the file with --embeddings"
        )
    path = extract_embeddings(
        cache.root,
        key,
        out_dir / f"{key}.h5",
        weights=weights,
        random_init=random_init,
        seed=int(seeds.pop()) if seeds else 0,
        device=device,
        encoder_kwargs=encoder_kwargs or None,
        progress=progress,
        shard_dir=out_dir / ".shards",
        precision=precisions.pop() if precisions else None,
    )
    check_embeddings(run, path)
    return path


def check_embeddings(run: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse an embedding file whose encoders differ from those the run was trained with."""
    found = read_embeddings(path).dataset_attrs
    for d, attrs in run["embeddings"]["modalities"].items():
        if d not in found:
            raise ProvenanceError(f"{path}: has no {d!r} embeddings; the model was trained with them")
        for field in _EMBEDDING_IDENTITY:
            check_match(f"{d} {field}", attrs.get(field), found[d].get(field), artefact=path)


def border_warnings(cache: PreprocessedCache) -> list[dict[str, str]]:
    """One ``{"case_id", "warning"}`` per case whose tumour is cut at the crop border (its
    tumour needs a larger crop than the cache's G, e.g. a new patient cropped with the
    training cohort's G): its prediction saw only part of the tumour."""
    g = " x ".join(str(v) for v in cache.crop_size_vox_xyz)
    return [
        {
            "case_id": c,
            "warning": f"tumour larger than the crop G = {g} voxels (x, y, z): cut at the "
            "crop border, so the prediction saw only part of it",
        }
        for c in cache.cohort.get("cases_exceeding_crop", [])
    ]


def _fold_data(cohort: SurvivalCohort, state: dict[str, Any]) -> FoldData:
    transform = ClinicalTransform.from_dict(state["clinical_transform"])
    clinical = torch.from_numpy(transform.transform(cohort.clinical)).float()
    fm = {name: apply_fm_stats(mat, state["fm_standardisation"][name]) for name, mat in cohort.embeddings.items()}
    rows = np.arange(len(cohort))
    return FoldData(
        fit=rows[:0],
        inner=rows[:0],
        outer=rows,
        clinical=clinical,
        fm=fm,
        clinical_transform=transform,
        fm_stats=state["fm_standardisation"],
    )


def _suv_max(cache: PreprocessedCache, case_id: str) -> float:
    arrays = cache.read(case_id, ("survival/pet", "survival/mask"))
    inside = arrays["survival/mask"] > 0
    return float(arrays["survival/pet"][inside].max()) if inside.any() else float("nan")


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and np.isnan(value))
        or str(value).strip().lower() in ("", "nan", "na", "none")
    )


def training_reference(layout: RunLayout, folds: list[int], protocol: str, train: PreprocessedCache) -> dict[str, Any]:
    """The run's training patients' ranges: tumour volume (ml), SUVmax in the survival crop,
    and each clinical covariate (numeric min-max; observed values of ``gender``), read from
    the folds' training rows, the training cache and its manifest."""
    ids: set[str] = set()
    for k in folds:
        path = layout.train_risk(k, protocol)
        if path.is_file():
            ids |= set(pd.read_csv(path, dtype={"case_id": str})["case_id"])
    ids = sorted(c for c in ids if train.path(c).is_file()) or list(train.case_ids)
    volumes = [float(train.attrs(c)["tumour_volume_ml"]) for c in ids]
    suv = [v for v in (_suv_max(train, c) for c in ids) if np.isfinite(v)]
    ranges: dict[str, Any] = {
        "n_patients": len(ids),
        "tumour_volume_ml": [min(volumes), max(volumes)] if volumes else None,
        "suv_max": [min(suv), max(suv)] if suv else None,
        "covariates": {},
    }
    manifest_path = train.cohort.get("manifest")
    if manifest_path and Path(manifest_path).is_file():
        table = read_manifest(manifest_path, resolve_paths=False)
        rows = table.loc[[c for c in ids if c in table.index]]
        for col in CLINICAL_COLUMNS:
            seen = [v for v in rows[col].tolist() if not _missing(v)]
            if col not in ("age", "weight"):  # categories: the values seen
                ranges["covariates"][col] = {"values": sorted({_category(v) for v in seen})}
            elif seen:
                nums = pd.to_numeric(pd.Series(seen), errors="coerce").dropna()
                if len(nums):
                    ranges["covariates"][col] = {"min": float(nums.min()), "max": float(nums.max())}
    else:
        ranges["covariates_note"] = f"training manifest {manifest_path} not found: covariate ranges not checked"
    return ranges


def _category(value: Any) -> str:
    """A category as text: ``M``/``F`` upper-cased, numeric codes as integers where whole."""
    text = str(value).strip().upper()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:g}"


def _outside(value: float, bounds: list[float] | None, what: str, unit: str) -> list[str]:
    if bounds is None or not np.isfinite(value) or bounds[0] <= value <= bounds[1]:
        return []
    return [f"{what} {value:.1f}{unit} outside the training range {bounds[0]:.1f}-{bounds[1]:.1f}{unit}"]


def _covariate_notes(
    row: pd.Series, fills: list[dict[str, dict[str, float]]], ranges: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """(filled, out of range) texts of one patient's covariates."""
    filled, outside = [], []
    for col in CLINICAL_COLUMNS:
        value = row.get(col)
        if _missing(value):
            values = sorted({f["params"][col]["fill"] for f in fills if col in f.get("params", {})})
            shown = [("M" if v == 1 else "F") if col == "gender" else f"{v:g}" for v in values]
            filled.append(f"{col}={'/'.join(shown) or '?'}")
            continue
        bounds = ranges["covariates"].get(col)
        if not bounds:
            continue
        if "values" in bounds:
            if _category(value) not in bounds["values"]:
                outside.append(
                    f"{col} {_category(value)} not among the training values ({', '.join(bounds['values'])})"
                )
            continue
        try:
            x = float(value)
        except ValueError:
            outside.append(f"{col} {value!r} is not a number")
            continue
        if not bounds["min"] <= x <= bounds["max"]:
            outside.append(f"{col} {x:g} outside the training range {bounds['min']:g}-{bounds['max']:g}")
    return filled, outside


def patient_flags(
    cohort: SurvivalCohort, cache: PreprocessedCache, fills: list[dict[str, Any]], ranges: dict[str, Any]
) -> pd.DataFrame:
    """Per patient: the covariates filled (and with what), and whether and why it lies outside
    the training patients' ranges (see :func:`training_reference`)."""
    rows = []
    for cid in cohort.case_ids:
        filled, reasons = _covariate_notes(cohort.clinical.loc[cid], fills, ranges)
        volume = float(cache.attrs(cid)["tumour_volume_ml"])
        reasons = (
            _outside(volume, ranges["tumour_volume_ml"], "tumour volume", " ml")
            + _outside(_suv_max(cache, cid), ranges["suv_max"], "SUVmax", "")
            + reasons
        )
        if len(filled) > len(CLINICAL_COLUMNS) / 2:
            reasons.append(
                f"{len(filled)} of {len(CLINICAL_COLUMNS)} covariates missing (filled with training medians)"
            )
        rows.append(
            {
                "case_id": cid,
                "covariates_filled": (", ".join(filled) + " (training medians of the folds)") if filled else "",
                "n_covariates_missing": len(filled),
                "out_of_distribution": bool(reasons),
                "out_of_distribution_reasons": "; ".join(reasons),
            }
        )
    return pd.DataFrame(rows)


def predict_patients(
    manifest_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    train_cache: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    protocol: str = "inner",
    embeddings: str | os.PathLike | None = None,
    weights: Mapping[str, Any] | None = None,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    pictures: bool = True,
) -> pd.DataFrame:
    """Preprocess, embed and score new patients with a trained run's fold ensemble.

    Args:
        manifest_path: manifest of the new cases (endpoints not needed).
        run_dir: a finished ``train-survival`` run folder.
        train_cache: the preprocessed cache the run was trained on (its G is reused).
        out_csv: where to write the per-patient predictions.
        work_dir: folder for the new cases' cache and embeddings [default: beside out_csv].
        protocol: which selected checkpoint per fold: ``"inner"`` (unbiased) or ``"paper"``.
        embeddings: precomputed embeddings of the new cases (checked against the run).
        weights: encoder -> weights file; their sha256 must match the run's.
        device: "auto", "cpu" or "cuda".
        workers: preprocessing processes.
        pictures: one PNG per patient and an index.html in ``<out stem>_pictures/``.

    Returns:
        The predictions (also written to ``out_csv`` with a ``.json`` provenance record).
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    run = read_json(layout.run_json)
    cfg = TrainConfig.from_dict(run["config"])
    folds = layout.finished_folds()
    if not folds:
        raise ValueError(f"{run_dir}: no finished fold; train the configuration first")
    train = PreprocessedCache(train_cache)
    check_match(
        "preprocessing params_hash",
        run["preprocessing_params_hash"],
        train.params_hash,
        artefact=train.root / "cohort.json",
    )
    work = Path(work_dir) if work_dir else Path(out_csv).with_suffix("")
    new_cache = _preprocess_new_cases(manifest_path, train, work, workers, progress)

    emb_path = _new_case_embeddings(run, new_cache, work, embeddings, weights, device, progress)
    cohort = load_cohort(
        manifest_path, new_cache.root, emb_path, tuple(run["modalities"]) or None, require_endpoint=False
    )

    risks, probs, highs, percentiles = _fold_predictions(cohort, layout, folds, protocol, cfg, resolve_device(device))
    ranges = training_reference(layout, folds, protocol, train)
    fills = [read_json(layout.fold_state(k))["clinical_transform"] for k in folds]
    flags = patient_flags(cohort, new_cache, fills, ranges)
    out = _prediction_table(
        cohort.case_ids,
        (risks, probs, highs, percentiles),
        flags,
        protocol,
        run_is_random_init(run),
        new_cache.cohort.get("cases_exceeding_crop", []),
    )
    if pictures:
        out["picture"] = _pictures(out, manifest_path, new_cache, Path(out_csv))
    with atomic_path(out_csv, suffix=".csv") as tmp:
        out.to_csv(tmp, index=False)
    write_json_atomic(
        Path(out_csv).with_suffix(".json"),
        _prediction_record(run_dir, run, folds, protocol, new_cache, train, emb_path, ranges, manifest_path),
    )
    return out


def _preprocess_new_cases(
    manifest_path: str | os.PathLike, train: PreprocessedCache, work: Path, workers: int, progress: bool
) -> PreprocessedCache:
    """Preprocess the new cases into ``work / "preprocessed"`` with the training cache's crop G,
    and check that their preprocessing parameters are the training cache's."""
    new_cache = preprocess_cohort(
        manifest_path, work / "preprocessed", reference_cache=train.root, workers=workers, progress=progress
    )
    check_match(
        "preprocessing params_hash", train.params_hash, new_cache.params_hash, artefact=new_cache.root / "cohort.json"
    )
    return new_cache


def _new_case_embeddings(
    run: dict[str, Any],
    new_cache: PreprocessedCache,
    work: Path,
    embeddings: str | os.PathLike | None,
    weights: Mapping[str, Any] | None,
    device: str,
    progress: bool,
) -> str | os.PathLike | None:
    """The new cases' embeddings for the run's modalities: the given file once checked against the
    run, else computed under ``work / "embeddings"``; ``None`` for a run without embeddings."""
    if not run["modalities"]:
        return None
    if embeddings is not None:
        check_embeddings(run, embeddings)
        return embeddings
    return embed_new_cases(run, new_cache, work / "embeddings", weights=weights, device=device, progress=progress)


def _prediction_record(
    run_dir: Path,
    run: dict[str, Any],
    folds: list[int],
    protocol: str,
    new_cache: PreprocessedCache,
    train: PreprocessedCache,
    emb_path: str | os.PathLike | None,
    ranges: dict[str, Any],
    manifest_path: str | os.PathLike,
) -> dict[str, Any]:
    """The provenance record written beside the prediction CSV (its ``.json``)."""
    return {
        "run": str(run_dir.resolve()),
        "run_config_hash": run["config_hash"],
        "folds": folds,
        "protocol": protocol,
        "preprocessing_params_hash": new_cache.params_hash,
        "reference_cache": str(train.root.resolve()),
        "embeddings": str(emb_path) if emb_path else None,
        "random_init_embeddings": run_is_random_init(run),
        "warnings": border_warnings(new_cache),
        "columns": {
            "log_relative_hazard": "the network's risk output, mean over folds (log hazard relative to "
            "each fold's baseline)",
            "relapse_probability_1y_percent": "100 (1 - exp(-H0(365) exp(risk))), mean over folds",
            "risk_group": RISK_GROUP_RULE,
        },
        "training_reference": ranges,
        "manifest": str(Path(manifest_path).resolve()),
        "code_version": code_version(),
    }


def _prediction_table(
    case_ids: list[str],
    folds: tuple[np.ndarray, ...],
    flags: pd.DataFrame,
    protocol: str,
    random_init: bool,
    cut: list[str],
) -> pd.DataFrame:
    """The prediction CSV's rows (:data:`PREDICTION_COLUMNS`) from the folds' ``[K, N]`` risks,
    probabilities, high flags and percentiles."""
    risks, probs, highs, percentiles = folds
    return pd.DataFrame(
        {
            "case_id": case_ids,
            "log_relative_hazard": risks.mean(axis=0),
            "log_relative_hazard_sd_over_folds": risks.std(axis=0, ddof=1) if len(risks) > 1 else 0.0,
            "percentile_among_training": percentiles.mean(axis=0),
            "risk_group": np.where(highs.mean(axis=0) >= 0.5, "high", "low"),
            "risk_group_rule": RISK_GROUP_RULE,
            "relapse_probability_1y_percent": 100.0 * probs.mean(axis=0),
            **{
                c: flags[c].to_numpy()
                for c in (
                    "covariates_filled",
                    "n_covariates_missing",
                    "out_of_distribution",
                    "out_of_distribution_reasons",
                )
            },
            "n_folds": len(risks),
            "protocol": protocol,
            "random_init_embeddings": random_init,
            "tumour_cut_at_border": np.isin(case_ids, cut),
            "picture": "",
        },
        columns=list(PREDICTION_COLUMNS),
    )


def picture_dir(out_csv: str | os.PathLike) -> Path:
    """Where predict-survival puts the pictures: ``<out stem>_pictures/`` beside the CSV."""
    out_csv = Path(out_csv)
    return out_csv.parent / f"{out_csv.stem}_pictures"


def _pictures(out: pd.DataFrame, manifest_path, cache: PreprocessedCache, out_csv: Path) -> list[str]:
    """One PNG per patient with its prediction and flags, and the index; the PNGs' paths
    relative to the CSV's folder."""
    from pipeline.qc import cache_pictures

    extra = {}
    for row in out.itertuples(index=False):
        lines = [
            f"log relative hazard {row.log_relative_hazard:+.2f} (SD {row.log_relative_hazard_sd_over_folds:.2f} "
            f"over {row.n_folds} folds), above {row.percentile_among_training:.0f} % of the training patients",
            f"risk group {row.risk_group} ({RISK_GROUP_RULE})",
            f"relapse within 1 year: {row.relapse_probability_1y_percent:.1f} %",
        ]
        flags = [f"OUTSIDE THE TRAINING DATA: {row.out_of_distribution_reasons}"] if row.out_of_distribution else []
        flags += [f"covariates filled: {row.covariates_filled}"] if row.covariates_filled else []
        flags += (
            ["embeddings from RANDOMLY INITIALISED encoders: tests the pipeline only"]
            if row.random_init_embeddings
            else []
        )
        extra[row.case_id] = {"lines": lines, "flags": flags}
    folder = picture_dir(out_csv)
    rows = cache_pictures(manifest_path, cache.root, folder, extra, title=f"Predictions {out_csv.name}")
    by_case = {r["case_id"]: f"{folder.name}/{r['png']}" for r in rows}
    return [by_case.get(c, "") for c in out["case_id"]]


def _fold_predictions(
    cohort: SurvivalCohort, layout: RunLayout, folds: list[int], protocol: str, cfg: TrainConfig, dev: torch.device
) -> tuple[np.ndarray, ...]:
    """Each fold model's risk, 1-year relapse probability, high-risk flag and percentile among
    the fold's training patients, ``[K, N]``."""
    risks, probs, highs, percentiles = [], [], [], []
    for k in folds:
        record = read_json(layout.done(k))["protocols"].get(protocol)
        if record is None or record.get("selected_epoch") is None:
            raise ValueError(
                f"{layout.fold_dir(k)}: no {protocol!r} checkpoint (run trained with other selection settings)"
            )
        data = _fold_data(cohort, read_json(layout.fold_state(k)))
        model = model_to_layout(build_model(cohort, data.clinical.shape[1], cfg), dev)
        model.load_state_dict(torch.load(layout.best(k, protocol), map_location=dev, weights_only=True))
        risk = predict(model, cohort, data.outer, data, eval_batch_size(cfg, dev), dev).astype(np.float64)
        cal = record["calibration"]
        h0 = cal["baseline_cum_hazard"].get("365")
        risks.append(risk)
        probs.append(1.0 - np.exp(-h0 * np.exp(risk)) if h0 is not None else np.full(len(risk), np.nan))
        highs.append(risk > cal["train_risk_median"])
        train_path = layout.train_risk(k, protocol)
        if train_path.is_file():
            train = np.sort(pd.read_csv(train_path)["risk"].to_numpy(dtype=np.float64))
            below = np.searchsorted(train, risk, side="left")
            ties = np.searchsorted(train, risk, side="right") - below
            percentiles.append(100.0 * (below + 0.5 * ties) / len(train))
        else:
            percentiles.append(np.full(len(risk), np.nan))
    return np.stack(risks), np.stack(probs), np.stack(highs), np.stack(percentiles)
