"""Statistics for trustworthy model comparisons on cross-validated survival predictions.

The paper's configurations differ by 0.02-0.03 C-index while the fold SDs are 0.06-0.08, so
"does the FM help?" needs a paired comparison, not two means. This module provides:

* :func:`paired_bootstrap_delta`: difference in mean per-fold C-index (b - a) of two models
  evaluated on the SAME folds, with a patient-level paired bootstrap (95 % percentile CI,
  two-sided bootstrap p) and a paired test over the per-fold deltas
  (:func:`paired_fold_test`, Nadeau-Bengio corrected resampled t-test by default).
  :func:`paired_bootstrap_delta_seeds` does the same for arms trained with several seeds,
  drawing a seed per arm in each replicate, so the CI also holds the training noise.
* :func:`mean_ci`: t-interval of a mean over folds / repeats (clipped to a metric's range
  when asked).
* Calibration and overall accuracy: :func:`breslow_survival` (Breslow baseline hazard fitted
  on the training fold turns a risk score into S(t | x)), the integrated Brier score
  (:func:`pipeline.metrics.integrated_brier_score`, kept importable from here),
  :func:`calibration_at` (predicted vs Kaplan-Meier observed event probability per risk
  group at a horizon).
* :func:`risk_groups` and :func:`km_logrank`: median split at the TRAINING fold's median
  risk, Kaplan-Meier curves and log-rank test (lifelines).

Conventions: ``risk`` higher = earlier relapse; ``event`` 1 = relapse, 0 = censored; ``time``
in days. Out-of-fold (OOF) frames have columns ``case_id, fold, risk, time, event`` and
optionally ``repeat`` and ``protocol`` (as written by ``pipeline.train`` and
``pipeline.peers``).

Which paired test to use across folds. Per-fold deltas of K-fold CV are not independent
(training sets overlap by (K-2)/(K-1)), so a plain paired t-test or Wilcoxon test over
folds is anti-conservative. Nadeau & Bengio (Machine Learning 52, 2003) correct the variance
of the mean delta over J = K x R train/test splits to
``(1/J + n_test/n_train) * s^2`` (s^2 = sample variance of the deltas), with a t
distribution on J - 1 degrees of freedom; this "corrected resampled t-test" is the
recommended test for repeated CV (Bouckaert & Frank, PAKDD 2004). With a single 5-fold
run J = 5 and the test has little power: prefer repeated folds
(``pipeline.splits.repeated_folds``) or read the bootstrap CI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from scipy import stats as sps
from sksurv.linear_model.coxph import BreslowEstimator

from pipeline.metrics import (
    NO_TRAINING_EVENT,
    MetricUndefined,
    c_index,
    check_risk,
    check_survival,
    ibs_time_grid,
    integrated_brier_score,
)

#: Two risks closer than this count as tied, as in ``sksurv.metrics.concordance_index_censored``.
TIED_TOL = 1e-8
FOLD_TESTS = ("nadeau_bengio", "t", "wilcoxon")


# ---------------------------------------------------------------------------------------------
# Concordance on resampled data (weights = bootstrap multiplicities)
# ---------------------------------------------------------------------------------------------


def _pair_matrices(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Comparable-pair matrix and concordance scores of Harrell's C-index.

    Returns:
        ``comparable`` [N, N] float (1 where i has an event and j outlives it: ``t_j > t_i``,
        or ``t_j == t_i`` with j censored) and ``score`` [N, N] (1 concordant, 0.5 tied
        risk, 0 discordant), so that C = sum(comparable*score) / sum(comparable). These are
        the rules of ``sksurv.metrics.concordance_index_censored`` (and lifelines).
    """
    ti, tj = time[:, None], time[None, :]
    comparable = event[:, None] & ((tj > ti) | ((tj == ti) & ~event[None, :]))
    diff = risk[:, None] - risk[None, :]
    score = np.where(np.abs(diff) <= TIED_TOL, 0.5, (diff > 0).astype(float))
    return comparable.astype(float), score


