from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index as lifelines_cindex
from sksurv.metrics import concordance_index_censored, cumulative_dynamic_auc
from sksurv.util import Surv

from pipeline import metrics as M
from pipeline.metrics import MetricValue, c_index, fold_metrics, summarise, time_dependent_auc

# Hand-worked example. Training censoring KM: censorings at 200 (5 at risk) and 400
# (3 at risk) -> G(150) = 1, G(250) = 0.8. Test cases by 365 d: t=150 (weight 1, risk 0.9)
# and t=250 (weight 1/0.8 = 1.25, risk 0.2); controls (t > 365): risks 0.4 and 0.1;
# t=350 is censored before the horizon, so neither.
TR_T = [100, 200, 300, 400, 500, 600]
TR_E = [1, 0, 1, 0, 1, 0]
TE_T = [150, 250, 350, 500, 700]
TE_E = [1, 1, 0, 1, 0]
RISK = [0.9, 0.2, 0.5, 0.4, 0.1]


def test_hand_computed_c_index():
    # Comparable pairs: event@150 vs 4 later (all concordant); event@250 vs 350, 500, 700
    # (0.2 < 0.5 and 0.2 < 0.4 discordant, 0.2 > 0.1 concordant); event@500 vs 700
    # (concordant). 6 / 8.
    assert c_index(TE_T, TE_E, RISK) == pytest.approx(6 / 8)
    # A tied risk counts one half: event@500 now ties control@700 (0.5), and event@250
    # now outranks it (concordant): 4 + 2 + 0.5.
    tied = [0.9, 0.2, 0.5, 0.1, 0.1]
    assert c_index(TE_T, TE_E, tied) == pytest.approx(6.5 / 8)


def test_hand_computed_auc():
    # (1 * 2/2 * 2 + 1.25 * 1/2 * 2) / (2 * (1 + 1.25)) = 3.25 / 4.5
    res = time_dependent_auc(TR_T, TR_E, TE_T, TE_E, RISK, horizon=365)
    assert res.defined and res.reason is None
    assert res.value == pytest.approx(3.25 / 4.5)
    # Higher risk must mean earlier relapse: flipping the sign mirrors the AUROC.
    flipped = time_dependent_auc(TR_T, TR_E, TE_T, TE_E, [-r for r in RISK], horizon=365)
    assert flipped.value == pytest.approx(1 - 3.25 / 4.5)


def _random_survival(rng, n, tie_times=False, tie_risk=False):
    time = rng.integers(30, 40 if tie_times else 3000, n).astype(float) * (40 if tie_times else 1)
    event = (rng.random(n) < 0.35).astype(int)
    event[0] = 1
    risk = rng.integers(0, 4, n).astype(float) if tie_risk else rng.normal(size=n)
    return time, event, risk


@pytest.mark.parametrize("tie_times,tie_risk", [(False, False), (True, False), (False, True), (True, True)])
def test_c_index_matches_sksurv_and_lifelines(tie_times, tie_risk):
    rng = np.random.default_rng(7 + 2 * tie_times + tie_risk)
    for _ in range(5):
        t, e, r = _random_survival(rng, 80, tie_times, tie_risk)
        ours = c_index(t, e, r)
        assert ours == pytest.approx(concordance_index_censored(e.astype(bool), t, r)[0], abs=1e-12)
        # lifelines wants a survival-like score (higher = longer): pass -risk.
        assert ours == pytest.approx(lifelines_cindex(t, -r, e), abs=1e-12)


def test_auc_matches_sksurv_directly():
    rng = np.random.default_rng(3)
    tr_t, tr_e, _ = _random_survival(rng, 150)
    te_t, te_e, r = _random_survival(rng, 60)
    te_t[:3] = [100.0, 200.0, 5000.0]  # events before 365 d and a long follow-up
    te_e[:2] = 1
    tr_t[0] = 6000.0  # training follow-up covers the test fold
    ours = time_dependent_auc(tr_t, tr_e, te_t, te_e, r, horizon=365.0)
    ref, _ = cumulative_dynamic_auc(Surv.from_arrays(tr_e == 1, tr_t), Surv.from_arrays(te_e == 1, te_t), r, [365.0])
    assert ours.value == pytest.approx(float(ref[0]), abs=1e-12)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(horizon=100.0), M.HORIZON_BEFORE_FOLLOWUP),
        (dict(horizon=700.0), M.HORIZON_BEYOND_FOLLOWUP),
        (dict(horizon=900.0), M.HORIZON_BEYOND_FOLLOWUP),
        (dict(test_event=[0, 0, 0, 1, 0]), M.NO_EVENT_BEFORE_HORIZON),
        (dict(test_event=[0, 0, 0, 0, 0]), M.NO_EVENT_BEFORE_HORIZON),
        (dict(train_time=[100, 120], train_event=[1, 0]), M.CENSORING_UNDEFINED),
    ],
)
def test_auc_undefined_reasons(kwargs, reason):
    args = dict(train_time=TR_T, train_event=TR_E, test_time=TE_T, test_event=TE_E, risk=RISK)
    args.update(kwargs)
    res = time_dependent_auc(**args)
    assert not res.defined
    assert res.value is None and res.reason == reason and res.detail
    assert math.isnan(float(res))


