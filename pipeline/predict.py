"""Prediction for new patients with a trained configuration's fold ensemble.

New cases go through the same chain as the training cohort, with every setting taken from
the training artefacts: preprocessing reuses the training cache's crop size G and
parameters, embeddings are computed with the same encoder, weights (sha256) and config,
each fold's clinical transform and FM standardisation are the ones fitted on its training
part. Anything that does not match is refused, naming both sides.

Per patient the output holds the ensemble log-risk (mean over folds), its SD over folds,
the risk group (``high`` when most folds put the patient above their training median risk)
and the 1-year relapse probability ``1 - exp(-H0(365) exp(risk))`` averaged over folds,
with each fold's Breslow baseline hazard ``H0`` fitted on its training part. When the run's
embeddings come from randomly initialised encoders (the demo), every row says so
(``random_init_embeddings``), as does the ``.json`` provenance record beside the CSV. A
patient whose tumour is larger than G (cut at the crop border) is flagged in its row
(``tumour_cut_at_border``) and in the record's ``warnings``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.artefacts import ProvenanceError, atomic_path, check_match, code_version, read_json, write_json_atomic
from pipeline.cache import PreprocessedCache
from pipeline.clinical import ClinicalTransform
from pipeline.embedding_sets import DATASET_ENCODERS, set_of_datasets
from pipeline.dataset import SurvivalCohort, load_cohort
from pipeline.embeddings import extract_embeddings, read_embeddings
from pipeline.layout import RunLayout
from pipeline.preprocess import preprocess_cohort
from pipeline.train import FoldData, TrainConfig, apply_fm_stats, build_model, model_to_layout, predict, resolve_device

#: Embedding fields that must match between training and new patients. Precision is one of
#: them: bf16-autocast embeddings differ from fp32 ones by more than the heads tolerate.
_EMBEDDING_IDENTITY = ("encoder", "weights_sha256", "random_init_seed", "encoder_config", "pooling", "input_key",
                       "precision")


def run_is_random_init(run: dict[str, Any]) -> bool:
    """Whether a run's embeddings came from randomly initialised encoders.

    Args:
        run: the run's ``run.json`` record.
    """
    emb = run.get("embeddings") or {}
    return bool(emb.get("random_init")) or any(
        attrs.get("weights_sha256") == "random-init" for attrs in (emb.get("modalities") or {}).values())


def embed_new_cases(run: dict[str, Any], cache: PreprocessedCache, out_dir: Path, *,
                    ct_weights=None, pet_weights=None, device: str = "auto", progress: bool = True) -> Path:
    """Compute the new cases' embeddings with the training run's encoders, or refuse."""
    trained = run["embeddings"]["modalities"]
    mods = sorted(trained)
    unknown = [m for m in mods if m not in DATASET_ENCODERS]
    if unknown:
        raise ValueError(
            f"the run used imported features {unknown}: import them for the new cases with "
            "`import-features` and pass the file with --embeddings"
        )
    key = set_of_datasets(mods)
    random_init = run_is_random_init(run)
    seeds = {trained[m].get("random_init_seed") for m in mods} - {None, ""}
    encoder_kwargs = {m: json.loads(trained[m]["encoder_config"]) for m in mods if trained[m].get("encoder_config")}
    precisions = {trained[m].get("precision") for m in mods} - {None}
    if len(precisions) > 1:
        raise ProvenanceError(f"the run's encoders used different precisions {sorted(precisions)}: embed the new "
                              "cases per modality and pass the file with --embeddings")
    path = extract_embeddings(
        cache.root, key, out_dir / f"{key}.h5", ct_weights=ct_weights, pet_weights=pet_weights,
        random_init=random_init, seed=int(seeds.pop()) if seeds else 0, device=device,
        encoder_kwargs=encoder_kwargs or None, progress=progress, shard_dir=out_dir / ".shards",
        precision=precisions.pop() if precisions else None,
    )
    check_embeddings(run, path)
    return path


def check_embeddings(run: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse an embedding file whose encoders differ from those the run was trained with."""
    found = read_embeddings(path).modality_attrs
    for m, attrs in run["embeddings"]["modalities"].items():
        if m not in found:
            raise ProvenanceError(f"{path}: has no {m!r} embeddings; the model was trained with them")
        for field in _EMBEDDING_IDENTITY:
            check_match(f"{m} {field}", attrs.get(field), found[m].get(field), artefact=path)


def border_warnings(cache: PreprocessedCache) -> list[dict[str, str]]:
    """One ``{"case_id", "warning"}`` per case whose tumour is cut at the crop border (its
    tumour needs a larger crop than the cache's G, e.g. a new patient cropped with the
    training cohort's G): its prediction saw only part of the tumour."""
    g = " x ".join(str(v) for v in cache.crop_size_vox_xyz)
    return [{"case_id": c, "warning": f"tumour larger than the crop G = {g} voxels (x, y, z): cut at the "
             "crop border, so the prediction saw only part of it"}
            for c in cache.cohort.get("cases_exceeding_crop", [])]


