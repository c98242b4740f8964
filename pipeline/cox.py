"""Penalised Cox models with the penalty chosen by inner cross-validation.

The solvers of the classical peers' heads (:mod:`pipeline.peers`):

* ridge Cox (Breslow ties): :func:`ridge_cox_path`, the objective of scikit-survival's
  ``CoxPHSurvivalAnalysis(alpha)`` solved by a vectorised Newton method, with a whole
  penalty path warm-started from the strongest penalty; :func:`fit_ridge` fixes the
  penalty or chooses it from :data:`RIDGE_ALPHAS`;
* elastic-net Cox: scikit-survival's ``CoxnetSurvivalAnalysis`` on its own penalty path
  (:func:`fit_coxnet`).

A penalty is chosen by stratified K-fold CV on the rows given (a training part): the
highest mean inner C-index wins, ties go to the strongest penalty (:func:`inner_cv_choice`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.linalg.blas import dsyrk
from sklearn.model_selection import StratifiedKFold
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from pipeline.metrics import c_index_or_nan

#: Ridge penalties tried by inner CV, strongest first (ties go to the strongest).
RIDGE_ALPHAS = (1000.0, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1)


def surv_target(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """scikit-survival's structured target of survival data.

    Args:
        time: survival times, shape [N].
        event: event indicators (0/1 or boolean), shape [N].

    Returns:
        The record array ``Surv.from_arrays(event, time)`` that scikit-survival models fit.
    """
    return Surv.from_arrays(event.astype(bool), time.astype(float))


@dataclass
class RidgeCox:
    """A fitted ridge Cox model.

    Attributes:
        coef_: coefficients, shape [F].
        alpha: the L2 penalty it was fitted with.
        n_iter: Newton iterations of its fit.
        converged: whether the fit met its stopping rule.
    """

    coef_: np.ndarray
    alpha: float
    n_iter: int
    converged: bool

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The linear predictor (log-hazard ratio) of ``x`` ``[N, F]``."""
        return np.asarray(x, dtype=np.float64) @ self.coef_


