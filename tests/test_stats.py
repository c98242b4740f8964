"""Statistics of pipeline.stats, checked against scikit-survival, lifelines and scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index as lifelines_cindex
from scipy import stats as sps
from sksurv.compare import compare_survival
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import integrated_brier_score as sk_ibs
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from pipeline import stats
from pipeline.metrics import c_index


def _exponential_survival(n: int, seed: int, censor_scale: float = 3.0):
    """Exponential survival with log-hazard z ~ N(0, 1) and independent censoring."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-z))
    t_cens = rng.exponential(censor_scale, size=n)
    time = np.round(np.minimum(t_event, t_cens) * 365, 0) + 1
    event = (t_event <= t_cens).astype(int)
    return z, time, event, rng


def _oof(ids, folds, time, event, risk) -> pd.DataFrame:
    return pd.DataFrame({"case_id": ids, "fold": folds, "protocol": "fit", "risk": risk, "time": time, "event": event})


def _pair(n: int, seed: int, sd_a: float, sd_b: float):
    z, time, event, rng = _exponential_survival(n, seed)
    ids = [f"C{i:05d}" for i in range(n)]
    folds = np.arange(n) % 5
    a = _oof(ids, folds, time, event, z + sd_a * rng.normal(size=n))
    b = _oof(ids, folds, time, event, z + sd_b * rng.normal(size=n))
    return a, b


def _population_c(sd: float, seed: int = 123, n: int = 20000) -> float:
    z, time, event, rng = _exponential_survival(n, seed)
    return float(lifelines_cindex(time, -(z + sd * rng.normal(size=n)), event))


# ----------------------------------------------------------------------------- concordance


def test_weighted_c_index_equals_c_index_on_the_resampled_data():
    rng = np.random.default_rng(0)
    n = 40
    time = rng.integers(1, 15, size=n).astype(float)  # many tied times
    event = rng.integers(0, 2, size=n)
    risk = np.round(rng.normal(size=n), 1)  # tied risks
    w = rng.multinomial(n, np.full(n, 1 / n), size=6)
    got = stats.weighted_c_index(time, event, risk, w)
    for b in range(w.shape[0]):
        idx = np.repeat(np.arange(n), w[b])
        assert got[b] == pytest.approx(c_index(time[idx], event[idx], risk[idx]), abs=1e-12)
    assert stats.weighted_c_index(time, event, risk, np.ones(n)) == pytest.approx(c_index(time, event, risk))


# ----------------------------------------------------------------------------- paired bootstrap


def test_bootstrap_ci_covers_true_delta_and_shrinks_with_n():
    # Population delta from a large sample (its own Monte-Carlo error is ~0.003).
    true_delta = _population_c(0.3, seed=1) - _population_c(2.0, seed=2)
    assert 0.1 < true_delta < 0.15  # the planted difference is real
    widths, covered = {}, 0
    for n in (150, 600):
        res = [stats.paired_bootstrap_delta(*_pair(n, seed, 2.0, 0.3), n_boot=400, seed=seed) for seed in range(5)]
        widths[n] = np.mean([r.ci_high - r.ci_low for r in res])
        covered += sum(r.ci_low <= true_delta <= r.ci_high for r in res)
        for r in res:
            assert r.n_cases == n and r.n_groups == 5 and r.delta == pytest.approx(r.b - r.a)
            assert r.ci_low < r.delta < r.ci_high
    # Of 10 nominal-95 % intervals (60 replications at n = 300 gave 93 % coverage); an
    # interval half as wide as it should be would cover only about 6 in 10.
    assert covered >= 8
    # Width ~ 1/sqrt(n): four times the patients, about half the width.
    assert 0.35 < widths[600] / widths[150] < 0.7


def test_bootstrap_point_estimate_is_mean_of_fold_c_indices():
    a, b = _pair(200, 3, 1.0, 0.5)
    res = stats.paired_bootstrap_delta(a, b, n_boot=50)
    per_fold_a = [c_index(g.time, g.event, g.risk) for _, g in a.groupby("fold")]
    per_fold_b = [c_index(g.time, g.event, g.risk) for _, g in b.groupby("fold")]
    assert res.a == pytest.approx(np.mean(per_fold_a))
    assert res.b == pytest.approx(np.mean(per_fold_b))
    assert [r["delta"] for r in res.per_fold] == pytest.approx(np.subtract(per_fold_b, per_fold_a))
    # Row order must not matter: the frames are joined on case id.
    shuffled = b.sample(frac=1.0, random_state=1)
    assert stats.paired_bootstrap_delta(a, shuffled, n_boot=50).to_dict() == res.to_dict()


