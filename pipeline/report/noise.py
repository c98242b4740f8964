"""Training noise and checkpoint ties: analyses of the report that read the training itself.

* Training seeds (``run-study --seeds S``): on ``cv0`` a configuration is trained S times,
  seed index s with training seed ``seed + s``, on the same outer folds and the same inner
  split, so the spread of its fold-mean C-index over seeds is the training noise alone
  (:func:`seed_noise`). The paired difference from the baseline then gets a CI that holds
  the seeds' spread as well as the patients' (:func:`seed_paired_comparisons`, through
  :func:`pipeline.stats.paired_bootstrap_delta_seeds`), and a difference is called *within
  the baseline's training noise* by one rule, :func:`within_training_noise`.
* Checkpoint ties (:func:`selection_ties`): of equally scoring epochs the later is kept
  (:func:`pipeline.train.select`); from each cell's ``curves.csv`` the report counts the
  cells where that rule decided the checkpoint.

Functions of frames, as the rest of :mod:`pipeline.report.analysis`; no file is read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.layout import SELECTION_SCORE
from pipeline.metrics import summarise
from pipeline.report.collect import ModelRef
from pipeline.report.labels import N_BOOT, PROTOCOL_ORDER, finite
from pipeline.stats import paired_bootstrap_delta_seeds
from pipeline.study_spec import Cell, Configuration

#: A difference from the baseline lies within the baseline's training noise when
#: ``|Δ| <= NOISE_SD_MULTIPLE x`` the baseline's seed SD (:func:`within_training_noise`).
NOISE_SD_MULTIPLE = 2.0
#: The rule in words, as the report states it.
NOISE_RULE = (
    f"a difference Δ from the baseline lies within the baseline's training noise when "
    f"|Δ| ≤ {NOISE_SD_MULTIPLE:g} × the baseline's seed SD (the SD over training seeds of its "
    "fold-mean C-index, same protocol)"
)
#: Two selection scores this close count as equal (C-indices of one split differ by far more
#: when they differ at all; ``curves.csv`` keeps every digit).
TIE_TOL = 1e-12
#: The selection rule in words, as the report states it.
TIE_RULE = (
    "of epochs with equal selection scores the later one is kept (it has trained longer; on the small "
    "validation splits where ties happen, a tie says nothing about which generalises better)"
)


def seed_noise(seed_records: pd.DataFrame, n_folds: int) -> list[dict[str, Any]]:
    """Per configuration trained with several seeds and per protocol: the seeds' fold-mean C-indices.

    A seed counts once all ``n_folds`` folds finished; its value is the mean of its defined
    fold C-indices (Table 1's statistic).

    Args:
        seed_records: :func:`pipeline.report.collect.collect_seed_records` rows (``config,
            group, d, seed, fold, protocol, done, c_index``).
        n_folds: folds of the split (``cv0``).

    Returns:
        ``[{"config", "group", "d", "protocol", "n_seeds", "seeds", "seed_means", "mean",
        "sd"}]``: ``mean`` the mean over the counted seeds, ``sd`` their sample SD (the
        training noise of the fold mean; None with fewer than two seeds).
    """
    if seed_records is None or seed_records.empty:
        return []
    out = []
    for (config, proto), g in seed_records.groupby(["config", "protocol"], sort=False):
        seeds, means = [], []
        for s, gs in g.groupby("seed", sort=True):
            fin = gs[gs["done"].astype(bool)]
            mean = summarise(fin["c_index"].tolist())["mean"] if len(fin) >= n_folds else None
            if mean is not None:
                seeds.append(int(s))
                means.append(float(mean))
        out.append(
            {
                "config": config,
                "group": g["group"].iloc[0],
                "d": g["d"].iloc[0],
                "protocol": proto,
                "n_seeds": len(means),
                "seeds": seeds,
                "seed_means": means,
                "mean": float(np.mean(means)) if means else None,
                "sd": float(np.std(means, ddof=1)) if len(means) >= 2 else None,
            }
        )
    return out


def within_training_noise(delta: Any, noise_sd: Any) -> bool | None:
    """Whether ``delta`` lies within the training noise: ``|Δ| <= NOISE_SD_MULTIPLE x noise_sd``
    (:data:`NOISE_RULE`); None when either is unknown."""
    if not finite(delta) or not finite(noise_sd):
        return None
    return bool(abs(float(delta)) <= NOISE_SD_MULTIPLE * float(noise_sd))


def seed_oofs(frame: pd.DataFrame, model: str, protocol: str, n_folds: int) -> list[pd.DataFrame]:
    """One complete held-out frame per training seed of a model (seed order), ``cv0``.

    Args:
        frame: held-out risks with a ``seed`` column (``model, protocol, seed, fold,
            case_id, risk, time, event``).
        model, protocol: the model and its OOF protocol; n_folds: folds a seed needs.

    Returns:
        ``[oof (case_id, fold, risk, time, event), ...]``; seeds with a fold missing are left out.
    """
    sel = frame[(frame["model"] == model) & (frame["protocol"] == protocol)]
    return [
        g[["case_id", "fold", "risk", "time", "event"]].reset_index(drop=True)
        for _, g in sel.groupby("seed", sort=True)
        if g["fold"].nunique() == n_folds
    ]


def seed_paired_comparisons(
    frame: pd.DataFrame,
    models: Sequence[ModelRef],
    reference: ModelRef,
    protocol: str,
    n_folds: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each CNN model vs ``reference`` on ``cv0`` with a CI holding the patients' and the seeds'
    variance (:func:`pipeline.stats.paired_bootstrap_delta_seeds`), for the pairs where an
    arm has more than one training seed.

    Args:
        frame: :func:`seed_oofs` input: every seed of the models trained with several seeds,
            and seed 0 of the others.
        models: the study's models (peers are deterministic: left out).
        reference: the baseline; protocol: the CNN protocol; n_folds: folds of ``cv0``.

    Returns:
        One record per compared model: ``model, label, reference, protocol, n_seeds,
        n_seeds_reference, status`` and, when done, the :class:`pipeline.stats.PairedComparison`
        fields (``delta, ci_low, ci_high, p_value, seed_means_a`` (reference), ``seed_means_b`` ...).
    """
    ref = seed_oofs(frame, reference.name, protocol, n_folds)
    seeded = {m for m, g in frame.groupby("model") if g["seed"].nunique() > 1}
    out = []
    for m in models:
        if m.kind != "cnn" or m.name == reference.name or not ({m.name, reference.name} & seeded):
            continue
        mine = seed_oofs(frame, m.name, protocol, n_folds)
        rec: dict[str, Any] = {
            "model": m.name,
            "label": m.label,
            "reference": reference.name,
            "protocol": protocol,
            "n_seeds": len(mine),
            "n_seeds_reference": len(ref),
        }
        if not ref or not mine:
            out.append(rec | {"status": "pending"})
            continue
        try:
            res = paired_bootstrap_delta_seeds(ref, mine, n_boot=n_boot, seed=seed)
        except ValueError as exc:
            rec.update(status="undefined", reason=str(exc))
        else:
            rec.update(status="done", **res.to_dict())
        out.append(rec)
    return out


def tie_decided(epochs: Sequence[int], scores: Sequence[float], selected: int, select_from: int = 0) -> bool:
    """Whether an earlier selectable epoch (``select_from <= e < selected``) scored what the
    selected epoch scored, so that the tie rule (later epoch kept) chose the checkpoint.

    Args:
        epochs, scores: one cell's ``curves.csv`` epoch and selection-score columns.
        selected: the selected epoch; select_from: the first selectable epoch.
    """
    ep, sc = np.asarray(epochs, dtype=int), np.asarray(scores, dtype=float)
    at = sc[ep == int(selected)]
    if at.shape[0] != 1 or not np.isfinite(at[0]):
        return False
    earlier = (ep >= select_from) & (ep < int(selected)) & np.isfinite(sc)
    return bool(np.any(np.abs(sc[earlier] - at[0]) <= TIE_TOL))


def selection_ties(curves: pd.DataFrame, cells: pd.DataFrame, select_from_epoch: int = 0) -> dict[str, dict[str, Any]]:
    """Per protocol, how many finished cells a tie on the selection score decided (:func:`tie_decided`).

    Args:
        curves: :func:`pipeline.report.collect.collect_training` curves (``split, seed,
            config, fold, epoch`` + the score columns of :data:`pipeline.layout.SELECTION_SCORE`).
        cells: its cells (``split, seed, config, fold, done, selected_epoch_<protocol>``).
        select_from_epoch: the study's first selectable epoch.

    Returns:
        ``{protocol: {"n_cells", "n_ties", "cells"}}`` in report order; ``n_cells`` counts the
        finished cells with a selected epoch and their curves, ``cells`` names the tied ones.
    """
    key = ["split", "seed", "config", "fold"]
    curves = curves if "seed" in curves.columns else curves.assign(seed=0)
    cells = cells if "seed" in cells.columns else cells.assign(seed=0)
    by_cell = {k: g for k, g in curves.groupby(key, sort=False)} if len(curves) else {}
    out: dict[str, dict[str, Any]] = {}
    for proto in PROTOCOL_ORDER:
        col, sel_col = SELECTION_SCORE[proto], f"selected_epoch_{proto}"
        if col not in curves.columns or sel_col not in cells.columns:
            continue
        n, tied = 0, []
        for row in cells[cells["done"].astype(bool)].to_dict("records"):
            g = by_cell.get(tuple(row[k] for k in key))
            if g is None or not finite(row.get(sel_col)):
                continue
            n += 1
            if tie_decided(g["epoch"], g[col], int(row[sel_col]), select_from_epoch):
                tied.append(_cell_name(row))
        out[proto] = {"n_cells": n, "n_ties": len(tied), "cells": tied}
    return out


def _cell_name(row: dict[str, Any]) -> str:
    """The study's cell key (:attr:`pipeline.study_spec.Cell.key`) of a cells row."""
    return Cell(Configuration.from_name(row["config"]), int(row["fold"]), row["split"], int(row["seed"])).key
