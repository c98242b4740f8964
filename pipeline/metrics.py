"""Survival metrics for cross-validation: Harrell's C-index, time-dependent AUROC and the
integrated Brier score (:func:`integrated_brier_score` on the grid of :func:`ibs_time_grid`).

Conventions used throughout:

* ``risk``: higher means earlier relapse (a log-hazard, as the Cox head outputs).
* ``event``: 1 = relapse observed, 0 = censored. ``time``: RFS in days, >= 0.

Both metrics are thin wrappers around scikit-survival so that numbers match the field's
reference implementation; what this module adds is input validation with precise
messages, an explicit "undefined" result for folds where a metric does not exist
(REFERENCE section 7: report such a fold as undefined, never as 0.5), and per-fold /
across-fold helpers shared by training and reporting.

"Metric undefined, and why" has one representation, used from here up to the report:
:class:`MetricValue` (a value, or ``None`` with a reason code and a detail). A metric that
cannot exist for its data raises :class:`MetricUndefined` (a ``ValueError`` carrying the
reason code) or returns an undefined :class:`MetricValue`; :func:`metric_value` turns
either into a :class:`MetricValue`, and :func:`reason_text` gives a reason code in words.
Records on disk keep ``<metric>_undefined_reason`` (training) or ``<metric>_reason``
(per-fold tables) beside a value of ``None``/NaN.

Tie handling (checked in ``tests/test_metrics.py``): :func:`c_index` uses
``sksurv.metrics.concordance_index_censored``; it equals
``lifelines.utils.concordance_index(time, -risk, event)`` including ties. Both count a
pair with tied risk as 0.5, skip pairs of two events at the same time, and treat a
censored case whose time equals an event time as still at risk (comparable). The only
difference: scikit-survival treats risks within ``tied_tol = 1e-8`` as tied whereas
lifelines needs exact equality, so scores differing by less than 1e-8 can give
(slightly) different values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sksurv.metrics import concordance_index_censored, cumulative_dynamic_auc
from sksurv.metrics import integrated_brier_score as sk_ibs
from sksurv.util import Surv

#: The horizon of the 1-year metrics (time-dependent AUROC, calibration, the report's events
#: before it), in days: the one definition of that year.
ONE_YEAR_DAYS = 365.0

# Reasons a metric can be undefined: stable codes, stored in run folders and compared in
# code. An AUROC at a horizon:
HORIZON_BEFORE_FOLLOWUP = "horizon_before_followup"
HORIZON_BEYOND_FOLLOWUP = "horizon_beyond_followup"
NO_EVENT_BEFORE_HORIZON = "no_event_before_horizon"
CENSORING_UNDEFINED = "censoring_distribution_undefined"
# A C-index:
NO_EVENTS = "no_events"
NO_COMPARABLE_PAIR = "no_comparable_pair"
# Either, when the scores are not finite numbers (e.g. a diverged model):
NON_FINITE_RISK = "non_finite_risk"
# An integrated Brier score (pipeline.stats):
NO_TRAINING_EVENT = "no_training_event"
TOO_FEW_VALID_TIMES = "too_few_valid_times"
# A training fold where no epoch had a finite selection score (no model to score); the
# code predates the others' spelling and stays so that existing run folders read.
NO_VALID_EPOCH = "no valid epoch"

#: Each reason code in words, as tables and command lines print it.
REASON_TEXT: dict[str, str] = {
    NO_EVENTS: "no event in the held-out fold",
    NO_COMPARABLE_PAIR: "no comparable pair",
    NO_EVENT_BEFORE_HORIZON: "no event before 365 d",
    HORIZON_BEYOND_FOLLOWUP: "no follow-up beyond 365 d",
    HORIZON_BEFORE_FOLLOWUP: "follow-up starts after 365 d",
    CENSORING_UNDEFINED: "censoring distribution undefined",
    NON_FINITE_RISK: "risk scores not finite",
    NO_TRAINING_EVENT: "no event in the training fold",
    TOO_FEW_VALID_TIMES: "fewer than 2 times inside both follow-ups",
    NO_VALID_EPOCH: "no valid epoch",
}


def reason_text(reason: str | None) -> str:
    """A reason code in words (an unknown code with its underscores as spaces)."""
    if not reason:
        return "reason unknown"
    return REASON_TEXT.get(reason, reason.replace("_", " "))


class MetricUndefined(ValueError):
    """A metric does not exist for these data: not malformed input, a fact to report.

    Attributes:
        reason: one of the module's reason codes (e.g. :data:`NO_COMPARABLE_PAIR`).
        detail: the message, with the numbers involved.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class MetricValue:
    """A metric that may be undefined for a fold.

    Attributes:
        value: the metric, or ``None`` when undefined.
        reason: ``None`` when defined, else one of the module's reason codes
            (e.g. :data:`NO_EVENT_BEFORE_HORIZON`).
        detail: a human-readable explanation with the numbers involved, or ``None``.
    """

    value: float | None
    reason: str | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.reason is None):
            raise ValueError(
                f"MetricValue needs exactly one of value and reason, got value={self.value!r}, reason={self.reason!r}"
            )
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"MetricValue value must be finite, got {self.value!r}")

    @classmethod
    def undefined(cls, reason: str, detail: str | None = None) -> MetricValue:
        return cls(None, reason, detail)

    @property
    def defined(self) -> bool:
        return self.value is not None

    def __float__(self) -> float:
        """The value, or NaN when undefined (convenient for tables)."""
        return float("nan") if self.value is None else float(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "reason": self.reason, "detail": self.detail}