def test_bootstrap_p_small_for_real_difference_and_large_for_none():
    a, b = _pair(300, 7, 3.0, 0.3)
    real = stats.paired_bootstrap_delta(a, b, n_boot=500)
    assert real.p_value < 0.01 and real.ci_low > 0
    assert real.fold_test.method == "nadeau_bengio" and real.fold_test.p_value < 0.05
    # A monotone transform of the same score has the same C-index in every draw.
    same = stats.paired_bootstrap_delta(a, a.assign(risk=2 * a.risk + 5), n_boot=200)
    assert same.delta == 0 and same.ci_low == 0 and same.ci_high == 0 and same.p_value == 1.0
    # Two equally good, different models: under the null, p < 0.05 should be rare.
    rejections = 0
    for seed in range(12):
        a0, b0 = _pair(200, 100 + seed, 1.0, 1.0)
        rejections += stats.paired_bootstrap_delta(a0, b0, n_boot=300, seed=seed).p_value < 0.05
    assert rejections <= 3


def test_bootstrap_refuses_mismatched_folds_cases_and_mixed_protocols():
    a, b = _pair(100, 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="folds differ"):
        stats.paired_bootstrap_delta(a, b.assign(fold=(b.fold + 1) % 5))
    with pytest.raises(ValueError, match="different cases"):
        stats.paired_bootstrap_delta(a, b.iloc[1:])
    with pytest.raises(ValueError, match="'time' differs"):
        stats.paired_bootstrap_delta(a, b.assign(time=b.time + 1))
    mixed = pd.concat([b, b.assign(protocol="paper")])
    with pytest.raises(ValueError, match="mixes protocols"):
        stats.paired_bootstrap_delta(a, mixed)
    res = stats.paired_bootstrap_delta(a, mixed, protocol="fit", n_boot=20)
    assert res.n_cases == 100


def test_bootstrap_with_repeats_uses_every_fold_and_repeat():
    a, b = _pair(150, 2, 2.0, 0.5)
    rng = np.random.default_rng(0)
    folds2 = rng.permutation(a.fold.to_numpy())
    a2 = pd.concat([a.assign(repeat=0), a.assign(repeat=1, fold=folds2)])
    b2 = pd.concat([b.assign(repeat=0), b.assign(repeat=1, fold=folds2)])
    res = stats.paired_bootstrap_delta(a2, b2, n_boot=100)
    assert res.n_groups == 10 and res.fold_test.n == 10
    # Nadeau-Bengio ratio: fold size / rest of the same repeat = 30 / 120.
    assert res.fold_test.test_train_ratio == pytest.approx(30 / 120)


def test_seed_bootstrap_ci_widens_with_planted_seed_noise_and_reduces_to_one_seed():
    """Extra training seeds whose risks carry noise of growing size widen the CI of Δ; seeds
    identical to the first give the one-seed CI (same patient draws), and one seed per arm is
    paired_bootstrap_delta itself."""
    a, b = _pair(300, 0, 1.0, 0.8)
    rng = np.random.default_rng(10)
    noise_a = [rng.normal(size=len(a)) for _ in range(3)]
    noise_b = [rng.normal(size=len(b)) for _ in range(3)]
    one = stats.paired_bootstrap_delta(a, b, n_boot=300, seed=1)
    assert stats.paired_bootstrap_delta_seeds([a], [b], n_boot=300, seed=1).to_dict() == one.to_dict()
    assert (one.n_seeds_a, one.n_seeds_b) == (1, 1)
    widths = []
    for scale in (0.0, 0.5, 1.5):
        seeds_a = [a] + [a.assign(risk=a["risk"] + scale * n) for n in noise_a]
        seeds_b = [b] + [b.assign(risk=b["risk"] + scale * n) for n in noise_b]
        res = stats.paired_bootstrap_delta_seeds(seeds_a, seeds_b, n_boot=300, seed=1)
        assert (res.n_seeds_a, res.n_seeds_b) == (4, 4) and len(res.seed_means_b) == 4
        # The point estimate is the difference of the seed means of the fold means.
        assert res.delta == pytest.approx(np.mean(res.seed_means_b) - np.mean(res.seed_means_a))
        widths.append(res.ci_high - res.ci_low)
        if scale == 0.0:
            assert (res.ci_low, res.ci_high, res.p_value, res.n_boot) == (
                one.ci_low,
                one.ci_high,
                one.p_value,
                one.n_boot,
            )
            assert res.delta == pytest.approx(one.delta, abs=1e-12)
    assert widths[0] < widths[1] < widths[2]
    assert widths[2] > 1.5 * widths[0]
    # Seeds of one arm are runs on identical folds: other folds are refused.
    with pytest.raises(ValueError, match="folds differ"):
        stats.paired_bootstrap_delta_seeds([a, a.assign(fold=(a.fold + 1) % 5)], [b], n_boot=10)


# ----------------------------------------------------------------------------- fold tests, mean CI