def test_auc_later_test_events_beyond_training_are_harmless():
    # The event at 500 d is after the horizon (a control) and beyond all training times;
    # scikit-survival alone would fail on it, the AUROC at 365 d must not.
    res = time_dependent_auc([100, 200, 300, 450], [1, 0, 1, 0], TE_T, TE_E, RISK, horizon=365)
    assert res.defined


@pytest.mark.parametrize(
    "time,event,risk,match",
    [
        ([1, 2], [1, 0, 1], [0, 1], "time has 2 entries but event has 3"),
        ([1, 2, 3], [1, 0, 1], [0, 1], "risk has 2 entries"),
        ([1, np.nan, 3], [1, 0, 1], [0, 1, 2], "NaN"),
        ([1, -2, 3], [1, 0, 1], [0, 1, 2], "negative time -2"),
        ([1, 2, 3], [1, 2, 1], [0, 1, 2], "event must be 0/1"),
        ([1, 2, 3], [1, 0, 1], [0, np.nan, 2], "risk is NaN"),
        ([1, 2, 3], [0, 0, 0], [0, 1, 2], "all 3 samples are censored"),
        ([5, 5, 5], [1, 1, 1], [0, 1, 2], "no comparable pair"),
    ],
)
def test_c_index_validation(time, event, risk, match):
    with pytest.raises(ValueError, match=match):
        c_index(time, event, risk)


def test_metric_value_invariants():
    with pytest.raises(ValueError):
        MetricValue(None)
    with pytest.raises(ValueError):
        MetricValue(0.5, "why")
    with pytest.raises(ValueError):
        MetricValue(float("nan"))
    assert MetricValue(0.7).to_dict() == {"value": 0.7, "reason": None, "detail": None}


def test_summarise_ignores_undefined_and_uses_sample_sd():
    vals = [MetricValue(0.6), MetricValue.undefined(M.NO_EVENT_BEFORE_HORIZON), 0.8, float("nan"), None, 0.7]
    s = summarise(vals)
    assert s["n_total"] == 6 and s["n_defined"] == 3 and s["n_undefined"] == 3
    assert s["mean"] == pytest.approx(0.7)
    assert s["sd"] == pytest.approx(np.std([0.6, 0.8, 0.7], ddof=1))
    one = summarise([0.5, None])
    assert one["mean"] == 0.5 and one["sd"] is None
    assert summarise([None, None])["mean"] is None


def _oof_frame(seed=0, n=100, k=5):
    rng = np.random.default_rng(seed)
    t, e, r = _random_survival(rng, n)
    t[t.argmax()] = 4000.0
    return pd.DataFrame(
        {"case_id": [f"C-{i:03d}" for i in range(n)], "fold": np.arange(n) % k, "risk": r, "time": t, "event": e}
    )


def test_fold_metrics_matches_direct_calls():
    oof = _oof_frame()
    per = fold_metrics(oof)
    assert list(per["fold"]) == [0, 1, 2, 3, 4]
    for _, row in per.iterrows():
        va, tr = oof[oof.fold == row.fold], oof[oof.fold != row.fold]
        assert row.n == len(va) and row.n_events == va.event.sum()
        assert row.c_index == pytest.approx(c_index(va.time, va.event, va.risk))
        auc = time_dependent_auc(tr.time, tr.event, va.time, va.event, va.risk)
        assert (math.isnan(row.auroc) and row.auroc_reason == auc.reason) or row.auroc == pytest.approx(auc.value)
    summ = M.summarise_folds(per)
    assert summ["c_index"]["n_total"] == 5
    assert summ["c_index"]["mean"] == pytest.approx(per["c_index"].mean())


