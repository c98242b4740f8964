"""Step 2 of the report: frames (:class:`pipeline.report.collect.StudyData`) -> the typed
results object (:class:`pipeline.report.results.Results`).

Each analysis is a function of arrays or frames, so it is tested on hand-made predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artefacts import code_version, utc_now
from pipeline.embedding_sets import embedding_set
from pipeline.layout import EVAL_COLUMNS
from pipeline.metrics import ONE_YEAR_DAYS, TOO_FEW_VALID_TIMES, MetricUndefined, c_index_value, summarise
from pipeline.report.collect import ModelRef, StudyData, held_out
from pipeline.report.labels import (
    LOSS_COLUMNS,
    N_BOOT,
    PROTOCOL_LABELS,
    PROTOCOL_ORDER,
    UNIT_RANGE,
    clean,
    difference,
    finite,
    float_or_none,
    group_label,
    table1_cnn,
    table1_peers,
)
from pipeline.report.noise import (
    NOISE_RULE,
    NOISE_SD_MULTIPLE,
    TIE_RULE,
    seed_noise,
    seed_paired_comparisons,
    selection_ties,
    within_training_noise,
)
from pipeline.report.results import (
    RESULTS_SCHEMA,
    AnalysisRun,
    CellCount,
    CellTraining,
    ComputeSummary,
    Facts,
    Headline,
    IdenticalGroup,
    LearningCurves,
    LocoCentre,
    LocoSection,
    PairedRow,
    Results,
    SeedsSection,
    SelectionSection,
    StudyRecord,
    SurvivalModel,
    SurvivalSection,
    TrainingSection,
    TrainingSummary,
    UndefinedMetric,
)
from pipeline.stats import (
    breslow_survival,
    calibration_at,
    ibs_time_grid,
    integrated_brier_score,
    km_logrank,
    mean_ci,
    paired_bootstrap_delta,
    risk_groups,
)
from pipeline.study_spec import BASELINE, FIRST_SPLIT, LOCO, StudySpec, grid

# --- 2. analyses: frames -> plain data ---------------------------------------------------------


def summarise_records(records: pd.DataFrame, n_folds: int | None = None) -> pd.DataFrame:
    """Mean +- SD and 95 % t-interval over finished folds per protocol x configuration.

    Uses :func:`pipeline.metrics.summarise` (sample SD, undefined folds excluded and
    counted) and :func:`pipeline.stats.mean_ci` (Student-t interval over the defined folds
    of every repeat, clipped to [0, 1] with ``c_clipped`` / ``auc_clipped`` set when it
    left that range; folds share training cases, so it is narrower than the truth: read
    the paired comparisons for differences). Columns: ``protocol, config, kind, group,
    d, n_done, n_folds, n_repeats, c_mean, c_sd, c_n, c_low, c_high, c_clipped, auc_mean,
    auc_sd, auc_n, auc_low, auc_high, auc_clipped, sel_mean``; ``n_folds`` counts the fold
    slots over every repeat (folds per split x ``n_repeats``, the splits the records hold:
    CV repeats where the records are the CV splits'); ``c_n``/``auc_n`` are the defined folds.

    Args:
        records: :func:`collect_records` / :func:`collect_peer_records` rows (one per fold
            slot, pending included).
        n_folds: fold slots per configuration; default: the rows of each group.
    """
    out = []
    for (proto, config), g in records.groupby(["protocol", "config"], sort=False):
        fin = g[g["done"].astype(bool)]
        c = summarise(fin["c_index"].tolist())
        a = summarise(fin["auc_1y"].tolist())
        s = summarise(fin["selection_c_index"].tolist())
        c_ci = mean_ci(fin["c_index"].tolist(), bounds=UNIT_RANGE)
        a_ci = mean_ci(fin["auc_1y"].tolist(), bounds=UNIT_RANGE)
        out.append(
            {
                "protocol": proto,
                "config": config,
                "kind": g["kind"].iloc[0] if "kind" in g else "cnn",
                "group": g["group"].iloc[0],
                "d": g["d"].iloc[0],
                "n_done": int(len(fin)),
                "n_folds": int(n_folds if n_folds is not None else len(g)),
                "n_repeats": int(g["split"].nunique()) if "split" in g else 1,
                "c_mean": c["mean"],
                "c_sd": c["sd"],
                "c_n": c["n_defined"],
                "c_low": c_ci["low"],
                "c_high": c_ci["high"],
                "c_clipped": c_ci["clipped"],
                "auc_mean": a["mean"],
                "auc_sd": a["sd"],
                "auc_n": a["n_defined"],
                "auc_low": a_ci["low"],
                "auc_high": a_ci["high"],
                "auc_clipped": a_ci["clipped"],
                "sel_mean": s["mean"],
            }
        )
    return pd.DataFrame(out).astype(
        {
            "c_mean": float,
            "c_sd": float,
            "auc_mean": float,
            "auc_sd": float,
            "sel_mean": float,
            "c_low": float,
            "c_high": float,
            "auc_low": float,
            "auc_high": float,
        }
    )


def table1(summary: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Baseline plus, per embedding set, its best projection size, with deltas vs baseline.

    The best d maximises the mean outer C-index under the ``paper`` protocol and the mean
    inner-validation C-index (``sel_mean``) under ``inner``. Only configurations with all
    folds finished compete; an embedding set without one is listed as pending, one the study
    did not request (no row in ``summary``) is left out. The peers
    follow (clinical Cox, radiomics-lite Cox, and per embedding set the embedding head
    whose PCA size is chosen the same way, by the inner-CV C-index of its penalty choice
    under ``inner``); a peer family that did not run is left out.

    Returns:
        Rows ``baseline, ct, pet, ctpet`` (those requested) [, peers] with ``group, config, d, c_mean,
        c_sd, auc_mean, auc_sd, c_n, auc_n, delta_c, delta_auc, status`` (deltas are
        differences of means vs the CNN baseline; NaN when either side is missing).
    """
    s = summary[summary["protocol"] == protocol]
    complete = s[s["n_done"] == s["n_folds"]]
    key = "c_mean" if protocol == "paper" else "sel_mean"
    rows = []
    base = complete[complete["group"] == BASELINE]
    base_row = base.iloc[0] if len(base) else None
    peers = table1_peers()
    for group in table1_cnn() + peers:
        cand = complete[(complete["group"] == group) & complete[key].notna()]
        if cand.empty and group in peers:
            # A single fixed model (clinical / radiomics Cox) has nothing to select.
            cand = complete[complete["group"] == group]
            if len(cand) != 1:
                if len(s[s["group"] == group]):
                    rows.append({"group": group, "config": None, "d": None, "status": "pending"})
                continue
        if cand.empty:
            if len(s[s["group"] == group]):  # requested, not finished; not requested: left out
                rows.append({"group": group, "config": None, "d": None, "status": "pending"})
            continue
        best = cand.loc[cand[key].idxmax()] if cand[key].notna().any() else cand.iloc[0]
        row = {
            k: best[k]
            for k in ("group", "config", "d", "c_mean", "c_sd", "auc_mean", "auc_sd", "c_n", "auc_n", "n_folds")
        }
        row["selected_by"] = key if len(cand) > 1 else "-"
        row["status"] = "done"
        if base_row is not None and group != BASELINE:
            row["delta_c"] = difference(best["c_mean"], base_row["c_mean"])
            row["delta_auc"] = difference(best["auc_mean"], base_row["auc_mean"])
        rows.append(row)
    return pd.DataFrame(rows)


def fold_predictions(
    predictions: pd.DataFrame, model: str, split: str, protocol: str
) -> dict[int, tuple[pd.DataFrame, pd.DataFrame | None]]:
    """Held-out and training-fold predictions of one model on one split, per fold.

    Args:
        predictions: :data:`PRED_COLUMNS` rows (:func:`collect_predictions`).
        model: model name; split: split name; protocol: ``paper`` / ``inner`` / ``fit``.

    Returns:
        ``{fold: (oof [case_id, fold, risk, time, event], train [case_id, risk, time,
        event] or None)}``; a fold without held-out rows (no valid epoch) is left out.
    """
    sel = predictions[
        (predictions["model"] == model) & (predictions["split"] == split) & (predictions["protocol"] == protocol)
    ]
    oof, train = sel[sel["role"] == "oof"], sel[sel["role"] == "train"]
    out: dict[int, tuple[pd.DataFrame, pd.DataFrame | None]] = {}
    for k, g in oof.groupby("fold", sort=True):
        tr = train[train["fold"] == k]
        out[int(k)] = (
            g[["case_id", "fold", "risk", "time", "event"]].reset_index(drop=True),
            tr[["case_id", "risk", "time", "event"]].reset_index(drop=True) if len(tr) else None,
        )
    return out


def split_oof(
    predictions: pd.DataFrame, model: ModelRef, split: str, protocol: str, n_folds: int
) -> pd.DataFrame | None:
    """The whole held-out frame of one split when all ``n_folds`` folds are there, else None."""
    folds = fold_predictions(predictions, model.name, split, model.oof_protocol(protocol))
    if len(folds) != n_folds:
        return None
    return pd.concat([f[0] for f in folds.values()], ignore_index=True)


def paired_comparisons(
    predictions: pd.DataFrame,
    models: Sequence[ModelRef],
    reference: ModelRef,
    protocol: str,
    splits: Sequence[str],
    n_folds: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[PairedRow]:
    """Each model vs ``reference`` on identical folds: Δ C-index with CI and p-values.

    Uses every CV repeat (``splits``, ``cv<r>``) that both have finished (all folds); the
    held-out frames get a ``repeat`` column so
    :func:`pipeline.stats.paired_bootstrap_delta` resamples patients within each
    (repeat, fold) and runs the Nadeau-Bengio corrected resampled t-test over the
    J = folds x repeats per-fold deltas.

    Returns:
        One record per model: ``model, label, kind, reference, protocol, splits, status``
        and, when done, the :class:`pipeline.stats.PairedComparison` fields (``delta,
        ci_low, ci_high, p_value, fold_test``, per-fold values ...).
    """
    out = []
    for m in models:
        if m.name == reference.name:
            continue
        rec: dict[str, Any] = {
            "model": m.name,
            "label": m.label,
            "kind": m.kind,
            "reference": reference.name,
            "protocol": protocol,
        }
        frames_a, frames_b, shared = [], [], []
        for split in splits:
            a = split_oof(predictions, reference, split, protocol, n_folds)
            b = split_oof(predictions, m, split, protocol, n_folds)
            if a is None or b is None:
                continue
            frames_a.append(a.assign(repeat=int(split[2:])))
            frames_b.append(b.assign(repeat=int(split[2:])))
            shared.append(split)
        rec["splits"] = shared
        if not shared:
            out.append(rec | {"status": "pending"})
            continue
        try:
            res = paired_bootstrap_delta(pd.concat(frames_a), pd.concat(frames_b), n_boot=n_boot, seed=seed)
        except ValueError as exc:
            rec.update(status="undefined", reason=str(exc))
        else:
            rec.update(status="done", **res.to_dict())
        out.append(rec)
    return out


def loco_centre_table(folds: pd.DataFrame, survival: pd.DataFrame, centres: Sequence[str]) -> list[LocoCentre]:
    """Per LOCO fold: ``fold, centre, n, events, events_before_365``."""
    out = []
    for k, centre in enumerate(centres):
        held = held_out(folds, survival, LOCO, k)
        t, e = held["time"].to_numpy(float), held["event"].to_numpy(int)
        out.append(
            {
                "fold": k,
                "centre": centre,
                "n": int(len(held)),
                "events": int(e.sum()),
                "events_before_365": int(((t <= ONE_YEAR_DAYS) & (e == 1)).sum()),
            }
        )
    return out


def loco_results(
    records: pd.DataFrame,
    predictions: pd.DataFrame,
    centres: list[LocoCentre],
    models: Sequence[ModelRef],
    protocols: Sequence[str],
) -> LocoSection:
    """Leave-one-centre-out: per held-out centre metrics and the pooled result per model.

    Per centre: C-index and 1-year AUROC, or the reason they are undefined (a centre
    without an event, or without an event before 365 d). Pooled: the mean over centres
    where the metric is defined (t-interval clipped to [0, 1]), and Harrell's C of all
    held-out predictions pooled (risks of different fold models side by side: a summary,
    not a fold metric).

    Args:
        records: per-fold records (the ``loco`` rows are used).
        predictions: :data:`PRED_COLUMNS` rows.
        centres: :func:`loco_centre_table`; empty = no LOCO split (returns ``{}``).
        models: the study's models; protocols: the CNN protocols present.

    Returns:
        ``{"centres": centres, "models": [{"model", "label", "kind", "protocol",
        "per_centre": [...], "mean_c_index", "mean_auc_1y", "pooled_c_index", "n_done"}]}``.
    """
    if not centres:
        return {}
    loco = records[records["split"] == LOCO]
    out_models = []
    for m in models:
        for proto in protocols if m.kind == "cnn" else protocols[:1]:
            g = loco[(loco["config"] == m.name) & (loco["protocol"] == proto)].set_index("fold")
            if g.empty:
                continue
            per = [_loco_cell(g.loc[ci["fold"]] if ci["fold"] in g.index else None, ci) for ci in centres]
            oof = split_oof(predictions, m, LOCO, proto, len(centres))
            out_models.append(
                {
                    "model": m.name,
                    "label": m.label,
                    "kind": m.kind,
                    "protocol": proto if m.kind == "cnn" else "fit",
                    "per_centre": per,
                    "n_done": sum(p["done"] for p in per),
                    "mean_c_index": mean_ci(
                        [p["c_index"] for p in per if p["c_index"] is not None] or [np.nan], bounds=UNIT_RANGE
                    ),
                    "mean_auc_1y": mean_ci(
                        [p["auc_1y"] for p in per if p["auc_1y"] is not None] or [np.nan], bounds=UNIT_RANGE
                    ),
                    "pooled_c_index": _pooled_c(oof),
                }
            )
    return {"centres": centres, "models": out_models}


def _loco_cell(r: pd.Series | None, centre: dict[str, Any]) -> dict[str, Any]:
    done = bool(r is not None and r["done"])
    return {
        "fold": centre["fold"],
        "centre": centre["centre"],
        "done": done,
        "c_index": float_or_none(r["c_index"]) if done else None,
        "c_index_reason": (r["c_index_reason"] or None) if done and not finite(r["c_index"]) else None,
        "auc_1y": float_or_none(r["auc_1y"]) if done else None,
        "auc_1y_reason": (r["auc_1y_reason"] or None) if done and not finite(r["auc_1y"]) else None,
    }


def _pooled_c(oof: pd.DataFrame | None) -> float | None:
    if oof is None:
        return None
    return c_index_value(oof["time"].to_numpy(float), oof["event"].to_numpy(int), oof["risk"].to_numpy(float)).value


def survival_analysis(
    predictions: pd.DataFrame,
    model: ModelRef,
    protocol: str,
    splits: Sequence[str],
    n_folds: int,
    *,
    horizon: float = ONE_YEAR_DAYS,
    n_groups: int = 5,
) -> SurvivalModel:
    """Integrated Brier score, calibration at ``horizon`` and risk-group KM of one model.

    Per fold, the Breslow baseline hazard is fitted on that fold's TRAINING risks and
    turns the held-out risks into S(t | x) (:func:`pipeline.stats.breslow_survival`):

    * IBS (:func:`pipeline.stats.integrated_brier_score`) on the fold's valid time grid
      (:func:`pipeline.stats.ibs_time_grid`, 50 points), for every finished fold of the CV
      ``splits``; the covariate-free reference (all risks 0: the Breslow estimate is then
      the Nelson-Aalen curve of the training fold) is computed on the same folds;
    * calibration at ``horizon``: predicted P(event by horizon) pooled over the folds of
      ``cv0`` (each patient once) vs the Kaplan-Meier observed proportion per quantile
      group (:func:`pipeline.stats.calibration_at`), plus one all-cases group;
    * risk groups on ``cv0``: high when the risk exceeds the TRAINING fold's median
      (:func:`pipeline.stats.risk_groups`), pooled, Kaplan-Meier and log-rank
      (:func:`pipeline.stats.km_logrank`).

    Args:
        predictions: :data:`PRED_COLUMNS` rows.
        model: the model; protocol: the CNN protocol (peers use ``fit``).
        splits: the CV splits; n_folds: folds per CV split.

    Returns:
        ``{"model", "label", "protocol", "status", "ibs": {"per_fold", "mean", "null_mean"},
        "calibration": {"groups", "overall"}, "km": KMResult.to_dict() + "status"}``;
        ``status`` is ``"pending"`` until every fold of ``cv0`` is finished with its
        training risks.
    """
    proto = model.oof_protocol(protocol)
    out: dict[str, Any] = {
        "model": model.name,
        "label": model.label,
        "kind": model.kind,
        "protocol": proto,
        "horizon": horizon,
    }
    rows = [
        _fold_ibs(split, k, oof, train)
        for split in splits
        for k, (oof, train) in fold_predictions(predictions, model.name, split, proto).items()
        if train is not None
    ]
    out["ibs"] = {
        "per_fold": rows,
        "mean": mean_ci([r["ibs"] for r in rows if r.get("ibs") is not None] or [np.nan], bounds=UNIT_RANGE),
        "null_mean": mean_ci(
            [r["ibs_null"] for r in rows if r.get("ibs_null") is not None] or [np.nan], bounds=UNIT_RANGE
        ),
    }
    first = fold_predictions(predictions, model.name, FIRST_SPLIT, proto)
    if len(first) != n_folds or any(tr is None for _, tr in first.values()):
        return out | {"status": "pending"}
    return out | _calibration_and_km(first, horizon, n_groups) | {"status": "done"}


def _fold_ibs(split: str, fold: int, oof: pd.DataFrame, train: pd.DataFrame) -> dict[str, Any]:
    """IBS of one fold and of its no-covariate reference, or the reason it is undefined."""
    row: dict[str, Any] = {"split": split, "fold": fold}
    tr_t, tr_e = train["time"].to_numpy(float), train["event"].to_numpy(int)
    te_t, te_e = oof["time"].to_numpy(float), oof["event"].to_numpy(int)
    grid_t = ibs_time_grid(tr_t, te_t, n=50)
    if grid_t.shape[0] < 2:
        return row | {
            "ibs": None,
            "ibs_null": None,
            "reason": TOO_FEW_VALID_TIMES,
            "detail": "the test and training follow-ups overlap in fewer than 2 time points",
        }
    try:
        surv = breslow_survival(train["risk"].to_numpy(float), tr_t, tr_e, oof["risk"].to_numpy(float), grid_t)
        row["ibs"] = integrated_brier_score(tr_t, tr_e, te_t, te_e, surv, grid_t)
        null = breslow_survival(np.zeros(len(tr_t)), tr_t, tr_e, np.zeros(len(te_t)), grid_t)
        row["ibs_null"] = integrated_brier_score(tr_t, tr_e, te_t, te_e, null, grid_t)
    except MetricUndefined as exc:  # malformed inputs still raise: a defect, not a fact to report
        row.update(ibs=None, ibs_null=None, reason=exc.reason, detail=exc.detail)
    return row


def _calibration_and_km(
    first: dict[int, tuple[pd.DataFrame, pd.DataFrame]], horizon: float, n_groups: int
) -> dict[str, Any]:
    """Calibration at ``horizon`` and risk-group KM of the pooled folds of one split."""
    probs, groups, frames = [], [], []
    for _, (oof, train) in sorted(first.items()):
        s = breslow_survival(
            train["risk"].to_numpy(float),
            train["time"].to_numpy(float),
            train["event"].to_numpy(int),
            oof["risk"].to_numpy(float),
            [horizon],
        )
        probs.append(1.0 - s[:, 0])
        groups.append(risk_groups(train["risk"].to_numpy(float), oof["risk"].to_numpy(float)))
        frames.append(oof)
    pooled = pd.concat(frames, ignore_index=True)
    p, grp = np.concatenate(probs), np.concatenate(groups)
    t, e = pooled["time"].to_numpy(float), pooled["event"].to_numpy(int)
    out: dict[str, Any] = {
        "calibration": {
            "groups": clean(calibration_at(horizon, p, t, e, n_groups=n_groups)),
            "overall": clean(calibration_at(horizon, p, t, e, n_groups=1))[0],
        }
    }
    if len(np.unique(grp)) < 2:
        out["km"] = {"status": "undefined", "reason": "every case falls in one risk group"}
    else:
        out["km"] = {"status": "done", **km_logrank(t, e, np.where(grp == 1, "high", "low")).to_dict()}
    return out


def selected_models(models: Sequence[ModelRef], t1: pd.DataFrame) -> list[ModelRef]:
    """Baseline, the Table 1 winner of each embedding set, and the Table 1 peers."""
    by_name = {m.name: m for m in models}
    names = [BASELINE] if BASELINE in by_name else []
    names += [r["config"] for r in t1.to_dict("records") if r.get("status") == "done" and r["config"] != BASELINE]
    return [by_name[n] for n in dict.fromkeys(names) if n in by_name]


def identical_groups(records: pd.DataFrame, peer_fits: pd.DataFrame | None = None) -> list[IdenticalGroup]:
    """Configurations of one model family whose every per-fold result is identical, and why.

    Two configurations are identical when they have the same finished folds and the same
    C-index and 1-year AUROC on every (split, protocol, fold). For embedding heads the
    reason is read from the fitted PCA sizes: when every fold kept the same number of
    components for each of them, d was capped at the training-fold size.

    Args:
        records: per-fold records (:func:`collect_records` + :func:`collect_peer_records`).
        peer_fits: :func:`collect_peer_fits` rows (``<block>_pca_components`` per fold).

    Returns:
        ``[{"group", "configs", "d", "shown", "reason"}]``: ``shown`` (the first of
        ``configs``) stands for the group in the tables.
    """
    out = []
    for group, g in records.groupby("group", sort=False):
        by_print: dict[tuple, list[str]] = {}
        for config, c in g.groupby("config", sort=False):
            if c["done"].any() and c["c_index"].notna().any():
                by_print.setdefault(_fingerprint(c), []).append(config)
        for configs in by_print.values():
            if len(configs) > 1:
                d = [str(g.loc[g["config"] == c, "d"].iloc[0]) for c in configs]
                out.append(
                    {
                        "group": group,
                        "configs": configs,
                        "d": d,
                        "shown": configs[0],
                        "reason": _identical_reason(configs, d, peer_fits, g.loc[g["config"].isin(configs), "c_index"]),
                    }
                )
    return out


def _fingerprint(rows: pd.DataFrame) -> tuple:
    r = rows.sort_values(["split", "protocol", "fold"])
    return tuple(
        (s, p, int(k), bool(done), *(round(float(v), 12) if finite(v) else None for v in (c, a)))
        for s, p, k, done, c, a in r[["split", "protocol", "fold", "done", "c_index", "auc_1y"]].itertuples(index=False)
    )


def _identical_reason(
    configs: list[str], d: list[str], peer_fits: pd.DataFrame | None, c_index: pd.Series | None = None
) -> str:
    """Why a group of configurations gave identical results: capped PCA sizes (embedding heads),
    a constant risk (every C-index 0.5), or, when neither is recorded, a plain statement."""
    same = f"d = {', '.join(d)}"
    c = pd.to_numeric(c_index, errors="coerce").dropna() if c_index is not None else pd.Series(dtype=float)
    unexplained = (
        f"{same} gave the same C-index and 1-year AUROC on every fold; the runs record nothing "
        "that explains it (the projection size made no difference to these predictions)"
    )
    if len(c) and bool(np.allclose(c, 0.5)):
        unexplained = (
            f"every fold of {same} has C-index 0.500: the predicted risk was constant, so d "
            "could not change the ranking"
        )
    fits = peer_fits[peer_fits["peer"].isin(configs)] if peer_fits is not None and len(peer_fits) else pd.DataFrame()
    cols = [c for c in fits.columns if c.endswith("_pca_components") and fits[c].notna().any()]
    if fits.empty or not cols:
        return unexplained
    sizes = {
        c: [tuple(r) for r in g.sort_values(["split", "fold"])[cols].itertuples(index=False)]
        for c, g in fits.groupby("peer")
    }
    if len(set(map(tuple, sizes.values()))) != 1:
        return unexplained
    kept = pd.to_numeric(fits[cols].stack(), errors="coerce").dropna().astype(int)
    k = f"{kept.min()}" if kept.min() == kept.max() else f"{kept.min()}-{kept.max()}"
    return (
        f"PCA is capped at the training-fold size (n_train - 1): every fold keeps {k} components "
        f"per encoder whatever d, so {same} fit the same model"
    )


def learning_curves(curves: pd.DataFrame, cells: pd.DataFrame, split: str = FIRST_SPLIT) -> LearningCurves:
    """Fold-mean learning curves per configuration of one split.

    x = epochs completed: 0 is the evaluation before the first step (``done.json``
    ``start``), x = e + 1 the row written after epoch e. Each point is the mean over the
    folds that reached it (early stopping ends folds at different epochs; ``n_folds``).

    Args:
        curves: :func:`collect_training` curves (``split, config, fold, epoch`` + columns).
        cells: :func:`collect_training` cells (``start_<score>``).
        split: the split to draw.

    Returns:
        ``{"split", "columns", "configs": [{"config", "x", <column>: [...], "n_folds"}]}``;
        ``columns`` lists the :data:`LOSS_COLUMNS` + :data:`EVAL_COLUMNS` present.
    """
    cols = [c for c in LOSS_COLUMNS + EVAL_COLUMNS if c in curves.columns]
    out = []
    sub = curves[curves["split"] == split]
    order = list(dict.fromkeys(cells.loc[cells["split"] == split, "config"])) if len(cells) else []
    for config in order + [c for c in sub["config"].unique() if c not in order]:
        g = sub[sub["config"] == config]
        if g.empty:
            continue
        mean = g.groupby("epoch")[cols].mean()
        n = g.groupby("epoch")["fold"].nunique()
        start = cells[(cells["split"] == split) & (cells["config"] == config) & cells["done"].astype(bool)]
        entry: dict[str, Any] = {
            "config": config,
            "x": [0] + [int(e) + 1 for e in mean.index],
            "n_folds": [int(len(start))] + [int(v) for v in n],
        }
        for c in cols:
            first = (
                float(start[f"start_{c}"].mean())
                if f"start_{c}" in start and start[f"start_{c}"].notna().any()
                else float("nan")
            )
            entry[c] = [first] + [float(v) for v in mean[c]]
        out.append(entry)
    return {"split": split, "columns": cols, "configs": out}


def cell_training(cells: pd.DataFrame, curves: pd.DataFrame, records: pd.DataFrame) -> list[CellTraining]:
    """Per finished CNN cell: segmentation Dice and train C-index at the start and at the end.

    ``dice_start`` / ``train_c_start``: before the first step; ``dice_end`` /
    ``train_c_end``: after the last epoch run; ``train_c_epochs``: the epochs whose curve
    row has a training C-index (``TrainConfig.train_c_every``: every k-th and the last);
    ``selected_epoch_<protocol>`` and ``epochs_run`` show whether selection picked the last
    epoch (still improving).
    """
    out = []
    for row in cells[cells["done"].astype(bool)].to_dict("records"):
        g = curves[
            (curves["split"] == row["split"]) & (curves["config"] == row["config"]) & (curves["fold"] == row["fold"])
        ].sort_values("epoch")
        last = g.iloc[-1] if len(g) else pd.Series(dtype=float)
        train_c = g["train_c_index"].dropna() if "train_c_index" in g else pd.Series(dtype=float)
        rec = records[
            (records["kind"] == "cnn")
            & (records["split"] == row["split"])
            & (records["config"] == row["config"])
            & (records["fold"] == row["fold"])
        ]
        out.append(
            {
                "split": row["split"],
                "config": row["config"],
                "fold": int(row["fold"]),
                "epochs_run": row["epochs_run"],
                "dice_start": float_or_none(row.get("start_val_dice_outer")),
                "dice_end": float_or_none(last.get("val_dice_outer")),
                "train_c_start": float_or_none(row.get("start_train_c_index")),
                "train_c_end": float_or_none(last.get("train_c_index")),
                "train_c_epochs": len(train_c),
                **{f"selected_epoch_{p}": _int_or_none(v) for p, v in zip(rec["protocol"], rec["selected_epoch"])},
            }
        )
    return out


def _int_or_none(x: Any) -> int | None:
    return int(x) if finite(x) else None


def training_summary(cells: list[CellTraining]) -> TrainingSummary:
    """Means over cells of Dice / train C-index at start and end, and how many cells selected
    their last epoch (per protocol): a sign that training had not converged."""
    df = pd.DataFrame(cells)
    out: dict[str, Any] = {"n_cells": len(df)}
    if df.empty:
        return out
    for col in ("dice_start", "dice_end", "train_c_start", "train_c_end"):
        out[col] = float_or_none(pd.to_numeric(df[col], errors="coerce").mean())
    for col in ("train_c_epochs", "epochs_run"):  # [fewest, most] over cells
        values = pd.to_numeric(df.get(col, pd.Series(dtype=float)), errors="coerce").dropna()
        if len(values):
            out[col] = [int(values.min()), int(values.max())]
    for proto in PROTOCOL_ORDER:
        col = f"selected_epoch_{proto}"
        if col in df:
            ok = df[col].notna() & df["epochs_run"].notna()
            last = df.loc[ok, "epochs_run"].astype(int) - 1
            out[f"selected_last_{proto}"] = int((df.loc[ok, col].astype(int) == last).sum())
            out[f"n_selected_{proto}"] = int(ok.sum())
    return out


def headline(
    t1: dict[str, pd.DataFrame],
    paired: dict[str, list[dict[str, Any]]],
    oracle_c_index: float | None = None,
    noise: dict[str, dict[str, Any]] | None = None,
) -> Headline:
    """The first screen: Table 1's rows (baseline, best d per embedding set, peers) per
    protocol, unbiased first, each with its paired Δ C-index vs the baseline and 95 % CI.

    Values are copied from ``t1`` and ``paired`` (never recomputed), so they equal the full
    tables.

    Args:
        t1: :func:`table1` per protocol.
        paired: :func:`paired_comparisons` vs the baseline per protocol.
        oracle_c_index: C-index of the true risk (synthetic cohort), when known.
        noise: the baseline's :func:`pipeline.report.noise.seed_noise` row per protocol,
            where it has several training seeds.

    Returns:
        ``{"protocols", "rows": {protocol: [...]}, "oracle_c_index", "training_noise"}``; a
        row holds ``group, label, config, d, status, c_mean, c_sd, c_n, n_folds, auc_mean,
        auc_sd, auc_n`` and ``paired_status, delta, ci_low, ci_high, p_value, paired_splits``
        and, where the baseline's training noise is measured, ``within_baseline_noise``
        (:func:`pipeline.report.noise.within_training_noise` of its Δ). ``training_noise``:
        per protocol with a measured noise, ``n_seeds, mean, sd, threshold`` (the largest
        |Δ| within it).
    """
    protocols = [p for p in PROTOCOL_ORDER if p in t1]
    noise = {p: n for p, n in (noise or {}).items() if p in protocols and finite(n.get("sd"))}
    rows: dict[str, list[dict[str, Any]]] = {}
    for proto in protocols:
        pmap = {r["model"]: r for r in paired.get(proto, [])}
        rows[proto] = [
            _headline_row(r, pmap.get(r.get("config")), (noise.get(proto) or {}).get("sd"))
            for r in t1[proto].to_dict("records")
        ]
    training_noise = {
        p: {"n_seeds": n["n_seeds"], "mean": n["mean"], "sd": n["sd"], "threshold": NOISE_SD_MULTIPLE * n["sd"]}
        for p, n in noise.items()
    }
    return {
        "protocols": protocols,
        "rows": rows,
        "oracle_c_index": float_or_none(oracle_c_index),
        "training_noise": training_noise,
    }


def _headline_row(t: dict[str, Any], p: dict[str, Any] | None, noise_sd: float | None = None) -> dict[str, Any]:
    row = {
        "group": t["group"],
        "label": group_label(t["group"]),
        "config": t.get("config"),
        "d": t.get("d"),
        "status": t["status"],
    }
    row |= {k: t.get(k) for k in ("c_mean", "c_sd", "c_n", "n_folds", "auc_mean", "auc_sd", "auc_n")}
    if t["group"] == BASELINE:
        return row | {"paired_status": "reference"}
    if p is None:
        return row | {"paired_status": "pending"}
    row["paired_status"] = p["status"]
    if p["status"] == "done":
        row |= {k: p[k] for k in ("delta", "ci_low", "ci_high", "p_value")} | {"paired_splits": p["splits"]}
        if noise_sd is not None:
            row["within_baseline_noise"] = within_training_noise(p["delta"], noise_sd)
    return row


def headline_sentences(head: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """Two or three sentences from the headline numbers: what they show and what they cannot.

    Args:
        head: :func:`headline`.
        facts: ``random_init, synthetic, n_cases, n_events, n_folds`` and ``baseline_sd``
            (fold SD of the baseline C-index), any may be missing.
    """
    if not head["protocols"]:
        return ["No configuration has finished yet."]
    proto = head["protocols"][0]
    rows = {r["group"]: r for r in head["rows"][proto]}
    base = rows.get(BASELINE)
    if base is None or base["status"] != "done":
        out = ["The DeepMTS+DAFT baseline has not finished all folds yet, so no difference from it can be stated."]
    else:
        out = [_sentence_fm(base, rows, proto)]
        noise = _sentence_noise(rows, (head.get("training_noise") or {}).get(proto))
        if noise:
            out.append(noise)
        peers = _sentence_peers(rows, head.get("oracle_c_index"))
        if peers:
            out.append(peers)
    caveats = _caveats(rows, facts)
    if caveats:
        out.append("What these numbers cannot show: " + "; ".join(caveats) + ".")
    return out


def _delta_text(r: dict[str, Any]) -> str:
    return f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def _sentence_fm(base: dict[str, Any], rows: dict[str, dict[str, Any]], proto: str) -> str:
    text = f"Under {PROTOCOL_LABELS[proto]} the DeepMTS+DAFT baseline reaches a C-index of {base['c_mean']:.3f}"
    if finite(base.get("auc_mean")):
        defined = f"{_count(base.get('auc_n'))} of {_count(base.get('n_folds'))}"
        text += f" (1-year AUROC {base['auc_mean']:.3f}, defined in {defined} folds)"
    fm = [rows[g] for g in table1_cnn()[1:] if g in rows and rows[g].get("paired_status") == "done"]
    if not fm:
        return text + "; no configuration with FM embeddings has a paired comparison yet."
    parts = [f"{embedding_set(r['group']).label} (d = {r['d']}) {_delta_text(r)}" for r in fm]
    return text + "; adding FM embeddings changes it by " + ", ".join(parts) + " (paired Δ, 95 % CI)."


def _sentence_noise(rows: dict[str, dict[str, Any]], noise: dict[str, Any] | None) -> str:
    """The baseline's training noise and, by :data:`pipeline.report.noise.NOISE_RULE`, which FM
    rows' headline Δ lies within it; empty when the noise is not measured."""
    if not noise:
        return ""
    text = (
        f"Over {noise['n_seeds']} training seeds the baseline's fold-mean C-index is {noise['mean']:.3f} "
        f"± {noise['sd']:.3f} (SD over seeds: its training noise)"
    )
    fm = [rows[g] for g in table1_cnn()[1:] if g in rows and rows[g].get("within_baseline_noise") is not None]
    if not fm:
        return text + "; no FM configuration has a paired Δ to hold against it yet."

    def names(within: bool) -> str:
        return ", ".join(
            f"{embedding_set(r['group']).label} (d = {r['d']}, {r['delta']:+.3f})"
            for r in fm
            if r["within_baseline_noise"] == within
        )

    parts = [
        f"{side} it for {names(within)}" for side, within in (("within", True), ("beyond", False)) if names(within)
    ]
    return (
        text
        + f"; by the rule |Δ| ≤ {NOISE_SD_MULTIPLE:g} × SD = {noise['threshold']:.3f}, the Δ above lies "
        + " and ".join(parts)
        + ' ("Training noise" repeats each Δ over the baseline\'s seeds, its CI holding their variance).'
    )


def _count(x: Any) -> str:
    """A fold count as an integer (``2.0`` -> ``"2"``), ``?`` when unknown."""
    return str(int(x)) if finite(x) else "?"


def _sentence_peers(rows: dict[str, dict[str, Any]], oracle: float | None) -> str:
    peers = [rows[g] for g in table1_peers() if g in rows and rows[g]["status"] == "done" and finite(rows[g]["c_mean"])]
    parts = []
    if peers:
        lo, hi = min(peers, key=lambda r: r["c_mean"]), max(peers, key=lambda r: r["c_mean"])
        parts.append(
            f"the classical peers reach {lo['c_mean']:.3f} ({_peer_name(lo)}) to {hi['c_mean']:.3f} ({_peer_name(hi)})"
            if lo is not hi
            else f"the classical peer reaches {lo['c_mean']:.3f} ({_peer_name(lo)})"
        )
    if finite(oracle):
        parts.append(f"the true risk of this synthetic cohort would reach {oracle:.3f}")
    if not parts:
        return ""
    text = " and ".join(parts) + "."
    return text[0].upper() + text[1:]


def _peer_name(row: dict[str, Any]) -> str:
    return row["label"].removeprefix("peer: ")


def _row_name(row: dict[str, Any]) -> str:
    """``the clinical Cox peer`` / ``DeepMTS+DAFT + CT (d = 64)``: a headline row in a sentence."""
    if row["label"].startswith("peer: "):
        return f"the {_peer_name(row)} peer"
    return row["label"] + (f" (d = {row['d']})" if row.get("d") not in (None, "-") else "")


def _caveats(rows: dict[str, dict[str, Any]], facts: dict[str, Any]) -> list[str]:
    out = []
    if facts.get("random_init"):
        out.append(
            "the encoders are randomly initialised, so the FM rows test the pipeline and say nothing "
            "about CT-FM or PET-FM"
        )
    if facts.get("synthetic"):
        out.append("the cohort is synthetic, not HECKTOR 2022")
    n_folds, n_cases, n_events = facts.get("n_folds"), facts.get("n_cases"), facts.get("n_events")
    if n_folds and n_cases and n_events is not None and n_events / n_folds < 50:
        sd = facts.get("baseline_sd")
        out.append(
            f"a held-out fold has about {n_cases / n_folds:.0f} cases and {n_events / n_folds:.0f} events, "
            "too few for a precise C-index" + (f" (fold SD of the baseline {sd:.3f})" if finite(sd) else "")
        )
    done = [r for r in rows.values() if r.get("paired_status") == "done"]
    if done:
        outside = [
            f"{_row_name(r)} ({'below' if r['delta'] < 0 else 'above'} the baseline)"
            for r in done
            if not r["ci_low"] <= 0 <= r["ci_high"]
        ]
        out.append(
            "every difference from the baseline lies inside its 95 % CI, so none is resolved"
            if not outside
            else f"the 95 % CI of the difference from the baseline excludes 0 only for {', '.join(outside)}"
            + (", but against a baseline that barely trained" if facts.get("baseline_barely_trained") else "")
        )
    if facts.get("baseline_barely_trained"):
        out.append(
            "the baseline barely trained (" + _baseline_training_text(facts) + "), so a difference from it "
            "says little about what the embeddings add; train longer before reading the Δ column"
        )
    return out


def _baseline_training_text(facts: dict[str, Any]) -> str:
    """``train C-index 0.503 after 8 optimiser steps`` (either part when only it is known)."""
    parts = []
    if finite(facts.get("baseline_train_c")):
        parts.append(f"mean train C-index {facts['baseline_train_c']:.3f}")
    if facts.get("baseline_steps") is not None:
        parts.append(f"{'after' if parts else 'only'} {facts['baseline_steps']} optimiser steps")
    return " ".join(parts)


def analyses_run(spec: StudySpec) -> list[AnalysisRun]:
    """Which analysis ran on which models (stated in the report and results.json)."""
    cnn = spec.cnn_splits()
    peers = [p.name for p in spec.peer_list()]
    cv_all = [s for s in spec.splits() if s != LOCO]
    cv_cnn = [s for s in cnn if s != LOCO]
    return [
        {
            "analysis": f"cross-validation ({spec.n_folds} folds), repeats",
            "cnn": cv_cnn,
            "peers": cv_all if peers else [],
        },
        {
            "analysis": "leave-one-centre-out",
            "cnn": [LOCO] if LOCO in cnn else [],
            "peers": [LOCO] if LOCO in spec.splits() and peers else [],
        },
        {"analysis": "paired comparisons vs CNN baseline", "cnn": cv_cnn, "peers": cv_cnn if peers else []},
        {"analysis": "peers vs clinical Cox (paired)", "cnn": [], "peers": cv_all if "clinical-cox" in peers else []},
        {
            "analysis": "IBS (every CV fold), calibration and KM risk groups (cv0)",
            "cnn": cv_cnn,
            "peers": cv_all if peers else [],
        },
    ] + (
        [
            {
                "analysis": f"training noise: {spec.seeds} training seeds of "
                + ", ".join(c.name for c in spec.seed_configurations()),
                "cnn": [FIRST_SPLIT],
                "peers": [],
            }
        ]
        if spec.seed_configurations()
        else []
    )


def study_facts(study: StudyRecord) -> Facts:
    """What the headline sentences and the stamp need from ``study.json``."""
    spec, cohort, info = study.get("spec", {}), study.get("cohort", {}), study.get("info", {})
    return {
        "random_init": bool((study.get("embeddings") or {}).get("random_init")),
        "synthetic": bool(info.get("synthetic")),
        "n_cases": cohort.get("n_cases"),
        "n_events": cohort.get("n_events"),
        "n_folds": spec.get("n_folds"),
    }


#: A baseline whose mean train C-index ended below this, or that ran fewer optimiser steps
#: than :data:`MIN_BASELINE_STEPS`, "barely trained": a difference from it is called out as such.
MIN_BASELINE_TRAIN_C = 0.55
MIN_BASELINE_STEPS = 50


def baseline_training(cells: list[CellTraining], train: dict[str, Any]) -> Facts:
    """How far the baseline trained: ``baseline_train_c`` (mean train C-index after the last
    epoch over its finished cells), ``baseline_steps`` (fewest optimiser steps of a cell:
    epochs run x ``steps_per_epoch``) and ``baseline_barely_trained`` (either below its floor,
    :data:`MIN_BASELINE_TRAIN_C` / :data:`MIN_BASELINE_STEPS`). Empty without a finished cell."""
    base = [c for c in cells if c["config"] == BASELINE]
    if not base:
        return {}
    c_end = [float(c["train_c_end"]) for c in base if finite(c.get("train_c_end"))]
    per_epoch = train.get("steps_per_epoch")
    steps = [int(c["epochs_run"]) * int(per_epoch) for c in base if finite(c.get("epochs_run")) and finite(per_epoch)]
    train_c = float(np.mean(c_end)) if c_end else None
    fewest = min(steps) if steps else None
    barely = (train_c is not None and train_c < MIN_BASELINE_TRAIN_C) or (
        fewest is not None and fewest < MIN_BASELINE_STEPS
    )
    return {"baseline_train_c": train_c, "baseline_steps": fewest, "baseline_barely_trained": bool(barely)}


def stamp_text(facts: Facts) -> str | None:
    """The warning every figure carries, or None for pretrained encoders on real data."""
    parts = (["RANDOM-INIT ENCODERS"] if facts.get("random_init") else []) + (
        ["SYNTHETIC COHORT"] if facts.get("synthetic") else []
    )
    return " + ".join(parts) + ": tests the pipeline, not the foundation models" if parts else None


def settings_rows(spec: StudySpec, study: StudyRecord) -> list[list[str]]:
    """``[item, value]`` rows of the report's "Data and settings" table."""
    info, emb, cohort = study.get("info", {}), study.get("embeddings") or {}, study["cohort"]
    oracle = info.get("oracle_c_index")
    return [
        ["data source", str(info.get("data_source", spec.manifest))],
        [
            "cases / events",
            f"{cohort['n_cases']} / {cohort['n_events']} "
            f"({100 * cohort['n_events'] / max(1, cohort['n_cases']):.0f} % events), "
            f"{cohort.get('n_centres', '?')} centre(s)",
        ],
        [
            "oracle C-index (true risk of the synthetic cohort)",
            f"{oracle:.3f}" if finite(oracle) else "n/a (no truth file)",
        ],
        [
            "embeddings",
            "none"
            if not emb
            else f"{emb['path']} (sha256 {emb['sha256'][:16]}…; "
            + ", ".join(
                f"{m}: {a.get('encoder', '?')}, weights {str(a.get('weights_sha256', '?'))[:16]}"
                for m, a in emb.get("modalities", {}).items()
            )
            + ")",
        ],
        ["FM weights", "RANDOM-INIT (demo)" if emb.get("random_init") else ("pretrained" if emb else "-")],
        ["settings", str(info.get("settings", "paper"))],
        ["survival input (D, H, W)", str(tuple(cohort.get("survival_input_size_dhw", [])))],
        [
            "CV",
            f"{spec.n_folds} folds, stratified by event and RFS quartile, seed {spec.folds_seed}; "
            "identical folds for every configuration",
        ],
        [
            "training options (non-default)",
            ", ".join(f"{k}={v}" for k, v in sorted(spec.train.items())) or "paper defaults",
        ],
    ]


def provenance_rows(spec: StudySpec, study: StudyRecord) -> list[list[str | None]]:
    """``[item, value]`` rows of the report's provenance table."""
    emb, cohort = study.get("embeddings") or {}, study["cohort"]
    return [
        ["report code version", code_version()],
        ["study code version", study.get("code_version")],
        ["study spec hash", study.get("spec_hash")],
        ["manifest", spec.manifest],
        ["preprocessed cache", f"{spec.cache_root} (params hash {study.get('cache_params_hash')})"],
        ["embeddings sha256", emb.get("sha256", "-")],
        [
            "embeddings attributes",
            ", ".join(f"{k}={v}" for k, v in sorted(emb.get("attrs", {}).items()) if k not in ("created",)) or "-",
        ],
        ["folds hash", study.get("folds_hash")],
        ["case set sha256", cohort.get("case_set_sha256")],
        ["generated", utc_now()],
    ]


def undefined_metrics(records: pd.DataFrame) -> list[UndefinedMetric]:
    """Per metric, how many finished CV fold results have it undefined, and why.

    A fold result is one model, protocol and fold (a peer once: its rows repeat under each
    CNN protocol). LOCO folds are left out: the LOCO table gives each centre's reason.

    Returns:
        ``[{"metric", "n_results", "n_undefined", "reasons": {code: count}}]`` for
        ``c_index`` and ``auc_1y``.
    """
    if records.empty:
        return []
    done = records[records["done"].astype(bool) & (records["split"] != LOCO)]
    done = done.assign(_proto=np.where(done["kind"] == "cnn", done["protocol"], "fit"))
    done = done.drop_duplicates(["kind", "split", "config", "fold", "_proto"])
    out = []
    for metric in ("c_index", "auc_1y"):
        bad = done[~done[metric].map(finite)]
        reasons = bad[f"{metric}_reason"].map(lambda r: r if isinstance(r, str) and r else "unknown")
        out.append(
            {
                "metric": metric,
                "n_results": len(done),
                "n_undefined": len(bad),
                "reasons": {str(k): int(v) for k, v in reasons.value_counts().items()},
            }
        )
    return out


def compute_summary(records: pd.DataFrame) -> ComputeSummary:
    """CNN cell time (cells trained here) and peer time, from the records' ``seconds``."""
    if records.empty:
        return {"n_cnn_cells": 0}
    cnn, peers = records[records["kind"] == "cnn"], records[records["kind"] == "peer"]
    secs = pd.to_numeric(cnn.drop_duplicates(["split", "config", "fold"])["seconds"], errors="coerce").dropna()
    peer = pd.to_numeric(peers.drop_duplicates(["split", "config", "fold"])["seconds"], errors="coerce").dropna()
    return {
        "n_cnn_cells": int(len(secs)),
        "cnn_minutes": float(secs.sum() / 60) if len(secs) else None,
        "median_cell_seconds": float(secs.median()) if len(secs) else None,
        "peer_minutes": float(peer.sum() / 60),
    }


def analyse(data: StudyData, *, n_boot: int = N_BOOT) -> Results:
    """The results object of a study: every number the report shows (:class:`Results`).

    Args:
        data: :func:`pipeline.report.collect.collect_study`.
        n_boot: bootstrap draws of the paired comparisons.

    Returns:
        A :class:`Results` (NaN left as NaN, frames as frames; :meth:`Results.clean` makes
        it JSON-safe).
    """
    spec, study, records = data.spec, data.study, data.records
    cnn = records[records["kind"] == "cnn"] if len(records) else records
    protocols = [p for p in PROTOCOL_ORDER if p in set(cnn["protocol"])] if len(cnn) else list(PROTOCOL_ORDER)
    summary = summarise_records(records[records["split"] != LOCO])
    t1 = {p: table1(summary, p) for p in protocols}
    by_name = {m.name: m for m in data.models}
    cv = [s for s in spec.splits() if s != LOCO]

    def pairs(models: Sequence[ModelRef], ref: ModelRef, proto: str) -> list[dict[str, Any]]:
        return paired_comparisons(data.predictions, models, ref, proto, cv, spec.n_folds, n_boot=n_boot)

    paired = {p: pairs(data.models, by_name[BASELINE], p) for p in protocols} if BASELINE in by_name else {}
    peers = [m for m in data.models if m.kind == "peer"]
    vs_clinical = pairs(peers, by_name["clinical-cox"], protocols[0]) if "clinical-cox" in by_name else []
    sel = "inner" if "inner" in protocols else protocols[0]
    facts = study_facts(study)
    base = summary[(summary["protocol"] == protocols[0]) & (summary["config"] == BASELINE)]
    facts["baseline_sd"] = float(base["c_sd"].iloc[0]) if len(base) else None
    cells0, curves0 = _seed_zero(data.cells), _seed_zero(data.curves)  # one run per configuration and fold
    cells = cell_training(cells0, curves0, records) if len(cells0) else []
    facts |= baseline_training(cells, spec.train)
    seeds = seeds_section(data, protocols, n_boot)
    noise = {r["protocol"]: r for r in seeds["noise"] if r["config"] == BASELINE}
    head = headline(t1, paired, study.get("info", {}).get("oracle_c_index"), noise)
    head["sentences"] = headline_sentences(head, facts)
    centres = loco_centre_table(data.folds, data.survival, data.centres)
    survival = [
        survival_analysis(data.predictions, m, sel, cv, spec.n_folds) for m in selected_models(data.models, t1[sel])
    ]
    n_done = int(data.cells["done"].sum()) if len(data.cells) else 0
    return Results(
        schema=RESULTS_SCHEMA,
        generated=utc_now(),
        report_code_version=code_version(),
        study=study,
        cells=CellCount(total=len(grid(spec)), done=n_done),
        protocols=protocols,
        protocol_labels=PROTOCOL_LABELS,
        n_boot=n_boot,
        facts=facts,
        stamp=stamp_text(facts),
        settings=settings_rows(spec, study),
        provenance=provenance_rows(spec, study),
        analyses=analyses_run(spec),
        headline=head,
        summary=summary,
        table1=t1,
        identical=identical_groups(records, data.peer_fits),
        paired_vs_baseline=paired,
        paired_vs_clinical_cox=vs_clinical,
        loco=loco_results(records, data.predictions, centres, data.models, protocols),
        survival=SurvivalSection(protocol=sel, horizon_days=ONE_YEAR_DAYS, models=survival),
        training=TrainingSection(curves=learning_curves(curves0, cells0), cells=cells, summary=training_summary(cells)),
        compute=compute_summary(records),
        undefined=undefined_metrics(records),
        records=records,
        environment=data.environments,
        seeds=seeds,
        selection=selection_section(data.curves, data.cells, int(spec.train.get("select_from_epoch", 0))),
    )


def _seed_zero(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the study's own training seed (seed index 0) of a cells / curves frame."""
    return frame[frame["seed"] == 0] if "seed" in frame.columns else frame


def seeds_section(data: StudyData, protocols: Sequence[str], n_boot: int = N_BOOT) -> SeedsSection:
    """The training-noise section of the results (``results.json["seeds"]``).

    Returns:
        ``{"n_seeds", "seed_configs", "noise_rule", "noise_sd_multiple", "noise",
        "paired_vs_baseline"}``: ``noise`` the :func:`pipeline.report.noise.seed_noise` rows
        (mean over seeds of the fold-mean C-index, seed SD, number of seeds per
        configuration and protocol), ``paired_vs_baseline`` per protocol the
        :func:`pipeline.report.noise.seed_paired_comparisons` on ``cv0``, each done one with
        ``within_baseline_noise`` (:func:`pipeline.report.noise.within_training_noise`).
    """
    spec = data.spec
    out: dict[str, Any] = {
        "n_seeds": int(spec.seeds),
        "seed_configs": [c.name for c in spec.seed_configurations()],
        "noise_rule": NOISE_RULE,
        "noise_sd_multiple": NOISE_SD_MULTIPLE,
        "noise": seed_noise(data.seed_records, spec.n_folds),
        "paired_vs_baseline": {},
    }
    by_name = {m.name: m for m in data.models}
    if data.seed_predictions.empty or BASELINE not in by_name:
        return out
    # Every seed of the configurations trained with several, seed 0 of the others.
    seeded = set(data.seed_predictions["model"])
    first = data.predictions[
        (data.predictions["split"] == FIRST_SPLIT)
        & (data.predictions["role"] == "oof")
        & (data.predictions["kind"] == "cnn")
        & ~data.predictions["model"].isin(seeded)
    ]
    frame = pd.concat([data.seed_predictions, first.assign(seed=0)], ignore_index=True)
    base_sd = {r["protocol"]: r["sd"] for r in out["noise"] if r["config"] == BASELINE}
    for proto in protocols:
        rows = seed_paired_comparisons(frame, data.models, by_name[BASELINE], proto, spec.n_folds, n_boot=n_boot)
        for r in rows:
            if r["status"] == "done":
                r["within_baseline_noise"] = within_training_noise(r["delta"], base_sd.get(proto))
        out["paired_vs_baseline"][proto] = rows
    return out


def selection_section(curves: pd.DataFrame, cells: pd.DataFrame, select_from_epoch: int) -> SelectionSection:
    """The checkpoint-selection rule and how often a tie decided it (``results.json["selection"]``):
    ``{"rule", "select_from_epoch", "ties": {protocol: {"n_cells", "n_ties", "cells"}}}`` over
    every finished cell of the study, every seed included (:func:`pipeline.report.noise.selection_ties`)."""
    return {
        "rule": TIE_RULE,
        "select_from_epoch": select_from_epoch,
        "ties": selection_ties(curves, cells, select_from_epoch),
    }