def test_fold_tests_match_scipy():
    rng = np.random.default_rng(5)
    a = rng.uniform(0.55, 0.7, size=10)
    b = a + rng.normal(0.03, 0.02, size=10)
    t = stats.paired_fold_test(a, b, method="t")
    ref = sps.ttest_rel(b, a)
    assert (t.statistic, t.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    w = stats.paired_fold_test(a, b, method="wilcoxon")
    assert w.p_value == pytest.approx(sps.wilcoxon(b, a).pvalue)
    nb0 = stats.corrected_resampled_ttest(b - a, 0.0)
    ref1 = sps.ttest_1samp(b - a, 0.0)
    assert (nb0.statistic, nb0.p_value) == pytest.approx((ref1.statistic, ref1.pvalue))
    nb = stats.paired_fold_test(a, b, test_train_ratio=0.25)
    # The correction inflates the variance by (1/J + r) / (1/J) = (0.1 + 0.25) / 0.1.
    assert nb.statistic == pytest.approx(ref1.statistic / np.sqrt(3.5))
    assert nb.p_value > nb0.p_value
    with pytest.raises(ValueError, match="test_train_ratio"):
        stats.paired_fold_test(a, b)
    # Undefined folds (NaN) drop out pairwise.
    a_nan = a.copy()
    a_nan[0] = np.nan
    assert stats.paired_fold_test(a_nan, b, method="t").n == 9


def test_mean_ci_matches_scipy_t_interval():
    x = np.array([0.62, 0.71, 0.66, 0.74, 0.58, np.nan])
    res = stats.mean_ci(x, level=0.9)
    v = x[:-1]
    lo, hi = sps.t.interval(0.9, df=4, loc=v.mean(), scale=sps.sem(v))
    assert (res["low"], res["high"], res["n"]) == pytest.approx((lo, hi, 5))
    assert res["sd"] == pytest.approx(v.std(ddof=1))
    assert stats.mean_ci([0.7])["low"] is None
    assert stats.mean_ci([])["mean"] is None


def test_mean_ci_clips_to_the_metric_range_and_says_so():
    x = [0.55, 0.99]  # two folds: t(0.975, 1) = 12.7, the plain interval is about [-2.2, 3.8]
    plain = stats.mean_ci(x)
    assert plain["low"] < 0 and plain["high"] > 1 and plain["clipped"] is False
    clipped = stats.mean_ci(x, bounds=(0.0, 1.0))
    assert (clipped["low"], clipped["high"], clipped["clipped"]) == (0.0, 1.0, True)
    assert clipped["mean"] == plain["mean"] and clipped["sd"] == plain["sd"]
    inside = stats.mean_ci([0.62, 0.71, 0.66, 0.74, 0.58], bounds=(0.0, 1.0))
    assert inside["clipped"] is False and inside["low"] == pytest.approx(
        stats.mean_ci([0.62, 0.71, 0.66, 0.74, 0.58])["low"]
    )
    with pytest.raises(ValueError, match=r"bounds"):
        stats.mean_ci(x, bounds=(1.0, 0.0))


# ----------------------------------------------------------------------------- Breslow, IBS


def _cox_data(seed: int = 0, n: int = 120):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    t_event = rng.exponential(np.exp(-(x @ np.array([0.8, -0.5]))))
    t_cens = rng.exponential(2.0, size=n)
    time = np.round(np.minimum(t_event, t_cens) * 100, 0) + 1  # ties on purpose
    event = (t_event <= t_cens).astype(int)
    return x, time, event


def test_breslow_survival_equals_lifelines_and_sksurv():
    x, time, event = _cox_data()
    tr, te = np.arange(90), np.arange(90, 120)
    df = pd.DataFrame(x, columns=["x0", "x1"]).assign(T=time, E=event)
    cph = CoxPHFitter().fit(df.iloc[tr], "T", "E")
    lp = x @ cph.params_.to_numpy()
    times = np.unique(time[tr])[5:60:5]
    got = stats.breslow_survival(lp[tr], time[tr], event[tr], lp[te], times)
    ref = cph.predict_survival_function(df.iloc[te][["x0", "x1"]], times=times).to_numpy().T
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)

    y = Surv.from_arrays(event[tr].astype(bool), time[tr])
    sk = CoxPHSurvivalAnalysis().fit(x[tr], y)
    got_sk = stats.breslow_survival(x[tr] @ sk.coef_, time[tr], event[tr], x[te] @ sk.coef_, times)
    ref_sk = np.vstack([fn(times) for fn in sk.predict_survival_function(x[te])])
    np.testing.assert_allclose(got_sk, ref_sk, rtol=1e-10)
    # Before the first event S = 1; after the last training time it stays constant.
    edge = stats.breslow_survival(lp[tr], time[tr], event[tr], lp[te], [0.0, 1e6, 2e6])
    assert np.all(edge[:, 0] == 1.0) and np.allclose(edge[:, 1], edge[:, 2])
    assert np.all(edge[:, 1] < 1.0)