def metric_value(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MetricValue:
    """Call a metric and return a :class:`MetricValue`: its value, or undefined with the
    reason and detail of the :class:`MetricUndefined` it raised.

    Args:
        fn: a metric returning a float or a :class:`MetricValue` (e.g. :func:`c_index`,
            :func:`time_dependent_auc`).
        *args, **kwargs: its arguments.

    Raises:
        ValueError: malformed inputs (anything but :class:`MetricUndefined`) still raise.
    """
    try:
        out = fn(*args, **kwargs)
    except MetricUndefined as exc:
        return MetricValue.undefined(exc.reason, exc.detail)
    return out if isinstance(out, MetricValue) else MetricValue(float(out))


def check_survival(time: Any, event: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate survival inputs the way every function of this package expects them.

    Args:
        time: times in days, shape [N], finite and >= 0.
        event: 0/1 or boolean, shape [N] (1 = relapse).
        what: prefix of error messages, naming the caller and data.

    Returns:
        ``(time float64 [N], event bool [N])``.

    Raises:
        ValueError: naming the bad value and its positions.
    """
    try:
        t = np.asarray(time, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: time must be numeric (days): {exc}") from exc
    e_raw = np.asarray(event)
    if e_raw.ndim != 1 or t.ndim != 1:
        raise ValueError(f"{what}: time and event must be 1-D, got shapes {np.shape(time)} and {e_raw.shape}")
    if t.shape[0] != e_raw.shape[0]:
        raise ValueError(f"{what}: time has {t.shape[0]} entries but event has {e_raw.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    bad = np.flatnonzero(~np.isfinite(t))
    if bad.size:
        raise ValueError(f"{what}: time is NaN or infinite at positions {bad[:10].tolist()}")
    neg = np.flatnonzero(t < 0)
    if neg.size:
        raise ValueError(f"{what}: negative time {t[neg[0]]:g} at positions {neg[:10].tolist()}")
    return t, check_events(e_raw, f"{what}: event")


def check_events(event: Any, what: str) -> np.ndarray:
    """Event indicators (1 = relapse) as booleans, shape [N]; ``what`` names them in errors.

    Raises:
        ValueError: a value other than 0/1 (or boolean), naming the first and its index.
    """
    raw = np.asarray(event)
    try:
        num = raw.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be 0/1 or boolean, got dtype {raw.dtype}") from exc
    bad = np.flatnonzero(~np.isin(num, (0.0, 1.0)))
    if bad.size:
        raise ValueError(
            f"{what} must be 0/1, got {raw[bad[0]].item()!r} at index {int(bad[0])} "
            f"(bad positions {bad[:10].tolist()}; 1 = relapse)"
        )
    return num.astype(bool)


def check_risk(risk: Any, n: int, what: str) -> np.ndarray:
    """Validate a score vector: 1-D float, ``n`` entries, all finite.

    Raises:
        ValueError: wrong shape; :class:`MetricUndefined` (:data:`NON_FINITE_RISK`) for a
            NaN or infinite score (a diverged model has no metric, rather than bad input).
    """
    r = np.asarray(risk, dtype=float)
    if r.ndim != 1:
        raise ValueError(f"{what}: risk must be 1-D, got shape {r.shape}")
    if r.shape[0] != n:
        raise ValueError(f"{what}: risk has {r.shape[0]} entries but time/event have {n}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise MetricUndefined(NON_FINITE_RISK, f"{what}: risk is NaN or infinite at positions {bad[:10].tolist()}")
    return r


def _has_comparable_pair(time: np.ndarray, event: np.ndarray) -> bool:
    # (i, j) is comparable when i has an event and t_j > t_i, or t_j == t_i with j
    # censored (scikit-survival and lifelines agree). Any comparable pair implies one for
    # the earliest event, so checking that event suffices.
    if not event.any():
        return False
    t0 = time[event].min()
    return bool(((time > t0) | ((time == t0) & ~event)).any())


def c_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's concordance index of a risk score.

    Args:
        time: RFS in days, shape [N], finite and >= 0.
        event: 1/True = relapse, 0/False = censored, shape [N].
        risk: risk score, shape [N]; higher means earlier relapse.

    Returns:
        The C-index in [0, 1]; 0.5 = random, 1 = perfectly ordered. Tied risks count 0.5.

    Raises:
        ValueError: on mismatched lengths, NaN times, negative times, events other than 0/1.
        MetricUndefined: when every sample is censored (:data:`NO_EVENTS`), no pair is
            comparable (:data:`NO_COMPARABLE_PAIR`) or a risk is not finite
            (:data:`NON_FINITE_RISK`); :func:`c_index_value` returns these as a
            :class:`MetricValue`.
    """
    t, e = check_survival(time, event, "c_index")
    r = check_risk(risk, t.shape[0], "c_index")
    if not e.any():
        raise MetricUndefined(NO_EVENTS, f"c_index: all {t.shape[0]} samples are censored; the C-index is undefined")
    if not _has_comparable_pair(t, e):
        raise MetricUndefined(
            NO_COMPARABLE_PAIR,
            f"c_index: no comparable pair among {t.shape[0]} samples ({int(e.sum())} events): "
            "no sample outlives an event time",
        )
    return float(concordance_index_censored(e, t, r)[0])


def c_index_value(time: Any, event: Any, risk: Any) -> MetricValue:
    """:func:`c_index` as a :class:`MetricValue` (undefined with its reason, not raised)."""
    return metric_value(c_index, time, event, risk)


def c_index_or_nan(time: Any, event: Any, risk: Any) -> float:
    """:func:`c_index` as a float, NaN where it is undefined.

    For choosing among fits (epochs, penalties), where an undefined C-index just loses:
    no event or no comparable pair in the rows, or non-finite risks of a diverged fit.

    Args:
        time: survival times, shape [N].
        event: event indicators (0/1), shape [N].
        risk: risk scores, shape [N]; higher means earlier relapse.

    Returns:
        The C-index, or NaN.
    """
    return float(c_index_value(time, event, risk))


def time_dependent_auc(
    train_time: Any,
    train_event: Any,
    test_time: Any,
    test_event: Any,
    risk: Any,
    horizon: float = ONE_YEAR_DAYS,
) -> MetricValue:
    """Cumulative/dynamic AUROC at ``horizon`` (Uno's IPCW estimator via scikit-survival).

    Cases are test samples with an event at or before ``horizon``; controls are test
    samples still event-free after it. Case weights are inverse probabilities of
    censoring estimated by Kaplan-Meier on the TRAINING fold.

    Undefined (returned, not raised) when: the horizon lies before the first test time
    (:data:`HORIZON_BEFORE_FOLLOWUP`); no test case is followed beyond the horizon, i.e.
    ``horizon >= max(test_time)`` (:data:`HORIZON_BEYOND_FOLLOWUP`); no test event
    happens at or before the horizon (:data:`NO_EVENT_BEFORE_HORIZON`); or the training
    censoring distribution cannot weight a test case (:data:`CENSORING_UNDEFINED`).

    Test events after the horizon are passed to scikit-survival as censored: they are
    controls either way and their weights are never used, but scikit-survival would
    otherwise evaluate the training censoring curve at their times and fail when a test
    time exceeds the training follow-up. The AUROC at the horizon is unchanged.

    Args:
        train_time, train_event: training-fold survival, shape [N_train].
        test_time, test_event: test-fold survival, shape [N_test].
        risk: test-fold risk scores, shape [N_test]; higher means earlier relapse.
        horizon: time point in days (default 365).

    Returns:
        A :class:`MetricValue` with the AUROC, or undefined with a reason.

    Raises:
        ValueError: on malformed inputs (lengths, NaN times, negative times, non-0/1
            events, non-finite or negative horizon).
        MetricUndefined: a risk that is not finite (:data:`NON_FINITE_RISK`);
            :func:`metric_value` returns it as a :class:`MetricValue`.
    """
    tr_t, tr_e = check_survival(train_time, train_event, "time_dependent_auc (training fold)")
    te_t, te_e = check_survival(test_time, test_event, "time_dependent_auc (test fold)")
    r = check_risk(risk, te_t.shape[0], "time_dependent_auc (test fold)")
    horizon = float(horizon)
    if not math.isfinite(horizon) or horizon < 0:
        raise ValueError(f"time_dependent_auc: horizon must be finite and >= 0, got {horizon!r}")

    t_min, t_max = float(te_t.min()), float(te_t.max())
    if horizon < t_min:
        return MetricValue.undefined(
            HORIZON_BEFORE_FOLLOWUP,
            f"horizon {horizon:g} d is before the first test follow-up time {t_min:g} d",
        )
    if horizon >= t_max:
        return MetricValue.undefined(
            HORIZON_BEYOND_FOLLOWUP,
            f"no test case is followed beyond the horizon {horizon:g} d (longest follow-up "
            f"{t_max:g} d), so there are no controls",
        )
    is_case = te_e & (te_t <= horizon)
    if not is_case.any():
        return MetricValue.undefined(
            NO_EVENT_BEFORE_HORIZON,
            f"no test event at or before the horizon {horizon:g} d ({int(te_e.sum())} events "
            f"in {te_t.shape[0]} test cases, none early enough)",
        )
    try:
        auc, _ = cumulative_dynamic_auc(Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(is_case, te_t), r, [horizon])
    except ValueError as exc:
        # Training censoring curve is zero, or ends before, a case's time.
        return MetricValue.undefined(CENSORING_UNDEFINED, f"scikit-survival: {exc}")
    value = float(auc[0])
    if not math.isfinite(value):
        return MetricValue.undefined(CENSORING_UNDEFINED, f"scikit-survival returned {value!r}")
    return MetricValue(value)


def ibs_time_grid(train_time: Any, test_time: Any, times: Any | None = None, n: int = 100) -> np.ndarray:
    """Time points at which the IPCW Brier score is defined for this train/test pair.

    Keeps ``min(test_time) <= t < min(max(test_time), max(train_time))``: scikit-survival
    requires times inside the test follow-up, and beyond the last training time the
    training censoring survival may be 0 (scikit-survival would then silently give those
    cases zero weight).

    Args:
        train_time, test_time: follow-up times, shapes [N_train], [N_test].
        times: candidate grid; default ``n`` points evenly spread over the valid range.
        n: size of the default grid.

    Returns:
        Sorted unique valid times, shape [T'].
    """
    tr = np.asarray(train_time, dtype=float)
    te = np.asarray(test_time, dtype=float)
    lo, hi = float(te.min()), float(min(te.max(), tr.max()))
    if times is None:
        if not hi > lo:
            return np.empty(0)
        grid = np.linspace(lo, hi, n + 1)[:-1]
    else:
        grid = np.unique(np.asarray(times, dtype=float))
    return grid[(grid >= lo) & (grid < hi)]


def integrated_brier_score(
    train_time: Any, train_event: Any, test_time: Any, test_event: Any, surv_prob_matrix: Any, times: Any
) -> float:
    """Integrated Brier score (``sksurv.metrics.integrated_brier_score``) on a safe time grid.

    Columns of ``surv_prob_matrix`` whose time lies outside the range where the score is
    defined (:func:`ibs_time_grid`) are dropped before calling scikit-survival; the IBS is
    the trapezoidal integral of the Brier score over the remaining times divided by their
    span. Lower is better; 0.25 is what a constant S = 0.5 scores.

    Args:
        train_time, train_event: training fold (censoring distribution), shape [N_train].
        test_time, test_event: test fold, shape [N_test].
        surv_prob_matrix: predicted S(t | x) of the test cases, shape [N_test, T].
        times: time points of the columns, shape [T].

    Returns:
        The IBS over the kept times.

    Raises:
        ValueError: on malformed inputs or when fewer than two valid times remain.
    """
    tr_t, tr_e = check_survival(train_time, train_event, "integrated_brier_score (training fold)")
    te_t, te_e = check_survival(test_time, test_event, "integrated_brier_score (test fold)")
    grid = np.asarray(times, dtype=float)
    est = np.asarray(surv_prob_matrix, dtype=float)
    if grid.ndim != 1 or est.shape != (te_t.shape[0], grid.shape[0]):
        raise ValueError(
            f"integrated_brier_score: surv_prob_matrix must be [N_test, T] = "
            f"[{te_t.shape[0]}, {grid.shape[0]}], got {list(est.shape)}"
        )
    if np.unique(grid).shape[0] != grid.shape[0]:
        raise ValueError("integrated_brier_score: times must be unique")
    valid = ibs_time_grid(tr_t, te_t, grid)
    if valid.shape[0] < 2:
        raise MetricUndefined(
            TOO_FEW_VALID_TIMES,
            f"integrated_brier_score: fewer than 2 of the {grid.shape[0]} times lie in the valid range "
            f"[{te_t.min():g}, {min(te_t.max(), tr_t.max()):g}) d (test follow-up, training follow-up)",
        )
    if not np.all(np.isfinite(est)) or est.min() < 0 or est.max() > 1:
        raise ValueError("integrated_brier_score: survival probabilities must lie in [0, 1]")
    cols = np.searchsorted(np.sort(grid), valid)
    order = np.argsort(grid)
    est = est[:, order][:, cols]
    try:
        return float(sk_ibs(Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(te_e, te_t), est, valid))
    except ValueError as exc:  # inputs are checked above: what is left is scikit-survival's IPCW
        # censoring estimate, undefined e.g. where test times pass the last training time.
        raise MetricUndefined(CENSORING_UNDEFINED, f"integrated_brier_score: {exc}") from exc


def summarise(values: Iterable[MetricValue | float | None]) -> dict[str, Any]:
    """Mean and SD over folds, ignoring undefined folds.

    Args:
        values: per-fold metrics: :class:`MetricValue`, floats (NaN = undefined) or None.

    Returns:
        ``{"mean", "sd", "n_defined", "n_total", "n_undefined"}``. ``sd`` is the SAMPLE
        standard deviation (``ddof=1``), ``None`` with fewer than two defined folds;
        ``mean`` is ``None`` when no fold is defined.
    """
    vals: list[float] = []
    n_total = 0
    for v in values:
        n_total += 1
        x = float(v) if v is not None else float("nan")
        if math.isfinite(x):
            vals.append(x)
    arr = np.asarray(vals, dtype=float)
    return {
        "mean": float(arr.mean()) if arr.size else None,
        "sd": float(arr.std(ddof=1)) if arr.size >= 2 else None,
        "n_defined": int(arr.size),
        "n_total": n_total,
        "n_undefined": n_total - int(arr.size),
    }


OOF_COLUMNS: tuple[str, ...] = ("case_id", "fold", "risk", "time", "event")


def fold_metrics(
    oof: pd.DataFrame,
    *,
    horizon: float = ONE_YEAR_DAYS,
    train_survival: Mapping[Any, tuple[Any, Any]] | None = None,
) -> pd.DataFrame:
    """C-index and AUROC at ``horizon`` for each validation fold of out-of-fold predictions.

    Args:
        oof: one row per (case, fold) prediction with columns ``case_id, fold, risk,
            time, event``; an optional ``repeat`` column (repeated CV) groups by
            ``(repeat, fold)``.
        horizon: AUROC time point in days.
        train_survival: optional ``{fold: (time [N], event [N])}`` of each fold's
            training part (for the AUROC's censoring distribution). By default the
            training part of fold k is every other row of ``oof`` (same repeat), which is
            exact when the OOF frame covers the whole cohort, as in K-fold CV.

    Returns:
        DataFrame with one row per fold (sorted): ``[repeat,] fold, n, n_events,
        c_index, c_index_reason, auroc, auroc_reason`` where an undefined metric is NaN
        with its reason code; ``horizon`` records the time point.

    Raises:
        ValueError: when a column is missing, a case repeats within a fold/repeat, or a
            fold's inputs are malformed (naming the fold).
    """
    missing = [c for c in OOF_COLUMNS if c not in oof.columns]
    if missing:
        raise ValueError(f"fold_metrics: out-of-fold frame is missing columns {missing}")
    group_cols = ["repeat", "fold"] if "repeat" in oof.columns else ["fold"]
    dup = oof.duplicated(subset=group_cols + ["case_id"])
    if dup.any():
        raise ValueError(f"fold_metrics: case ids predicted twice in one fold: {oof.loc[dup, 'case_id'].tolist()[:10]}")
    rows = []
    for key, val in oof.groupby(group_cols, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        fold = key[-1]
        label = ", ".join(f"{c} {k}" for c, k in zip(group_cols, key))
        t, e = check_survival(val["time"].to_numpy(), val["event"].to_numpy(), f"fold_metrics ({label})")
        r = check_risk(val["risk"].to_numpy(), t.shape[0], f"fold_metrics ({label})")
        if train_survival is not None:
            if fold not in train_survival:
                raise ValueError(f"fold_metrics: train_survival has no entry for fold {fold!r}")
            tr_t, tr_e = train_survival[fold]
        else:
            same = np.ones(len(oof), dtype=bool)
            if "repeat" in group_cols:
                same &= (oof["repeat"] == key[0]).to_numpy()
            train = oof[same & (oof["fold"] != fold).to_numpy()]
            if train.empty:
                raise ValueError(f"fold_metrics ({label}): no training rows (only one fold present)")
            tr_t, tr_e = train["time"].to_numpy(), train["event"].to_numpy()
        ci = c_index_value(t, e.astype(int), r)
        auc = time_dependent_auc(tr_t, tr_e, t, e.astype(int), r, horizon=horizon)
        row = dict(zip(group_cols, key))
        row.update(
            n=int(t.shape[0]),
            n_events=int(e.sum()),
            c_index=float(ci),
            c_index_reason=ci.reason,
            auroc=float(auc),
            auroc_reason=auc.reason,
            auroc_detail=auc.detail,
            horizon=float(horizon),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def summarise_folds(per_fold: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """:func:`summarise` of the ``c_index`` and ``auroc`` columns of :func:`fold_metrics`."""
    return {name: summarise(per_fold[name].tolist()) for name in ("c_index", "auroc")}