def weighted_c_index(time: Any, event: Any, risk: Any, weights: Any) -> np.ndarray:
    """Harrell's C-index of data where sample i appears ``weights[b, i]`` times.

    Equals :func:`pipeline.metrics.c_index` on the dataset with each sample repeated
    ``weights[b, i]`` times (a copy of a sample is never comparable with itself: equal
    times and equal event flags), computed for many weight vectors at once.

    Args:
        time, event, risk: shape [N].
        weights: non-negative multiplicities, shape [N] or [B, N].

    Returns:
        C-index per weight vector, shape [B] (or a 0-d array for 1-D weights); NaN where
        no pair is comparable.
    """
    t, e = check_survival(time, event, "weighted_c_index")
    r = check_risk(risk, t.shape[0], "weighted_c_index")
    w = np.asarray(weights, dtype=float)
    if w.shape[-1] != t.shape[0]:
        raise ValueError(f"weighted_c_index: weights have {w.shape[-1]} columns, data has {t.shape[0]} samples")
    comparable, score = _pair_matrices(t, e, r)
    num = np.einsum("...i,ij,...j->...", w, comparable * score, w)
    den = np.einsum("...i,ij,...j->...", w, comparable, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# Paired comparisons
# ---------------------------------------------------------------------------------------------


@dataclass
class FoldTest:
    """A paired test over per-fold (or per fold-and-repeat) metric deltas (b - a).

    Attributes:
        method: ``nadeau_bengio``, ``t`` or ``wilcoxon``.
        n: number of deltas J.
        mean_delta: mean of the deltas.
        statistic: t statistic (t tests) or Wilcoxon signed-rank W.
        p_value: two-sided p-value.
        df: degrees of freedom of the t tests (J - 1), None for Wilcoxon.
        test_train_ratio: n_test / n_train used by the Nadeau-Bengio correction.
    """

    method: str
    n: int
    mean_delta: float
    statistic: float
    p_value: float
    df: int | None = None
    test_train_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corrected_resampled_ttest(deltas: Any, test_train_ratio: float) -> FoldTest:
    """Nadeau-Bengio corrected resampled t-test of mean(deltas) = 0.

    ``t = mean(d) / sqrt((1/J + n_test/n_train) * var(d, ddof=1))`` on J - 1 degrees of
    freedom. With ``test_train_ratio = 0`` it is the ordinary one-sample t-test.

    Args:
        deltas: per-split metric differences (b - a), shape [J], J >= 2.
        test_train_ratio: n_test / n_train of one split (1/(K-1) for K-fold CV).

    Returns:
        :class:`FoldTest` with method ``nadeau_bengio``.
    """
    d = _finite_deltas(deltas, "corrected_resampled_ttest")
    if not (math.isfinite(test_train_ratio) and test_train_ratio >= 0):
        raise ValueError(f"corrected_resampled_ttest: test_train_ratio must be >= 0, got {test_train_ratio!r}")
    j = d.shape[0]
    mean, var = float(d.mean()), float(d.var(ddof=1))
    se = math.sqrt((1.0 / j + test_train_ratio) * var)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / se
        p = float(2.0 * sps.t.sf(abs(t), df=j - 1))
    return FoldTest("nadeau_bengio", j, mean, float(t), p, j - 1, float(test_train_ratio))


def paired_fold_test(
    metric_a: Any, metric_b: Any, *, method: str = "nadeau_bengio", test_train_ratio: float | None = None
) -> FoldTest:
    """Paired test of per-fold metrics of two models evaluated on identical folds.

    Args:
        metric_a, metric_b: per-fold metric values in the same fold order, shape [J]; pairs
            with a NaN on either side (undefined fold) are dropped.
        method: ``nadeau_bengio`` (recommended for K-fold / repeated CV), ``t`` (plain
            paired t-test, ``scipy.stats.ttest_rel``; ignores the fold overlap, so too
            liberal) or ``wilcoxon`` (``scipy.stats.wilcoxon``; same caveat, and with 5
            folds the smallest attainable two-sided p is 0.0625).
        test_train_ratio: n_test / n_train, required for ``nadeau_bengio``.

    Returns:
        :class:`FoldTest` on the deltas b - a.
    """
    a = np.asarray(metric_a, dtype=float)
    b = np.asarray(metric_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_fold_test: per-fold metrics must be 1-D of equal length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if method == "nadeau_bengio":
        if test_train_ratio is None:
            raise ValueError("paired_fold_test: method 'nadeau_bengio' needs test_train_ratio (n_test / n_train)")
        return corrected_resampled_ttest(b - a, test_train_ratio)
    d = _finite_deltas(b - a, f"paired_fold_test ({method})")
    if method == "t":
        res = sps.ttest_rel(b, a)
        return FoldTest("t", d.shape[0], float(d.mean()), float(res.statistic), float(res.pvalue), d.shape[0] - 1)
    if method == "wilcoxon":
        if np.all(d == 0):
            return FoldTest("wilcoxon", d.shape[0], 0.0, 0.0, 1.0)
        res = sps.wilcoxon(b, a)
        return FoldTest("wilcoxon", d.shape[0], float(d.mean()), float(res.statistic), float(res.pvalue))
    raise ValueError(f"paired_fold_test: unknown method {method!r}; choose one of {FOLD_TESTS}")


def _finite_deltas(deltas: Any, what: str) -> np.ndarray:
    d = np.asarray(deltas, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"{what}: deltas must be 1-D, got shape {d.shape}")
    d = d[np.isfinite(d)]
    if d.shape[0] < 2:
        raise ValueError(f"{what}: need at least 2 defined per-fold deltas, got {d.shape[0]}")
    return d


@dataclass
class PairedComparison:
    """Result of :func:`paired_bootstrap_delta` (all deltas are b - a).

    Attributes:
        metric: ``c_index``.
        a, b: the point estimate of each model: mean over folds of the per-fold metric.
        delta: ``b - a``.
        ci_low, ci_high: percentile bootstrap CI of ``delta`` at ``level``.
        p_value: two-sided bootstrap p of delta = 0: ``min(1, 2 * min(P*(d <= 0),
            P*(d >= 0)))`` with the (count + 1) / (B + 1) correction.
        n_boot: bootstrap draws used (draws where a fold had no comparable pair are
            dropped; ``n_boot_dropped`` counts them).
        n_cases, n_groups: patients and (repeat, fold) groups compared.
        per_fold: ``[{"repeat"?, "fold", "n", "a", "b", "delta"}, ...]`` (with several
            training seeds, ``a`` / ``b`` are the fold's means over the arm's seeds).
        fold_test: paired test over the per-fold deltas (:func:`paired_fold_test`).
        n_seeds_a, n_seeds_b: training seeds of each arm
            (:func:`paired_bootstrap_delta_seeds`; 1 for :func:`paired_bootstrap_delta`).
        seed_means_a, seed_means_b: each seed's mean per-fold C-index, per arm.
    """

    metric: str
    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    n_boot: int
    n_boot_dropped: int
    n_cases: int
    n_groups: int
    seed: int
    per_fold: list[dict[str, Any]] = field(default_factory=list)
    fold_test: FoldTest | None = None
    n_seeds_a: int = 1
    n_seeds_b: int = 1
    seed_means_a: list[float] = field(default_factory=list)
    seed_means_b: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fold_test"] = self.fold_test.to_dict() if self.fold_test is not None else None
        return out


def _align_oof(oof_a: pd.DataFrame, oof_b: pd.DataFrame, protocol: str | None) -> pd.DataFrame:
    """Join two OOF frames on (repeat, fold, case_id), checking they share folds and endpoints."""
    frames = []
    for name, df in (("a", oof_a), ("b", oof_b)):
        missing = [c for c in ("case_id", "fold", "risk", "time", "event") if c not in df.columns]
        if missing:
            raise ValueError(f"paired_bootstrap_delta: OOF frame {name} lacks columns {missing}")
        if "protocol" in df.columns:
            if protocol is not None:
                df = df[df["protocol"] == protocol]
                if df.empty:
                    raise ValueError(f"paired_bootstrap_delta: OOF frame {name} has no rows of protocol {protocol!r}")
            elif df["protocol"].nunique() > 1:
                raise ValueError(
                    f"paired_bootstrap_delta: OOF frame {name} mixes protocols "
                    f"{sorted(df['protocol'].unique())}; pass protocol= to pick one"
                )
        frames.append(df)
    a, b = frames
    if ("repeat" in a.columns) != ("repeat" in b.columns):
        raise ValueError("paired_bootstrap_delta: one OOF frame has a 'repeat' column and the other not")
    key = (["repeat"] if "repeat" in a.columns else []) + ["case_id"]
    for name, df in (("a", a), ("b", b)):
        dup = df[df.duplicated(subset=key)]
        if not dup.empty:
            raise ValueError(
                f"paired_bootstrap_delta: OOF frame {name} predicts cases twice: {dup['case_id'].tolist()[:10]}"
            )
    a = a.assign(case_id=a["case_id"].astype(str))
    b = b.assign(case_id=b["case_id"].astype(str))
    m = a.merge(b, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    only = m[m["_merge"] != "both"]
    if not only.empty:
        raise ValueError(
            "paired_bootstrap_delta: the OOF frames cover different cases: "
            f"{only.loc[only['_merge'] == 'left_only', 'case_id'].tolist()[:10]} only in a, "
            f"{only.loc[only['_merge'] == 'right_only', 'case_id'].tolist()[:10]} only in b"
        )
    for col in ("fold", "time", "event"):
        bad = m[~np.isclose(m[f"{col}_a"].astype(float), m[f"{col}_b"].astype(float))]
        if not bad.empty:
            what = "folds differ" if col == "fold" else f"endpoint column {col!r} differs"
            raise ValueError(
                f"paired_bootstrap_delta: {what} between the OOF frames for cases "
                f"{bad['case_id'].tolist()[:10]}; a paired comparison needs identical folds and data"
            )
    out = m[key + ["fold_a", "time_a", "event_a", "risk_a", "risk_b"]].rename(
        columns={"fold_a": "fold", "time_a": "time", "event_a": "event"}
    )
    return out


def paired_bootstrap_delta(
    oof_a: pd.DataFrame,
    oof_b: pd.DataFrame,
    metric: str = "c_index",
    n_boot: int = 2000,
    seed: int = 0,
    *,
    level: float = 0.95,
    protocol: str | None = None,
    fold_test: str = "nadeau_bengio",
) -> PairedComparison:
    """Paired patient bootstrap of the difference in mean per-fold C-index, b - a.

    The statistic is what the paper reports: the C-index of each validation fold, averaged
    over folds (and repeats). Risks of different fold models are never compared with each
    other. One bootstrap draw resamples patients with replacement within each (repeat,)
    fold, with the same draw for both models (paired), and recomputes both means; with
    repeats the draws of different repeats are independent.

    Args:
        oof_a, oof_b: OOF predictions (``case_id, fold, risk, time, event`` [, ``repeat``,
            ``protocol``]) of the two models on identical folds.
        metric: only ``"c_index"`` (Harrell's, as :func:`pipeline.metrics.c_index`).
        n_boot: bootstrap draws.
        seed: seed of the resampling.
        level: CI level.
        protocol: rows to use when the frames hold several selection protocols.
        fold_test: method of the per-fold paired test (see :func:`paired_fold_test`).

    Returns:
        :class:`PairedComparison`.

    Raises:
        ValueError: when the frames cover other cases or folds, disagree on time/event,
            mix protocols, or a fold has no comparable pair.
    """
    return paired_bootstrap_delta_seeds(
        [oof_a], [oof_b], metric, n_boot, seed, level=level, protocol=protocol, fold_test=fold_test
    )


def _check_paired_args(metric: str, n_boot: int, level: float, n_a: int, n_b: int) -> None:
    """``ValueError`` naming the bad argument of :func:`paired_bootstrap_delta_seeds`."""
    if metric != "c_index":
        raise ValueError(f"paired_bootstrap_delta: metric {metric!r} not supported; use 'c_index'")
    if n_boot < 1:
        raise ValueError(f"paired_bootstrap_delta: n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap_delta: level must lie in (0, 1), got {level}")
    if not n_a or not n_b:
        raise ValueError("paired_bootstrap_delta: each arm needs at least one OOF frame (one per training seed)")


def paired_bootstrap_delta_seeds(
    oofs_a: Sequence[pd.DataFrame],
    oofs_b: Sequence[pd.DataFrame],
    metric: str = "c_index",
    n_boot: int = 2000,
    seed: int = 0,
    *,
    level: float = 0.95,
    protocol: str | None = None,
    fold_test: str = "nadeau_bengio",
) -> PairedComparison:
    """:func:`paired_bootstrap_delta` whose CI also holds each arm's training noise.

    Each arm is given as one OOF frame per training seed (runs that differ only in the
    training seed: same cases, folds and endpoints). The statistic is the difference of
    the seed means of the mean per-fold C-index (per fold: the mean over the arm's seeds).
    One bootstrap replicate resamples patients within each (repeat,) fold, the same draw
    for both arms and every seed (paired), and draws, independently per arm, one of that
    arm's seeds uniformly; the replicate's delta is the resampled fold mean of b's drawn
    seed minus that of a's. The CI so contains the patients' sampling and the seed-to-seed
    spread of each arm that has several seeds; an arm with one seed adds no training noise
    (it is not measured), so against such an arm the CI is still too narrow by that arm's
    noise.

    With one frame per arm this is :func:`paired_bootstrap_delta` exactly: the seed draws
    come from their own generator, so the patient draws are the same; with identical
    frames per seed the deltas, CI and p are those of one seed too.

    Args:
        oofs_a, oofs_b: per arm, one OOF frame per training seed (at least one).
        metric, n_boot, seed, level, protocol, fold_test: as :func:`paired_bootstrap_delta`.

    Returns:
        :class:`PairedComparison` with ``n_seeds_a``, ``n_seeds_b`` and the per-seed fold
        means ``seed_means_a``, ``seed_means_b``.
    """
    _check_paired_args(metric, n_boot, level, len(oofs_a), len(oofs_b))
    df = _align_oof(oofs_a[0], oofs_b[0], protocol).reset_index(drop=True)
    risks_a = [df["risk_a"].to_numpy(float)] + [_seed_risk(df, x, oofs_b[0], protocol, "risk_a") for x in oofs_a[1:]]
    risks_b = [df["risk_b"].to_numpy(float)] + [_seed_risk(df, oofs_a[0], x, protocol, "risk_b") for x in oofs_b[1:]]
    group_cols = (["repeat"] if "repeat" in df.columns else []) + ["fold"]
    rng = np.random.default_rng(seed)
    boot_a, boot_b, per_fold, sizes, seed_c = [], [], [], [], []
    for key, g in df.groupby(group_cols, sort=True):
        row, (ca, cb), (wa, wb) = _seed_fold(g, key, group_cols, risks_a, risks_b, rng, n_boot)
        boot_a.append(wa)
        boot_b.append(wb)
        per_fold.append(row)
        sizes.append(row["n"])
        seed_c.append((ca, cb))
    d_boot = _bootstrap_deltas(boot_a, boot_b, n_boot, seed)
    a_hat = float(np.mean([r["a"] for r in per_fold]))
    b_hat = float(np.mean([r["b"] for r in per_fold]))
    alpha = 1.0 - level
    lo, hi = np.quantile(d_boot, [alpha / 2, 1 - alpha / 2])
    nb = d_boot.shape[0]
    p = min(1.0, 2.0 * min((np.sum(d_boot <= 0) + 1) / (nb + 1), (np.sum(d_boot >= 0) + 1) / (nb + 1)))
    ftest = _per_fold_test(df, per_fold, sizes, fold_test) if len(per_fold) >= 2 else None
    return PairedComparison(
        metric=metric,
        a=a_hat,
        b=b_hat,
        delta=b_hat - a_hat,
        ci_low=float(lo),
        ci_high=float(hi),
        level=level,
        p_value=float(p),
        n_boot=int(nb),
        n_boot_dropped=int(n_boot - nb),
        n_cases=int(df["case_id"].nunique()),
        n_groups=len(per_fold),
        seed=seed,
        per_fold=per_fold,
        fold_test=ftest,
        n_seeds_a=len(risks_a),
        n_seeds_b=len(risks_b),
        seed_means_a=[float(np.mean([c[0][s] for c in seed_c])) for s in range(len(risks_a))],
        seed_means_b=[float(np.mean([c[1][s] for c in seed_c])) for s in range(len(risks_b))],
    )


def _seed_fold(
    g: pd.DataFrame,
    key: Any,
    group_cols: list[str],
    risks_a: list[np.ndarray],
    risks_b: list[np.ndarray],
    rng: np.random.Generator,
    n_boot: int,
) -> tuple[dict[str, Any], tuple[list[float], list[float]], tuple[list[np.ndarray], list[np.ndarray]]]:
    """One (repeat,) fold ``g`` of :func:`paired_bootstrap_delta_seeds`: its per-fold row (the
    group's keys, ``n``, ``a``, ``b``, ``delta``), each seed's C-index per arm, and each seed's
    ``n_boot`` resampled C-indices per arm (one multinomial draw of ``rng``, shared by every seed)."""
    key = key if isinstance(key, tuple) else (key,)
    label = ", ".join(f"{c} {k}" for c, k in zip(group_cols, key))
    pos = g.index.to_numpy()
    t = g["time"].to_numpy(float)
    e = g["event"].to_numpy(float)
    try:
        ca = [c_index(t, e, r[pos]) for r in risks_a]
        cb = [c_index(t, e, r[pos]) for r in risks_b]
    except ValueError as exc:
        raise ValueError(f"paired_bootstrap_delta ({label}): {exc}") from exc
    n = len(g)
    # Multiplicities of a uniform resample of n patients: multinomial counts.
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    boot_a = [weighted_c_index(t, e, r[pos], w) for r in risks_a]
    boot_b = [weighted_c_index(t, e, r[pos], w) for r in risks_b]
    row = dict(zip(group_cols, (k.item() if hasattr(k, "item") else k for k in key)))
    a_k, b_k = (ca[0], cb[0]) if len(ca) == len(cb) == 1 else (float(np.mean(ca)), float(np.mean(cb)))
    row.update(n=n, a=a_k, b=b_k, delta=b_k - a_k)
    return row, (ca, cb), (boot_a, boot_b)


def _seed_risk(
    df: pd.DataFrame, oof_a: pd.DataFrame, oof_b: pd.DataFrame, protocol: str | None, column: str
) -> np.ndarray:
    """``column`` (``risk_a`` / ``risk_b``) of another seed's pair of frames, in the row order of
    ``df`` (:func:`_align_oof` of the first seeds); the alignment checks cases, folds, endpoints."""
    other = _align_oof(oof_a, oof_b, protocol)
    key = (["repeat"] if "repeat" in df.columns else []) + ["case_id"]
    if ("repeat" in other.columns) != ("repeat" in df.columns):
        raise ValueError("paired_bootstrap_delta: the seeds' OOF frames disagree on the 'repeat' column")
    folds = df[key + ["fold"]].merge(other[key + ["fold", column]], on=key, how="left", suffixes=("", "_seed"))
    if folds[column].isna().any() or not np.array_equal(folds["fold"].to_numpy(), folds["fold_seed"].to_numpy()):
        raise ValueError(
            "paired_bootstrap_delta: the seeds of an arm cover other cases or folds; seeds are runs on identical folds"
        )
    return folds[column].to_numpy(float)


def _seed_draws(
    boot_a: list[list[np.ndarray]], boot_b: list[list[np.ndarray]], n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate, one seed per arm drawn uniformly: the resampled C-indices ``[G, B]`` of
    the drawn seeds (``boot_x[g][s]`` = group g, seed s). An arm with one seed draws nothing,
    and the draws use a generator of their own, so the patient draws never change."""
    pick = np.random.default_rng([seed, 1])
    out = []
    for boot in (boot_a, boot_b):
        n_seeds = len(boot[0])
        if n_seeds == 1:
            out.append(np.vstack([g[0] for g in boot]))
            continue
        stacked = np.stack([np.vstack([g[s] for g in boot]) for s in range(n_seeds)])  # [S, G, B]
        drawn = pick.integers(n_seeds, size=n_boot)
        out.append(np.ascontiguousarray(stacked[drawn, :, np.arange(n_boot)].T))
    return out[0], out[1]


def _bootstrap_deltas(
    boot_a: list[list[np.ndarray]], boot_b: list[list[np.ndarray]], n_boot: int, seed: int
) -> np.ndarray:
    """Per replicate that left every fold with a comparable pair, the resampled fold mean of b's
    drawn seed minus that of a's (:func:`_seed_draws`); ``ValueError`` when no replicate did."""
    ba, bb = _seed_draws(boot_a, boot_b, n_boot, seed)  # [G, B] each: the drawn seed's resampled C
    ok = np.all(np.isfinite(ba) & np.isfinite(bb), axis=0)
    if not ok.any():
        raise ValueError("paired_bootstrap_delta: no bootstrap draw left every fold with a comparable pair")
    return bb[:, ok].mean(axis=0) - ba[:, ok].mean(axis=0)


def _per_fold_test(df: pd.DataFrame, per_fold: list[dict[str, Any]], sizes: list[int], fold_test: str) -> FoldTest:
    """:func:`paired_fold_test` of the per-fold C-indices, with the folds' test/train ratio."""
    n_test = float(np.mean(sizes))
    # Within one repeat the training part of a fold is every other case of that repeat.
    n_train = float(len(df) / (df["repeat"].nunique() if "repeat" in df.columns else 1)) - n_test
    return paired_fold_test(
        [r["a"] for r in per_fold],
        [r["b"] for r in per_fold],
        method=fold_test,
        test_train_ratio=n_test / n_train if n_train > 0 else None,
    )


def mean_ci(values: Any, level: float = 0.95, *, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean with a Student-t confidence interval (for repeated-CV summaries).

    With few folds the t-interval of a bounded metric can leave its range (two folds of a
    1-year AUROC: t = 12.7 x the SE); ``bounds`` clips it to the metric's range and says
    so in ``clipped``, so a report can state it.

    Args:
        values: per-fold / per-repeat values, shape [J]; NaN (undefined folds) are dropped.
        level: confidence level.
        bounds: ``(low, high)`` range of the metric, e.g. ``(0, 1)`` for a C-index or AUROC;
            None keeps the plain t-interval.

    Returns:
        ``{"mean", "sd", "n", "low", "high", "level", "clipped"}``; ``sd`` is the sample SD
        (ddof=1). With one value the interval is ``None``; no value gives ``mean`` None.
        ``clipped`` is True when an end of the t-interval lay outside ``bounds``.
    """
    if not 0 < level < 1:
        raise ValueError(f"mean_ci: level must lie in (0, 1), got {level}")
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"mean_ci: bounds must be (low, high) with low < high, got {bounds!r}")
    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    n = int(x.shape[0])
    out: dict[str, Any] = {
        "mean": None,
        "sd": None,
        "n": n,
        "low": None,
        "high": None,
        "level": level,
        "clipped": False,
    }
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n >= 2:
        sd = float(x.std(ddof=1))
        half = float(sps.t.ppf(0.5 + level / 2, df=n - 1) * sd / math.sqrt(n))
        low, high = out["mean"] - half, out["mean"] + half
        if bounds is not None:
            out["clipped"] = bool(low < bounds[0] or high > bounds[1])
            low, high = max(low, float(bounds[0])), min(high, float(bounds[1]))
        out.update(sd=sd, low=low, high=high)
    return out


# ---------------------------------------------------------------------------------------------
# Survival probabilities, Brier score, calibration
# ---------------------------------------------------------------------------------------------


def breslow_survival(train_risk: Any, train_time: Any, train_event: Any, test_risk: Any, times: Any) -> np.ndarray:
    """S(t | x) of a Cox-type risk score via the Breslow baseline hazard of the training fold.

    ``S(t | x) = exp(-H0(t) * exp(risk(x)))`` where ``H0`` is Breslow's estimator fitted
    on the training fold's risks (``sksurv.linear_model.coxph.BreslowEstimator``). The risk
    must be a log-hazard (a Cox linear predictor; the CNN's risk output is one). Before
    the first training event S = 1; after the last training time S stays at its last value.

    Args:
        train_risk, train_time, train_event: training fold, shape [N_train].
        test_risk: risks to predict for, shape [N_test].
        times: time points in days, shape [T].

    Returns:
        float64 [N_test, T] survival probabilities.
    """
    t, e = check_survival(train_time, train_event, "breslow_survival (training fold)")
    r = check_risk(train_risk, t.shape[0], "breslow_survival (training fold)")
    if not e.any():
        raise MetricUndefined(
            NO_TRAINING_EVENT, "breslow_survival: the training fold has no event; the baseline hazard is zero"
        )
    rt = check_risk(test_risk, int(np.size(test_risk)), "breslow_survival (test risk)")
    grid = np.atleast_1d(np.asarray(times, dtype=float))
    if grid.ndim != 1 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
        raise ValueError(f"breslow_survival: times must be finite, >= 0 and 1-D, got {grid!r}")
    est = BreslowEstimator().fit(r, e, t)
    h0 = est.cum_baseline_hazard_
    # StepFunction raises outside its domain: clamp to [0, last training time] (constant beyond).
    x = np.clip(grid, h0.x[0], h0.x[-1])
    cum = np.where(grid < h0.x[0], 0.0, h0(x))
    return np.exp(-np.outer(np.exp(rt), cum))


def _km_at(time: np.ndarray, event: np.ndarray, horizon: float, level: float) -> tuple[float, float, float]:
    """Kaplan-Meier S(horizon) with its CI (lifelines, exponential Greenwood)."""
    kmf = KaplanMeierFitter(alpha=1 - level).fit(time, event)
    sf = kmf.survival_function_.iloc[:, 0]
    ci = kmf.confidence_interval_survival_function_
    idx = int(np.searchsorted(sf.index.to_numpy(), horizon, side="right")) - 1
    return float(sf.iloc[idx]), float(ci.iloc[idx, 0]), float(ci.iloc[idx, 1])


def calibration_at(
    horizon: float, pred_event_prob: Any, time: Any, event: Any, n_groups: int = 5, *, level: float = 0.95
) -> pd.DataFrame:
    """Predicted vs observed event probability at ``horizon`` per predicted-risk group.

    Cases are split into ``n_groups`` quantile groups of the predicted probability
    (``pandas.qcut``; fewer groups when predictions tie). Observed = 1 - Kaplan-Meier
    S(horizon) of the group, with the KM CI (lifelines, exponential Greenwood) mapped to
    the event scale. A group whose last follow-up is before the horizon has no observed
    value (NaN, ``followed_to_horizon`` False).

    Args:
        horizon: time point in days (365 = 1-year recurrence).
        pred_event_prob: predicted P(event by horizon) = 1 - S(horizon | x), shape [N].
        time, event: observed follow-up, shape [N].
        n_groups: number of quantile groups.
        level: CI level.

    Returns:
        One row per group (low to high predicted risk): ``group, n, n_events, pred_mean,
        pred_min, pred_max, observed, observed_low, observed_high, followed_to_horizon,
        horizon``.
    """
    t, e = check_survival(time, event, "calibration_at")
    p = check_risk(pred_event_prob, t.shape[0], "calibration_at (pred_event_prob)")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"calibration_at: predicted probabilities must lie in [0, 1], got range [{p.min():g}, {p.max():g}]"
        )
    if n_groups < 1:
        raise ValueError(f"calibration_at: n_groups must be >= 1, got {n_groups}")
    groups = pd.qcut(pd.Series(p).rank(method="first"), q=min(n_groups, t.shape[0]), labels=False).to_numpy()
    rows = []
    for g in np.unique(groups):
        sel = groups == g
        followed = bool(t[sel].max() >= horizon)
        obs = lo = hi = float("nan")
        if followed:
            s, s_lo, s_hi = _km_at(t[sel], e[sel], float(horizon), level)
            obs, lo, hi = 1 - s, 1 - s_hi, 1 - s_lo
        rows.append(
            {
                "group": int(g),
                "n": int(sel.sum()),
                "n_events": int(e[sel].sum()),
                "pred_mean": float(p[sel].mean()),
                "pred_min": float(p[sel].min()),
                "pred_max": float(p[sel].max()),
                "observed": obs,
                "observed_low": lo,
                "observed_high": hi,
                "followed_to_horizon": followed,
                "horizon": float(horizon),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Risk groups, Kaplan-Meier, log-rank
# ---------------------------------------------------------------------------------------------


def risk_groups(train_risk: Any, test_risk: Any) -> np.ndarray:
    """High (1) / low (0) risk group at the TRAINING fold's median risk.

    Using the training median keeps the cut-off independent of the cases it classifies.
    A test risk equal to the median is low.

    Args:
        train_risk: shape [N_train]. test_risk: shape [N_test].

    Returns:
        int64 [N_test], 1 where ``test_risk > median(train_risk)``.
    """
    tr = np.asarray(train_risk, dtype=float)
    te = np.asarray(test_risk, dtype=float)
    for name, arr in (("train_risk", tr), ("test_risk", te)):
        if arr.ndim != 1 or arr.shape[0] == 0 or not np.all(np.isfinite(arr)):
            raise ValueError(f"risk_groups: {name} must be a non-empty finite 1-D array")
    return (te > np.median(tr)).astype(np.int64)


@dataclass
class KMResult:
    """Kaplan-Meier curves per group and the log-rank test.

    Attributes:
        curves: group label -> DataFrame indexed by ``timeline`` with columns
            ``survival``, ``ci_low``, ``ci_high``, ``at_risk``.
        n: group label -> number of cases. events: group label -> number of events.
        median_survival: group label -> KM median (inf when not reached).
        test_statistic, p_value: log-rank chi-square and p (``lifelines.statistics
            .logrank_test`` for two groups, ``multivariate_logrank_test`` for more).
    """

    curves: dict[Any, pd.DataFrame]
    n: dict[Any, int]
    events: dict[Any, int]
    median_survival: dict[Any, float]
    test_statistic: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (curves as lists)."""
        return {
            "test_statistic": self.test_statistic,
            "p_value": self.p_value,
            "groups": {
                str(k): {
                    "n": self.n[k],
                    "events": self.events[k],
                    "median_survival": self.median_survival[k],
                    "timeline": c.index.tolist(),
                    "survival": c["survival"].tolist(),
                    "ci_low": c["ci_low"].tolist(),
                    "ci_high": c["ci_high"].tolist(),
                }
                for k, c in self.curves.items()
            },
        }


def km_logrank(time: Any, event: Any, group: Any, *, level: float = 0.95) -> KMResult:
    """Kaplan-Meier curves per group (lifelines) and the log-rank p-value.

    Args:
        time, event: shape [N]. group: group label per case, shape [N] (>= 2 groups).
        level: CI level of the curves.

    Returns:
        :class:`KMResult`.
    """
    t, e = check_survival(time, event, "km_logrank")
    g = np.asarray(group)
    if g.shape != t.shape:
        raise ValueError(f"km_logrank: group has shape {g.shape}, time has {t.shape}")
    labels = sorted(np.unique(g).tolist())
    if len(labels) < 2:
        raise ValueError(f"km_logrank: need at least 2 groups, got {labels}")
    curves, n, ev, med = {}, {}, {}, {}
    for lab in labels:
        sel = g == lab
        kmf = KaplanMeierFitter(alpha=1 - level).fit(t[sel], e[sel], label=str(lab))
        ci = kmf.confidence_interval_survival_function_
        curves[lab] = pd.DataFrame(
            {
                "survival": kmf.survival_function_.iloc[:, 0].to_numpy(),
                "ci_low": ci.iloc[:, 0].to_numpy(),
                "ci_high": ci.iloc[:, 1].to_numpy(),
                "at_risk": kmf.event_table["at_risk"].to_numpy(),
            },
            index=pd.Index(kmf.survival_function_.index.to_numpy(), name="timeline"),
        )
        n[lab], ev[lab] = int(sel.sum()), int(e[sel].sum())
        med[lab] = float(kmf.median_survival_time_)
    if len(labels) == 2:
        s0, s1 = g == labels[0], g == labels[1]
        res = logrank_test(t[s0], t[s1], event_observed_A=e[s0], event_observed_B=e[s1])
    else:
        res = multivariate_logrank_test(t, g, e)
    return KMResult(curves, n, ev, med, float(res.test_statistic), float(res.p_value))


def predicted_event_prob(surv: np.ndarray) -> np.ndarray:
    """1 - S: event probabilities from a survival matrix (convenience for calibration)."""
    return 1.0 - np.asarray(surv, dtype=float)


# ibs_time_grid and integrated_brier_score live in pipeline.metrics; re-exported for old imports.
__all__: Sequence[str] = (
    "FoldTest",
    "KMResult",
    "PairedComparison",
    "breslow_survival",
    "calibration_at",
    "corrected_resampled_ttest",
    "ibs_time_grid",
    "integrated_brier_score",
    "km_logrank",
    "mean_ci",
    "paired_bootstrap_delta",
    "paired_bootstrap_delta_seeds",
    "paired_fold_test",
    "predicted_event_prob",
    "risk_groups",
    "weighted_c_index",
)