def test_integrated_brier_score_equals_sksurv_and_drops_invalid_times():
    x, time, event = _cox_data(1, 200)
    tr, te = np.arange(150), np.arange(150, 200)
    sk = CoxPHSurvivalAnalysis().fit(x[tr], Surv.from_arrays(event[tr].astype(bool), time[tr]))
    lp = x @ sk.coef_
    lo, hi = time[te].min(), min(time[te].max(), time[tr].max())
    inside = np.linspace(lo, hi, 21)[:-1]
    surv = stats.breslow_survival(lp[tr], time[tr], event[tr], lp[te], inside)
    y_tr = Surv.from_arrays(event[tr].astype(bool), time[tr])
    y_te = Surv.from_arrays(event[te].astype(bool), time[te])
    ref = sk_ibs(y_tr, y_te, surv, inside)
    assert stats.integrated_brier_score(time[tr], event[tr], time[te], event[te], surv, inside) == pytest.approx(ref)
    # Times outside the valid range are dropped (here: before follow-up and past its end).
    wide = np.r_[lo * 0.5, inside, hi + 10, hi + 50]
    surv_wide = stats.breslow_survival(lp[tr], time[tr], event[tr], lp[te], wide)
    got = stats.integrated_brier_score(time[tr], event[tr], time[te], event[te], surv_wide, wide)
    assert got == pytest.approx(ref)
    # A useful model beats the uninformative S = 0.5 (IBS 0.25).
    assert ref < 0.25
    with pytest.raises(ValueError, match="fewer than 2"):
        stats.integrated_brier_score(time[tr], event[tr], time[te], event[te], surv_wide[:, -2:], wide[-2:])
    with pytest.raises(ValueError, match=r"\[N_test, T\]"):
        stats.integrated_brier_score(time[tr], event[tr], time[te], event[te], surv[:, :3], inside)


# ----------------------------------------------------------------------------- calibration, KM


def test_calibration_without_censoring_equals_empirical_fractions():
    rng = np.random.default_rng(4)
    n = 250
    p = rng.uniform(0.05, 0.9, size=n)
    time = np.where(rng.uniform(size=n) < p, rng.uniform(10, 364, size=n), rng.uniform(366, 900, size=n))
    event = np.ones(n, dtype=int)
    cal = stats.calibration_at(365, p, time, event, n_groups=5)
    assert len(cal) == 5 and cal["n"].sum() == n
    assert np.all(np.diff(cal["pred_mean"]) > 0)
    groups = pd.qcut(pd.Series(p).rank(method="first"), 5, labels=False).to_numpy()
    for g, row in cal.iterrows():
        sel = groups == g
        assert row["observed"] == pytest.approx(np.mean(time[sel] <= 365))
        assert row["observed_low"] <= row["observed"] <= row["observed_high"]
    # Predictions drawn from the true probabilities are calibrated within the KM CIs.
    assert np.all((cal.observed_low - 0.05 <= cal.pred_mean) & (cal.pred_mean <= cal.observed_high + 0.05))
    short = stats.calibration_at(1000, p, time, event, n_groups=2)
    assert not short["followed_to_horizon"].any() and short["observed"].isna().all()


def test_risk_groups_split_at_training_median():
    train = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats.risk_groups(train, [0.0, 3.0, 3.01, 10.0]).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="test_risk"):
        stats.risk_groups(train, [np.nan])


def test_km_logrank_equals_sksurv():
    z, time, event, _ = _exponential_survival(200, 11)
    group = (z > 0).astype(int)
    res = stats.km_logrank(time, event, group)
    y = Surv.from_arrays(event.astype(bool), time)
    chisq, p = compare_survival(y, group)
    assert res.p_value == pytest.approx(p, rel=1e-8) and res.test_statistic == pytest.approx(chisq)
    assert res.p_value < 1e-3  # the hazard depends on z
    for g in (0, 1):
        sel = group == g
        t_sk, s_sk = kaplan_meier_estimator(event[sel].astype(bool), time[sel])
        curve = res.curves[g]
        np.testing.assert_allclose(curve.loc[t_sk, "survival"].to_numpy(), s_sk)
        assert res.n[g] == sel.sum() and res.events[g] == event[sel].sum()
    three = stats.km_logrank(time, event, np.digitize(z, [-0.5, 0.5]))
    _, p3 = compare_survival(y, np.digitize(z, [-0.5, 0.5]))
    assert three.p_value == pytest.approx(p3, rel=1e-8)
    assert set(res.to_dict()["groups"]) == {"0", "1"}