def test_fold_metrics_reports_undefined_fold_and_repeats():
    oof = _oof_frame(seed=1)
    # Fold 2 gets no event before one year: its AUROC must be undefined, not 0.5.
    f2 = oof.fold == 2
    oof.loc[f2 & (oof.time <= 365), "event"] = 0
    per = fold_metrics(oof)
    row = per.set_index("fold").loc[2]
    assert math.isnan(row.auroc) and row.auroc_reason == M.NO_EVENT_BEFORE_HORIZON
    assert summarise(per["auroc"])["n_undefined"] >= 1
    rep = pd.concat([oof.assign(repeat=0), oof.assign(repeat=1)])
    per_rep = fold_metrics(rep)
    assert len(per_rep) == 10 and set(per_rep["repeat"]) == {0, 1}
    np.testing.assert_allclose(per_rep[per_rep.repeat == 1]["c_index"].to_numpy(), per["c_index"].to_numpy())


def test_fold_metrics_validation():
    oof = _oof_frame()
    with pytest.raises(ValueError, match="missing columns \\['risk'\\]"):
        fold_metrics(oof.drop(columns="risk"))
    with pytest.raises(ValueError, match="predicted twice"):
        fold_metrics(pd.concat([oof, oof.iloc[:1]]))
    with pytest.raises(ValueError, match="no entry for fold 0"):
        fold_metrics(oof, train_survival={1: ([1.0], [1])})


# --- "metric undefined, and why": one representation -------------------------------------------


@pytest.mark.parametrize(
    "time,event,risk,reason",
    [
        ([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3], M.NO_EVENTS),
        ([5, 5, 5], [1, 1, 1], [0.1, 0.2, 0.3], M.NO_COMPARABLE_PAIR),
        ([1, 2, 3], [1, 0, 1], [0.1, np.inf, 0.3], M.NON_FINITE_RISK),
    ],
)
def test_c_index_undefined_carries_its_reason(time, event, risk, reason):
    with pytest.raises(M.MetricUndefined) as info:
        c_index(time, event, risk)
    assert info.value.reason == reason and isinstance(info.value, ValueError)
    got = M.c_index_value(time, event, risk)
    assert (got.value, got.reason) == (None, reason) and got.detail == str(info.value)
    assert math.isnan(float(got)) and math.isnan(M.c_index_or_nan(time, event, risk))


def test_metric_value_keeps_values_and_still_raises_on_malformed_input():
    defined = M.c_index_value(TE_T, TE_E, RISK)
    assert defined.value == pytest.approx(6 / 8) and defined.reason is None
    assert M.c_index_or_nan(TE_T, TE_E, RISK) == defined.value
    # A metric that returns a MetricValue passes through, defined or not.
    auc = M.metric_value(time_dependent_auc, TR_T, TR_E, TE_T, TE_E, RISK, horizon=365)
    assert auc.value == pytest.approx(time_dependent_auc(TR_T, TR_E, TE_T, TE_E, RISK, horizon=365).value)
    late = M.metric_value(time_dependent_auc, TR_T, TR_E, TE_T, TE_E, RISK, horizon=800)
    assert (late.value, late.reason) == (None, M.HORIZON_BEYOND_FOLLOWUP)
    # A NaN risk makes the AUROC undefined too, through the same helper.
    nan_risk = M.metric_value(time_dependent_auc, TR_T, TR_E, TE_T, TE_E, [0.9, np.nan, 0.5, 0.4, 0.1])
    assert nan_risk.reason == M.NON_FINITE_RISK
    # Malformed input is an error, not an undefined metric.
    with pytest.raises(ValueError, match="risk has 2 entries") as info:
        M.c_index_value([1, 2, 3], [1, 0, 1], [0.1, 0.2])
    assert not isinstance(info.value, M.MetricUndefined)


def test_reason_codes_read_in_words():
    assert M.reason_text(M.NO_EVENT_BEFORE_HORIZON) == "no event before 365 d"
    assert M.reason_text(M.NO_VALID_EPOCH) == "no valid epoch"
    assert M.reason_text("some_new_code") == "some new code" and M.reason_text(None) == "reason unknown"
    assert all(M.reason_text(code) != code for code in M.REASON_TEXT if "_" in code)