def _fold_data(cohort: SurvivalCohort, state: dict[str, Any]) -> FoldData:
    transform = ClinicalTransform.from_dict(state["clinical_transform"])
    clinical = torch.from_numpy(transform.transform(cohort.clinical)).float()
    fm = {name: apply_fm_stats(mat, state["fm_standardisation"][name]) for name, mat in cohort.embeddings.items()}
    rows = np.arange(len(cohort))
    return FoldData(fit=rows[:0], inner=rows[:0], outer=rows, clinical=clinical, fm=fm,
                    clinical_transform=transform, fm_stats=state["fm_standardisation"])


def predict_patients(
    manifest_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    train_cache: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    protocol: str = "inner",
    embeddings: str | os.PathLike | None = None,
    ct_weights=None,
    pet_weights=None,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
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
        ct_weights, pet_weights: encoder weights; their sha256 must match the run's.
        device: "auto", "cpu" or "cuda".
        workers: preprocessing processes.

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
    check_match("preprocessing params_hash", run["preprocessing_params_hash"], train.params_hash,
                artefact=train.root / "cohort.json")
    work = Path(work_dir) if work_dir else Path(out_csv).with_suffix("")
    new_cache = preprocess_cohort(manifest_path, work / "preprocessed", reference_cache=train.root,
                                  workers=workers, progress=progress)
    check_match("preprocessing params_hash", train.params_hash, new_cache.params_hash,
                artefact=new_cache.root / "cohort.json")

    emb_path = None
    if run["modalities"]:
        if embeddings is not None:
            check_embeddings(run, embeddings)
            emb_path = embeddings
        else:
            emb_path = embed_new_cases(run, new_cache, work / "embeddings", ct_weights=ct_weights,
                                       pet_weights=pet_weights, device=device, progress=progress)
    cohort = load_cohort(manifest_path, new_cache.root, emb_path, tuple(run["modalities"]) or None,
                         require_endpoint=False)

    risks, probs, highs = _fold_predictions(cohort, layout, folds, protocol, cfg,
                                            resolve_device(device))
    out = pd.DataFrame({
        "case_id": cohort.case_ids,
        "risk": risks.mean(axis=0),
        "risk_sd_over_folds": risks.std(axis=0, ddof=1) if len(folds) > 1 else 0.0,
        "risk_group": np.where(highs.mean(axis=0) >= 0.5, "high", "low"),
        "p_relapse_1y": probs.mean(axis=0),
        "n_folds": len(folds),
        "protocol": protocol,
        "random_init_embeddings": run_is_random_init(run),
        "tumour_cut_at_border": np.isin(cohort.case_ids, new_cache.cohort.get("cases_exceeding_crop", [])),
    })
    with atomic_path(out_csv, suffix=".csv") as tmp:
        out.to_csv(tmp, index=False)
    write_json_atomic(Path(out_csv).with_suffix(".json"), {
        "run": str(run_dir.resolve()), "run_config_hash": run["config_hash"], "folds": folds,
        "protocol": protocol, "preprocessing_params_hash": new_cache.params_hash,
        "reference_cache": str(train.root.resolve()), "embeddings": str(emb_path) if emb_path else None,
        "random_init_embeddings": run_is_random_init(run), "warnings": border_warnings(new_cache),
        "manifest": str(Path(manifest_path).resolve()), "code_version": code_version(),
    })
    return out


def _fold_predictions(cohort: SurvivalCohort, layout: RunLayout, folds: list[int], protocol: str,
                      cfg: TrainConfig, dev: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each fold model's risk, 1-year relapse probability and high-risk flag, ``[K, N]``."""
    risks, probs, highs = [], [], []
    for k in folds:
        record = read_json(layout.done(k))["protocols"].get(protocol)
        if record is None or record.get("selected_epoch") is None:
            raise ValueError(f"{layout.fold_dir(k)}: no {protocol!r} checkpoint (run trained with other "
                             "selection settings)")
        data = _fold_data(cohort, read_json(layout.fold_state(k)))
        model = model_to_layout(build_model(cohort, data.clinical.shape[1], cfg), dev)
        model.load_state_dict(torch.load(layout.best(k, protocol), map_location=dev, weights_only=True))
        risk = predict(model, cohort, data.outer, data, cfg.eval_batch_size, dev).astype(np.float64)
        cal = record["calibration"]
        h0 = cal["baseline_cum_hazard"].get("365")
        risks.append(risk)
        probs.append(1.0 - np.exp(-h0 * np.exp(risk)) if h0 is not None else np.full(len(risk), np.nan))
        highs.append(risk > cal["train_risk_median"])
    return np.stack(risks), np.stack(probs), np.stack(highs)