class _CoxNewton:
    """Newton's method for the ridge-penalised Cox partial likelihood (Breslow ties).

    Minimises ``-log PL(beta) + 0.5 * alpha * ||beta||^2``, the objective of scikit-survival's
    ``CoxPHSurvivalAnalysis(alpha, ties="breslow")`` (which divides both terms by N), with
    its stopping rule (relative change of the objective < ``tol``); the coefficients agree
    to ~1e-8. Gradient and Hessian are closed-form matrix products over cumulative risk-set
    sums, O(N F^2) per step, instead of scikit-survival's per-case Python loop. With more
    features than cases the fit runs in the N-dimensional row space of ``x`` (``x^T = QR``,
    ``beta = Q gamma``, ``||beta|| = ||gamma||``): a ridge solution always lies there, and
    each step costs O(N^3).

    Args:
        x: features, shape [N, F].
        time: survival times, shape [N].
        event: event indicators (0/1), shape [N].
    """

    def __init__(self, x: np.ndarray, time: np.ndarray, event: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        self.basis = None
        if x.shape[1] > x.shape[0]:
            self.basis, r = np.linalg.qr(x.T)
            x = r.T
        order = np.argsort(-np.asarray(time, dtype=np.float64), kind="mergesort")
        neg_t = -np.asarray(time, dtype=np.float64)[order]
        # Sorted by decreasing time, the risk set of row i is rows [0, ends[i]] (ties included);
        # starts[i] is the first row tied with row i.
        self.starts = np.searchsorted(neg_t, neg_t, side="left")
        self.ends = np.searchsorted(neg_t, neg_t, side="right") - 1
        self.z = np.ascontiguousarray(x[order])
        self.event = np.asarray(event, dtype=np.float64)[order]

    def objective(self, eta: np.ndarray, gamma: np.ndarray, alpha: float) -> float:
        """The penalised negative log partial likelihood at ``gamma`` (``eta = z @ gamma``)."""
        log_s0 = np.logaddexp.accumulate(eta)[self.ends]
        return float(-np.sum(self.event * (eta - log_s0)) + 0.5 * alpha * (gamma @ gamma))

    def newton_step(self, eta: np.ndarray, gamma: np.ndarray, alpha: float) -> np.ndarray:
        """Solve ``H step = gradient`` at ``gamma``."""
        z, ev = self.z, self.event
        w = np.exp(eta - eta.max())  # the shift cancels in every ratio below
        s0 = np.cumsum(w)[self.ends]
        zbar = np.cumsum(w[:, None] * z, axis=0)[self.ends] / s0[:, None]
        grad = ev @ zbar - ev @ z + alpha * gamma
        # sum_i ev_i / S0_i * sum_{j in R_i} w_j z_j z_j^T = Z^T diag(w * c) Z with
        # c_j = sum of ev_i / S0_i over the events i whose risk set holds j (t_i <= t_j).
        c = np.cumsum((ev / s0)[::-1])[::-1][self.starts]
        ze = zbar[ev > 0]
        h = dsyrk(1.0, z * np.sqrt(w * c)[:, None], trans=1) - dsyrk(1.0, ze, trans=1)
        h[np.diag_indices_from(h)] += alpha
        try:
            return cho_solve(cho_factor(h, lower=False, check_finite=False), grad, check_finite=False)
        except LinAlgError:  # alpha = 0 on a singular design
            return np.linalg.lstsq(np.triu(h) + np.triu(h, 1).T, grad, rcond=None)[0]

    def fit(self, alpha: float, gamma: np.ndarray, tol: float = 1e-9, max_iter: int = 100):
        """Minimise from ``gamma``; return ``(gamma, iterations, converged)``."""
        eta = self.z @ gamma
        loss = self.objective(eta, gamma, alpha)
        for it in range(1, max_iter + 1):
            step = self.newton_step(eta, gamma, alpha)
            if not np.all(np.isfinite(step)):
                raise ArithmeticError("ridge Cox: the Newton step is not finite")
            t = 1.0
            while True:  # halve the step until the objective does not increase
                new = gamma - t * step
                eta_new = self.z @ new
                loss_new = self.objective(eta_new, new, alpha)
                if loss_new <= loss or t < 1e-8:
                    break
                t *= 0.5
            done = abs(loss - loss_new) <= tol * abs(loss)
            gamma, eta, loss = new, eta_new, loss_new
            if done:
                return gamma, it, True
        return gamma, max_iter, False

    def coef(self, gamma: np.ndarray) -> np.ndarray:
        """The coefficients of ``x``'s columns from a solution ``gamma``."""
        return self.basis @ gamma if self.basis is not None else gamma


def ridge_cox_path(x: np.ndarray, time: np.ndarray, event: np.ndarray, alphas: Sequence[float]) -> list[RidgeCox]:
    """Ridge Cox fits of ``x`` for each penalty in ``alphas``, in that order.

    Each fit starts from the previous solution (give the strongest penalty first), so a
    whole penalty path costs a few Newton steps per penalty. See :class:`_CoxNewton`.

    Args:
        x: features, shape [N, F].
        time: survival times, shape [N].
        event: event indicators (0/1), shape [N].
        alphas: L2 penalties (penalty ``0.5 * alpha * ||beta||^2`` on the summed partial
            log-likelihood).

    Returns:
        One :class:`RidgeCox` per penalty.

    Raises:
        ArithmeticError: a Newton step is not finite.
    """
    solver = _CoxNewton(x, time, event)
    gamma = np.zeros(solver.z.shape[1])
    out = []
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # rejected trial steps
        for a in alphas:
            gamma, n_iter, ok = solver.fit(float(a), gamma)
            out.append(RidgeCox(solver.coef(gamma), float(a), n_iter, ok))
    return out


def inner_cv_choice(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    *,
    inner_folds: int,
    seed: int,
    n_candidates: int,
    fit_scores: Callable[[np.ndarray, np.ndarray], Any],
) -> tuple[int, np.ndarray]:
    """The candidate penalty with the best mean inner-CV C-index.

    Candidates are ordered from the strongest penalty, so ties go to the strongest. With
    fewer events or censored rows than two folds need, no candidate is scored and the middle
    one is chosen.

    Args:
        x: features, shape [N, F].
        time: survival times, shape [N].
        event: event indicators (0/1), shape [N]; the inner folds are stratified on it.
        inner_folds: inner CV folds (fewer when the events or censored rows are fewer).
        seed: seed of the inner folds.
        n_candidates: number of candidate penalties.
        fit_scores: ``fit_scores(train_idx, val_idx)`` fits every candidate on the inner
            training rows and returns their validation C-indices (NaN where undefined).

    Returns:
        ``(best, mean)``: the chosen candidate's index and every candidate's mean inner
        C-index (NaN where no fold defined it).
    """
    scores = np.full((inner_folds, n_candidates), np.nan)
    n_splits = int(min(inner_folds, event.sum(), (~event.astype(bool)).sum()))
    if n_splits >= 2:
        skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for k, (tr, va) in enumerate(skf.split(x, event.astype(int))):
            scores[k] = fit_scores(tr, va)
    defined = np.isfinite(scores).any(axis=0)
    mean = np.full(n_candidates, np.nan)
    mean[defined] = np.nanmean(scores[:, defined], axis=0)
    best = int(np.nanargmax(mean)) if defined.any() else n_candidates // 2
    return best, mean


def fit_ridge(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    *,
    alpha: float | None = None,
    inner_folds: int = 3,
    seed: int = 42,
) -> tuple[RidgeCox, dict[str, Any]]:
    """Ridge Cox on ``x`` with the penalty fixed or chosen by inner stratified K-fold CV.

    Args:
        x: features, shape [N, F].
        time: survival times, shape [N].
        event: event indicators (0/1), shape [N].
        alpha: a fixed L2 penalty, or ``None`` to choose it from :data:`RIDGE_ALPHAS`
            (:func:`inner_cv_choice`); a fold whose path fails scores NaN.
        inner_folds: inner CV folds.
        seed: seed of the inner folds.

    Returns:
        ``(model, info)``: the fit on every row, and its penalty, Newton iterations,
        convergence and (when chosen) mean inner C-index.
    """
    if alpha is not None:
        model = ridge_cox_path(x, time, event, [alpha])[0]
        return model, {"alpha": model.alpha, "newton_iterations": model.n_iter, "converged": model.converged}

    def fit_scores(tr, va):
        try:
            path = ridge_cox_path(x[tr], time[tr], event[tr], RIDGE_ALPHAS)
        except (ArithmeticError, LinAlgError):
            return np.full(len(RIDGE_ALPHAS), np.nan)
        return [c_index_or_nan(time[va], event[va], m.predict(x[va])) for m in path]

    best, mean = inner_cv_choice(
        x, time, event, inner_folds=inner_folds, seed=seed, n_candidates=len(RIDGE_ALPHAS), fit_scores=fit_scores
    )
    model = ridge_cox_path(x, time, event, RIDGE_ALPHAS[: best + 1])[-1]
    return model, {
        "alpha": model.alpha,
        "newton_iterations": model.n_iter,
        "converged": model.converged,
        "inner_c_index": float(mean[best]) if np.isfinite(mean[best]) else None,
    }


def coxnet(
    l1_ratio: float, alpha_min_ratio: float, n_alphas: int, alphas: np.ndarray | None = None
) -> CoxnetSurvivalAnalysis:
    """An unfitted ``CoxnetSurvivalAnalysis``.

    Args:
        l1_ratio: elastic-net mixing (1 = lasso; small = ridge-like).
        alpha_min_ratio: the weakest penalty of its own path, relative to the strongest.
        n_alphas: penalties of its own path.
        alphas: a given penalty path instead of its own.
    """
    kw = dict(l1_ratio=l1_ratio, alpha_min_ratio=alpha_min_ratio, max_iter=100000)
    return (
        CoxnetSurvivalAnalysis(alphas=alphas, **kw)
        if alphas is not None
        else CoxnetSurvivalAnalysis(n_alphas=n_alphas, **kw)
    )


def fit_coxnet(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    *,
    l1_ratio: float = 0.1,
    n_alphas: int = 30,
    alpha_min_ratio: float = 0.01,
    inner_folds: int = 3,
    seed: int = 42,
) -> tuple[CoxnetSurvivalAnalysis, float, dict[str, Any]]:
    """Elastic-net Cox on ``x`` with the penalty chosen by inner stratified K-fold CV.

    The penalty path is Coxnet's own on every row; inner splits only choose a penalty of it
    (:func:`inner_cv_choice`), and no inner validation label is ever fitted. When ``x``
    comes from a label-free feature pipeline, fit it once on the whole training part.

    Args:
        x: features, shape [N, F].
        time: survival times, shape [N].
        event: event indicators (0/1), shape [N].
        l1_ratio, n_alphas, alpha_min_ratio: the elastic net and its penalty path
            (:func:`coxnet`).
        inner_folds: inner CV folds.
        seed: seed of the inner folds.

    Returns:
        ``(model, alpha, info)``: the path fitted on every row, the chosen penalty (predict
        with ``model.predict(x, alpha=alpha)``), and the penalty's index, the path's length,
        the mean inner C-index and the number of non-zero coefficients.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sksurv convergence warnings at the weakest penalties
        path = coxnet(l1_ratio, alpha_min_ratio, n_alphas).fit(x, surv_target(time, event)).alphas_

        def fit_scores(tr, va):
            out = np.full(path.shape[0], np.nan)
            try:
                m = coxnet(l1_ratio, alpha_min_ratio, n_alphas, path).fit(x[tr], surv_target(time[tr], event[tr]))
            except (ValueError, ArithmeticError):
                return out
            for j, a in enumerate(m.alphas_):
                out[j] = c_index_or_nan(time[va], event[va], m.predict(x[va], alpha=a))
            return out

        # The path decreases, so ties go to the strongest penalty.
        best, mean = inner_cv_choice(
            x, time, event, inner_folds=inner_folds, seed=seed, n_candidates=path.shape[0], fit_scores=fit_scores
        )
        alpha = float(path[best])
        model = coxnet(l1_ratio, alpha_min_ratio, n_alphas, path).fit(x, surv_target(time, event))
    info = {
        "alpha": alpha,
        "alpha_index": best,
        "n_alphas": int(path.shape[0]),
        "inner_c_index": float(mean[best]) if np.isfinite(mean[best]) else None,
        "n_nonzero": int(np.sum(np.abs(model.coef_[:, best]) > 0)),
    }
    return model, alpha, info
