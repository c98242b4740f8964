"""Patient-level cross-validation splits, stratified by event indicator x RFS quartile.

Every configuration of a study must see identical folds, so folds are a file
(:func:`save_folds`) with provenance: the case set, the parameters that made it and the
manifest it came from. :func:`load_folds` refuses a file made for another case set and names
the differing ids.

Stratification (REFERENCE section 1, Evaluation): each case gets the label
``event x RFS quartile``; quartiles are taken over the whole cohort by rank (ties broken by
case id, so the result does not depend on input order). When a stratum is too small for
the splitter (fewer than ``n_splits`` members for K-fold), adjacent quartiles of the same
event group are merged, and the merge is logged and recorded in the returned frame's
``attrs["strata_notes"]``. Cases are sorted by id before splitting, so the folds depend only
on the case set, its endpoints and the seed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from pipeline.artefacts import (
    ProvenanceError,
    check_match,
    code_version,
    params_hash,
    read_json,
    utc_now,
    write_json_atomic,
)
from pipeline.metrics import check_survival

log = logging.getLogger(__name__)

FOLDS_KIND = "cv_folds"
FOLDS_SCHEMA_VERSION = 1
STRATIFICATION = "event x RFS quartile"
N_QUANTILES = 4


def _check_ids(case_ids: Sequence[Any], what: str) -> np.ndarray:
    ids = np.asarray([str(c) for c in case_ids], dtype=object)
    if ids.size == 0:
        raise ValueError(f"{what}: no case ids")
    empty = [i for i, c in enumerate(ids) if not c.strip()]
    if empty:
        raise ValueError(f"{what}: empty case id at positions {empty[:10]}")
    s = pd.Series(ids)
    dup = s[s.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{what}: duplicate case ids {dup[:10]}")
    return ids


def _survival_inputs(case_ids, time, event, what):
    ids = _check_ids(case_ids, what)
    t, e = check_survival(np.asarray(time), np.asarray(event), what)
    if t.shape[0] != ids.shape[0]:
        raise ValueError(f"{what}: {ids.shape[0]} case ids but {t.shape[0]} times/events")
    order = np.argsort(ids, kind="stable")
    return ids[order], t[order], e[order]


def stratum_labels(time: Any, event: Any, min_count: int) -> tuple[np.ndarray, list[str]]:
    """Stratum label per case: event group x RFS quartile, merging small quartiles.

    Args:
        time: RFS days, shape [N], in the order that breaks rank ties.
        event: 0/1, shape [N].
        min_count: smallest allowed stratum (``n_splits`` for K-fold).

    Returns:
        ``(labels [N] of str, notes)``: labels like ``"event=1|Q1-Q2"``; notes describe
        each merge (empty when all eight strata were large enough).
    """
    t, e = check_survival(time, event, "stratum_labels")
    n = t.shape[0]
    n_q = min(N_QUANTILES, n)
    quart = pd.qcut(pd.Series(t).rank(method="first"), n_q, labels=False).to_numpy()
    labels = np.empty(n, dtype=object)
    notes: list[str] = []
    for ev in (0, 1):
        in_group = e == bool(ev)
        if not in_group.any():
            continue
        counts = [int(np.sum(in_group & (quart == q))) for q in range(n_q)]
        groups: list[list[int]] = []
        current: list[int] = []
        for q in range(n_q):
            current.append(q)
            if sum(counts[i] for i in current) >= min_count:
                groups.append(current)
                current = []
        if current:  # leftover too small: join the previous group, if any
            if groups:
                groups[-1].extend(current)
            else:
                groups.append(current)
        for g in groups:
            name = f"event={ev}|Q{g[0] + 1}" + (f"-Q{g[-1] + 1}" if len(g) > 1 else "")
            members = in_group & np.isin(quart, g)
            labels[members] = name
            if len(g) > 1:
                notes.append(
                    f"merged RFS quartiles {[f'Q{q + 1}' for q in g]} of event={ev} "
                    f"(counts {[counts[q] for q in g]}; a stratum needs >= {min_count}) into {name}"
                )
                log.info("stratification: %s", notes[-1])
        if int(in_group.sum()) < min_count:
            notes.append(
                f"event={ev} has only {int(in_group.sum())} cases (< {min_count}); some splits "
                "will contain none of them"
            )
            log.warning("stratification: %s", notes[-1])
    return labels.astype(str), notes


def _frame(ids, folds, params, strata, notes) -> pd.DataFrame:
    df = pd.DataFrame({"case_id": ids, "fold": np.asarray(folds, dtype=int)})
    df.attrs.update(params=params, strata=strata, strata_notes=notes)
    return df


def make_folds(case_ids: Sequence[Any], time: Any, event: Any, n_splits: int = 5, seed: int = 42) -> pd.DataFrame:
    """Patient-level stratified K-fold assignment.

    Args:
        case_ids: unique case ids, shape [N].
        time: RFS days, shape [N].
        event: 1 = relapse, 0 = censored, shape [N].
        n_splits: number of folds K (>= 2, <= N).
        seed: shuffling seed; the same case set, endpoints and seed give the same folds.

    Returns:
        DataFrame ``case_id, fold`` (fold in 0..K-1), sorted by case id. ``attrs`` holds
        ``params`` (for :func:`save_folds`), ``strata`` (label -> count) and
        ``strata_notes`` (merges made for small strata).

    Raises:
        ValueError: on duplicate ids, mismatched lengths, malformed endpoints, or
            ``n_splits`` outside 2..N.
    """
    ids, t, e = _survival_inputs(case_ids, time, event, "make_folds")
    if not isinstance(n_splits, (int, np.integer)) or not 2 <= n_splits <= ids.shape[0]:
        raise ValueError(f"make_folds: n_splits must be an integer in 2..{ids.shape[0]}, got {n_splits!r}")
    labels, notes = stratum_labels(t, e, min_count=int(n_splits))
    skf = StratifiedKFold(n_splits=int(n_splits), shuffle=True, random_state=int(seed))
    folds = np.empty(ids.shape[0], dtype=int)
    with warnings.catch_warnings():
        # The small-stratum case is already reported in our own notes.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, val) in enumerate(skf.split(np.zeros(ids.shape[0]), labels)):
            folds[val] = k
    params = {
        "method": "stratified_kfold",
        "stratification": STRATIFICATION,
        "n_splits": int(n_splits),
        "seed": int(seed),
    }
    strata = {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    return _frame(ids, folds, params, strata, notes)


def repeated_folds(
    case_ids: Sequence[Any], time: Any, event: Any, n_splits: int = 5, n_repeats: int = 3, seed: int = 42
) -> pd.DataFrame:
    """Repeated stratified K-fold: repeat ``r`` is :func:`make_folds` with ``seed + r``.

    Returns:
        DataFrame ``repeat, case_id, fold`` sorted by repeat then case id.
    """
    if not isinstance(n_repeats, (int, np.integer)) or n_repeats < 1:
        raise ValueError(f"repeated_folds: n_repeats must be a positive integer, got {n_repeats!r}")
    parts = [make_folds(case_ids, time, event, n_splits, seed + r).assign(repeat=r) for r in range(n_repeats)]
    df = pd.concat(parts, ignore_index=True)[["repeat", "case_id", "fold"]]
    df.attrs.update(
        params={
            "method": "repeated_stratified_kfold",
            "stratification": STRATIFICATION,
            "n_splits": int(n_splits),
            "n_repeats": int(n_repeats),
            "seed": int(seed),
        },
        strata=parts[0].attrs["strata"],
        strata_notes=parts[0].attrs["strata_notes"],
    )
    return df


def inner_split(
    train_ids: Sequence[Any], time: Any, event: Any, val_fraction: float = 0.2, seed: int = 42
) -> tuple[list[str], list[str]]:
    """Split a fold's training part into a fitting set and an inner validation set.

    Used for model selection (early stopping, checkpoint choice) without touching the
    outer validation fold. Stratified like :func:`make_folds`; strata smaller than 2 are
    merged, and if there are still more strata than either side has cases the split
    falls back to the event indicator alone.

    Args:
        train_ids: ids of the outer training part, shape [N].
        time, event: their endpoints, shape [N].
        val_fraction: share of cases in the inner validation set, in (0, 1).
        seed: shuffling seed.

    Returns:
        ``(fit_ids, val_ids)``, each sorted.

    Raises:
        ValueError: on malformed inputs, or when the fraction leaves either side empty.
    """
    ids, t, e = _survival_inputs(train_ids, time, event, "inner_split")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"inner_split: val_fraction must be in (0, 1), got {val_fraction!r}")
    n = ids.shape[0]
    n_val = int(np.ceil(val_fraction * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"inner_split: val_fraction {val_fraction} of {n} cases leaves one side empty")
    labels, _ = stratum_labels(t, e, min_count=2)
    n_classes = np.unique(labels).size
    if n_classes > min(n_val, n - n_val) or np.unique(labels, return_counts=True)[1].min() < 2:
        log.warning(
            "inner_split: %d strata do not fit %d/%d cases; stratifying by event only", n_classes, n - n_val, n_val
        )
        labels = e.astype(int).astype(str)
        if np.unique(labels, return_counts=True)[1].min() < 2 or 2 > min(n_val, n - n_val):
            labels = np.zeros(n, dtype=str)
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=int(seed))
    fit_idx, val_idx = next(sss.split(np.zeros(n), labels))
    return sorted(ids[fit_idx].tolist()), sorted(ids[val_idx].tolist())


def leave_one_centre_out(case_ids: Sequence[Any], centre: Sequence[Any]) -> pd.DataFrame:
    """One fold per centre: fold k holds out the k-th centre in sorted order.

    Returns:
        DataFrame ``case_id, fold, centre`` sorted by case id; ``attrs["centres"]`` maps
        fold -> centre.

    Raises:
        ValueError: on duplicate ids, mismatched lengths, a missing centre, or fewer than
            two centres.
    """
    ids = _check_ids(case_ids, "leave_one_centre_out")
    cen = pd.Series(list(centre), dtype=object)
    if cen.shape[0] != ids.shape[0]:
        raise ValueError(f"leave_one_centre_out: {ids.shape[0]} case ids but {cen.shape[0]} centres")
    if cen.isna().any():
        raise ValueError(f"leave_one_centre_out: missing centre for cases {ids[cen.isna().to_numpy()][:10].tolist()}")
    cen = cen.astype(str).to_numpy()
    centres = sorted(set(cen))
    if len(centres) < 2:
        raise ValueError(f"leave_one_centre_out: needs at least two centres, got {centres}")
    index = {c: k for k, c in enumerate(centres)}
    order = np.argsort(ids, kind="stable")
    df = pd.DataFrame({"case_id": ids[order], "fold": [index[c] for c in cen[order]], "centre": cen[order]})
    df.attrs.update(
        params={"method": "leave_one_centre_out", "centres": centres},
        centres=dict(enumerate(centres)),
        strata={},
        strata_notes=[],
    )
    return df


def case_set_sha256(case_ids: Sequence[Any]) -> str:
    """SHA-256 of the sorted, newline-joined case ids (order-independent)."""
    return hashlib.sha256("\n".join(sorted(str(c) for c in case_ids)).encode()).hexdigest()


def _check_folds_frame(df: pd.DataFrame) -> None:
    missing = [c for c in ("case_id", "fold") if c not in df.columns]
    if missing:
        raise ValueError(f"save_folds: folds frame is missing columns {missing}")
    key = ["repeat", "case_id"] if "repeat" in df.columns else ["case_id"]
    dup = df[df.duplicated(subset=key)]
    if not dup.empty:
        raise ValueError(f"save_folds: case ids assigned twice: {dup['case_id'].tolist()[:10]}")


def save_folds(
    df: pd.DataFrame,
    path: str | os.PathLike,
    *,
    manifest_sha256: str = "",
    params: dict[str, Any] | None = None,
) -> None:
    """Write folds as JSON with provenance, atomically.

    Args:
        df: output of :func:`make_folds`, :func:`repeated_folds` or
            :func:`leave_one_centre_out`.
        path: destination ``.json``.
        manifest_sha256: SHA-256 of the manifest the endpoints came from.
        params: parameters that made the folds; default ``df.attrs["params"]``.
    """
    _check_folds_frame(df)
    params = dict(params if params is not None else df.attrs.get("params", {}))
    columns = [c for c in ("repeat", "case_id", "fold", "centre") if c in df.columns]
    record = {
        "kind": FOLDS_KIND,
        "schema_version": FOLDS_SCHEMA_VERSION,
        "created": utc_now(),
        "code_version": code_version(),
        "manifest_sha256": manifest_sha256,
        "params": params,
        "params_hash": params_hash(params),
        "n_cases": int(df["case_id"].nunique()),
        "case_set_sha256": case_set_sha256(df["case_id"].unique()),
        "strata": df.attrs.get("strata", {}),
        "strata_notes": df.attrs.get("strata_notes", []),
        "column_order": columns,  # the JSON writer sorts keys
        "columns": {c: df[c].tolist() for c in columns},
    }
    write_json_atomic(path, record)


def _name_ids(ids: list[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return f"{shown} (+{len(ids) - limit} more)" if len(ids) > limit else shown


def load_folds(
    path: str | os.PathLike,
    expected_case_ids: Sequence[Any] | None = None,
    *,
    expected_params: dict[str, Any] | None = None,
    expected_manifest_sha256: str | None = None,
) -> pd.DataFrame:
    """Read folds written by :func:`save_folds`, checking they fit the current study.

    Args:
        path: the folds JSON.
        expected_case_ids: the cases the caller will evaluate; must equal the file's.
        expected_params: if given, must hash to the file's ``params_hash``.
        expected_manifest_sha256: if given, must equal the file's manifest hash.

    Returns:
        The folds frame (same columns as saved); ``attrs`` holds ``params``, ``strata``,
        ``strata_notes`` and the file's ``provenance`` record (without the columns).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ProvenanceError: when the file is not a folds file, or the case set, params or
            manifest differ (the message names the missing and extra ids).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file not found: {path}")
    rec = read_json(path)
    if not isinstance(rec, dict) or rec.get("kind") != FOLDS_KIND:
        raise ProvenanceError(f"{path}: not a folds file (kind {rec.get('kind') if isinstance(rec, dict) else None!r})")
    check_match("folds schema_version", FOLDS_SCHEMA_VERSION, rec.get("schema_version"), artefact=path)
    df = pd.DataFrame(rec["columns"])[rec["column_order"]]
    df["case_id"] = df["case_id"].astype(str)
    df["fold"] = df["fold"].astype(int)
    if "repeat" in df.columns:
        df["repeat"] = df["repeat"].astype(int)
    found = set(df["case_id"])
    if case_set_sha256(sorted(found)) != rec["case_set_sha256"]:
        raise ProvenanceError(f"{path}: case list does not match its recorded case_set_sha256 (file edited?)")
    if expected_case_ids is not None:
        expected = {str(c) for c in expected_case_ids}
        if expected != found:
            missing = sorted(expected - found)
            extra = sorted(found - expected)
            raise ProvenanceError(
                f"{path}: folds were made for another case set ({len(found)} cases in the file, "
                f"{len(expected)} expected). Missing from the folds: [{_name_ids(missing)}]; "
                f"in the folds but not expected: [{_name_ids(extra)}]. Regenerate the folds for "
                "this case set, or evaluate the cases they were made for."
            )
    if expected_params is not None:
        check_match("folds params_hash", params_hash(expected_params), rec["params_hash"], artefact=path)
    if expected_manifest_sha256 is not None:
        check_match("folds manifest_sha256", expected_manifest_sha256, rec["manifest_sha256"], artefact=path)
    df.attrs.update(
        params=rec["params"],
        strata=rec.get("strata", {}),
        strata_notes=rec.get("strata_notes", []),
        provenance={k: v for k, v in rec.items() if k not in ("columns", "column_order")},
    )
    return df


def get_folds(path: str | os.PathLike, cohort: Any, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Load the shared folds file, or create it once; every configuration reuses it.

    Args:
        path: the folds JSON; written by :func:`save_folds` when it does not exist.
        cohort: the cases to split, with ``case_ids``, ``time`` and ``event`` (e.g. a
            :class:`pipeline.dataset.SurvivalCohort`); an existing file must hold exactly them.
        n_folds: outer folds (:func:`make_folds`).
        seed: seed of new folds.

    Returns:
        The folds frame (:func:`load_folds`).

    Raises:
        ValueError: the file holds another number of folds.
        ProvenanceError: the file was made for another case set.
    """
    path = Path(path)
    if path.is_file():
        folds = load_folds(path, expected_case_ids=cohort.case_ids)
        if folds["fold"].nunique() != n_folds:
            raise ValueError(
                f"{path}: holds {folds['fold'].nunique()} folds, {n_folds} requested; point --folds to another file"
            )
        return folds
    folds = make_folds(cohort.case_ids, cohort.time, cohort.event, n_splits=n_folds, seed=seed)
    save_folds(folds, path)
    return folds
