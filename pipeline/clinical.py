"""Clinical covariates -> model input vector, fitted on the training part of a fold only.

REFERENCE section 1: continuous covariates z-scored within each training fold,
categoricals one-hot, missing entries = fold medians. Encoding per manifest column
(:data:`pipeline.manifest.CLINICAL_COLUMNS`):

=====================  ==========  ===============================================
column                 kind        features
=====================  ==========  ===============================================
age, weight            continuous  ``age``, ``weight``: (x - mean) / sd
gender                 binary      ``gender_male``: M -> 1, F -> 0
tobacco, alcohol,      binary      one 0/1 column each (a second, complementary
hpv_status,                        one-hot column would be redundant)
chemotherapy, surgery
performance_status     one-hot     ``performance_status_0`` .. ``_4``, always five
                                   columns whatever the training fold contains
=====================  ==========  ===============================================

Fitted parameters (all from training rows only):

* continuous: ``mean`` and ``sd`` of the OBSERVED training values (population SD,
  ``ddof=0`` as scikit-learn's ``StandardScaler``; an SD of 0 becomes 1), and the fill
  value = training median. A missing entry is filled first, then z-scored.
* categorical: fill value = the training LOWER median of the observed codes (gender coded
  M = 1, F = 0), which is always an observed category; for a binary column it is the mode
  (an exact 50/50 tie gives 0). For performance status (ordinal) it is the median status.

Values outside a column's categories (e.g. performance status 5, gender ``X``) raise a
``ValueError`` in :meth:`ClinicalTransform.fit`, whose input is the training data; in
:meth:`ClinicalTransform.transform` they are treated as missing (filled with the training
fill value) and reported with a ``UserWarning`` naming the cases, so applying a trained
model to new patients never fails on an unexpected category.

Hand-written rather than a scikit-learn ``ColumnTransformer`` so that the fitted
parameters are a small JSON-able record (:meth:`to_dict`) stored with a trained model,
and so the categorical fill is an observed category rather than ``0.5``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.manifest import CLINICAL_COLUMNS

TRANSFORM_KIND = "clinical_transform"
SCHEMA_VERSION = 1

CONTINUOUS: tuple[str, ...] = ("age", "weight")
BINARY: tuple[str, ...] = ("gender", "tobacco", "alcohol", "hpv_status", "chemotherapy", "surgery")
ONE_HOT: dict[str, tuple[int, ...]] = {"performance_status": (0, 1, 2, 3, 4)}
GENDER_CODES: dict[str, int] = {"M": 1, "F": 0}
_MISSING_TEXT = {"", "nan", "na", "none", "null"}


def _case_ids(df: pd.DataFrame) -> np.ndarray:
    return (df["case_id"] if "case_id" in df.columns else pd.Series(df.index, index=df.index)).astype(str).to_numpy()


def _feature_names(columns: Sequence[str]) -> list[str]:
    names: list[str] = []
    for col in columns:
        if col in ONE_HOT:
            names += [f"{col}_{v}" for v in ONE_HOT[col]]
        elif col == "gender":
            names.append("gender_male")
        else:
            names.append(col)
    return names


def _codes(df: pd.DataFrame, col: str, *, strict: bool, what: str) -> np.ndarray:
    """Column as float codes [N]; NaN = missing. Out-of-domain -> error or NaN + warning.

    Args:
        strict: raise on an out-of-domain value (fit) instead of treating it as missing.
    """
    if col not in df.columns:
        raise ValueError(f"{what}: missing clinical column {col!r} (have {list(df.columns)})")
    raw = df[col]
    ids = _case_ids(df)
    is_missing = (
        raw.isna().to_numpy() | raw.map(lambda v: isinstance(v, str) and v.strip().lower() in _MISSING_TEXT).to_numpy()
    )
    out = np.full(len(raw), np.nan)
    if col == "gender":
        text = raw.map(lambda v: v.strip().upper() if isinstance(v, str) else v)
        mapped = text.map(GENDER_CODES).to_numpy(dtype=float)
        invalid = ~is_missing & np.isnan(mapped)
        out = np.where(invalid | is_missing, np.nan, mapped)
        allowed = "M/F"
    else:
        num = pd.to_numeric(raw.where(~is_missing), errors="coerce").to_numpy(dtype=float)
        non_numeric = ~is_missing & np.isnan(num)
        if non_numeric.any():
            i = int(np.flatnonzero(non_numeric)[0])
            raise ValueError(f"{what}: {col} of case {ids[i]} is not a number: {raw.iloc[i]!r}")
        if col in CONTINUOUS:
            bad = ~is_missing & ~np.isfinite(num)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{what}: {col} of case {ids[i]} is not finite: {raw.iloc[i]!r}")
            return num
        domain = ONE_HOT.get(col, (0, 1))
        invalid = ~is_missing & ~np.isin(num, domain)
        out = np.where(invalid, np.nan, num)
        allowed = "/".join(str(v) for v in domain)
    if invalid.any():
        bad_ids = ids[invalid].tolist()
        values = raw[invalid].tolist()
        msg = f"{what}: {col} has values outside {allowed}: " + ", ".join(
            f"{c}={v!r}" for c, v in list(zip(bad_ids, values))[:10]
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; treated as missing (filled with the training value)", UserWarning, stacklevel=3)
    return out


class ClinicalTransform:
    """Fold-fitted encoder of the nine clinical covariates.

    Usage::

        ct = ClinicalTransform().fit(manifest.loc[train_ids])
        x_train = ct.transform(manifest.loc[train_ids])   # float32 [N_train, 13]
        x_val = ct.transform(manifest.loc[val_ids])

    Args:
        columns: the manifest columns to encode, in output order; default all nine
            (:data:`pipeline.manifest.CLINICAL_COLUMNS`).
    """

    def __init__(self, columns: Sequence[str] = CLINICAL_COLUMNS) -> None:
        columns = tuple(columns)
        known = set(CONTINUOUS) | set(BINARY) | set(ONE_HOT)
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ValueError(f"ClinicalTransform: unknown clinical columns {unknown}; known: {sorted(known)}")
        if len(set(columns)) != len(columns) or not columns:
            raise ValueError(f"ClinicalTransform: columns must be non-empty and unique, got {list(columns)}")
        self.columns = columns
        self.params_: dict[str, dict[str, float]] | None = None
        self.n_fit_: int | None = None

    @property
    def feature_names(self) -> list[str]:
        """Names of the output columns, in order."""
        return _feature_names(self.columns)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def fitted(self) -> bool:
        return self.params_ is not None

    def fit(self, df: pd.DataFrame) -> ClinicalTransform:
        """Learn means, SDs and fill values from TRAINING rows only.

        Args:
            df: training rows (manifest frame; ``case_id`` column or index names cases).

        Returns:
            self.

        Raises:
            ValueError: on an empty frame, a missing column, a non-numeric or
                out-of-domain value (naming the case), or a column with no observed value.
        """
        if len(df) == 0:
            raise ValueError("ClinicalTransform.fit: no training rows")
        params: dict[str, dict[str, float]] = {}
        for col in self.columns:
            x = _codes(df, col, strict=True, what="ClinicalTransform.fit")
            obs = x[~np.isnan(x)]
            if obs.size == 0:
                raise ValueError(
                    f"ClinicalTransform.fit: {col} is missing for all {len(df)} training cases; "
                    "no fold median to fill with"
                )
            if col in CONTINUOUS:
                sd = float(obs.std(ddof=0))
                params[col] = {"mean": float(obs.mean()), "sd": sd if sd > 0 else 1.0, "fill": float(np.median(obs))}
            else:
                params[col] = {"fill": float(np.quantile(obs, 0.5, method="lower"))}
        self.params_ = params
        self.n_fit_ = int(len(df))
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode rows with the fitted parameters.

        Args:
            df: rows to encode (training, validation or new patients).

        Returns:
            float32 array [N, n_features], rows in ``df`` order, columns
            :attr:`feature_names`.

        Raises:
            ValueError: when not fitted, a column is missing, or a value is not numeric.
        """
        if self.params_ is None:
            raise ValueError("ClinicalTransform.transform: call fit() (or from_dict) first")
        blocks: list[np.ndarray] = []
        for col in self.columns:
            p = self.params_[col]
            x = _codes(df, col, strict=False, what="ClinicalTransform.transform")
            x = np.where(np.isnan(x), p["fill"], x)
            if col in CONTINUOUS:
                blocks.append(((x - p["mean"]) / p["sd"])[:, None])
            elif col in ONE_HOT:
                blocks.append((x[:, None] == np.asarray(ONE_HOT[col], dtype=float)[None, :]).astype(float))
            else:
                blocks.append(x[:, None])
        if not blocks or len(df) == 0:
            return np.zeros((len(df), self.n_features), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
        return self.fit(df).transform(df)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the fitted transform (store it with a trained model)."""
        if self.params_ is None:
            raise ValueError("ClinicalTransform.to_dict: not fitted")
        return {
            "kind": TRANSFORM_KIND,
            "schema_version": SCHEMA_VERSION,
            "columns": list(self.columns),
            "feature_names": self.feature_names,
            "n_fit": self.n_fit_,
            "params": {c: dict(v) for c, v in self.params_.items()},
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ClinicalTransform:
        """Rebuild a fitted transform from :meth:`to_dict` output.

        Raises:
            ValueError: when the record is of another kind or version, or its
                parameters or feature names do not match the columns.
        """
        if record.get("kind") != TRANSFORM_KIND or record.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"ClinicalTransform.from_dict: expected kind {TRANSFORM_KIND!r} version {SCHEMA_VERSION}, "
                f"got {record.get('kind')!r} version {record.get('schema_version')!r}"
            )
        ct = cls(record["columns"])
        params = {c: {k: float(v) for k, v in record["params"][c].items()} for c in ct.columns if c in record["params"]}
        for col in ct.columns:
            need = {"mean", "sd", "fill"} if col in CONTINUOUS else {"fill"}
            have = set(params.get(col, {}))
            if have != need or not all(math.isfinite(v) for v in params[col].values()):
                raise ValueError(
                    f"ClinicalTransform.from_dict: parameters of {col} must be finite {sorted(need)}, "
                    f"got {params.get(col)}"
                )
        if list(record.get("feature_names", [])) != ct.feature_names:
            raise ValueError(
                f"ClinicalTransform.from_dict: feature_names {record.get('feature_names')} do not match "
                f"the layout {ct.feature_names} of this version"
            )
        ct.params_ = params
        ct.n_fit_ = record.get("n_fit")
        return ct


def fit_fold_transform(
    df: pd.DataFrame, train_ids: Iterable[Any], columns: Sequence[str] = CLINICAL_COLUMNS
) -> ClinicalTransform:
    """Fit a :class:`ClinicalTransform` on the rows of ``df`` whose case id is in ``train_ids``.

    The one entry point a trainer needs: it takes the whole cohort but can only see the
    fold's training rows, so validation cases cannot leak into the parameters.

    Args:
        df: cohort frame with a ``case_id`` column (or case ids as index).
        train_ids: the fold's training case ids.
        columns: clinical columns to encode.

    Raises:
        ValueError: when a training id is not in ``df`` (naming it).
    """
    train = [str(c) for c in train_ids]
    ids = pd.Index(_case_ids(df))
    missing = sorted(set(train) - set(ids))
    if missing:
        raise ValueError(f"fit_fold_transform: training case ids not in the frame: {missing[:10]}")
    mask = ids.isin(train)
    return ClinicalTransform(columns).fit(df[np.asarray(mask)])
