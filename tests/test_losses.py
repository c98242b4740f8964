"""Cox partial likelihood (Breslow) and soft Dice against hand values and reference libraries."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models.losses import cox_ph_loss, deepmts_loss, soft_dice_loss


def brute_force_breslow(log_risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Textbook loop: mean over events of log(sum_{t_j >= t_i} exp(h_j)) - h_i (float64)."""
    terms = []
    for i in range(len(time)):
        if event[i]:
            risk_set = time >= time[i]
            terms.append(math.log(np.exp(log_risk[risk_set]).sum()) - log_risk[i])
    return float(np.mean(terms))


def test_cox_hand_computed_example_with_ties():
    # exp(h) = [1, 2, 1, 3]; times 1, 2, 2 (tie, both events), 3 censored.
    # i=0: log(1+2+1+3) - 0; i=1: log(2+1+3) - log 2; i=2: log(2+1+3) - 0.
    log_risk = torch.tensor([0.0, math.log(2.0), 0.0, math.log(3.0)], dtype=torch.float64)
    time = torch.tensor([1.0, 2.0, 2.0, 3.0])
    event = torch.tensor([1, 1, 1, 0])
    expected = (math.log(7.0) + math.log(3.0) + math.log(6.0)) / 3.0
    assert cox_ph_loss(log_risk, time, event).item() == pytest.approx(expected, abs=1e-12)


def test_cox_matches_brute_force_on_tied_data():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 6, size=24).astype(float)  # many ties
    event = rng.integers(0, 2, size=24)
    event[0] = 1
    log_risk = rng.normal(size=24)
    got = cox_ph_loss(torch.from_numpy(log_risk), torch.from_numpy(time), torch.from_numpy(event)).item()
    assert got == pytest.approx(brute_force_breslow(log_risk, time, event), abs=1e-10)


def test_cox_equals_lifelines_partial_likelihood_on_tie_free_data():
    lifelines = pytest.importorskip("lifelines")
    rng = np.random.default_rng(1)
    n = 60
    x = rng.normal(size=n)
    time = rng.permutation(np.arange(1, n + 1)).astype(float) * 10.0  # distinct: Breslow == Efron
    event = (rng.random(n) < 0.6).astype(int)
    df = pd.DataFrame({"x": x, "T": time, "E": event})
    fitter = lifelines.CoxPHFitter(penalizer=0.0).fit(df, duration_col="T", event_col="E")
    beta = float(fitter.params_["x"])
    loss = cox_ph_loss(torch.from_numpy(beta * x), torch.from_numpy(time), torch.from_numpy(event)).item()
    assert loss == pytest.approx(-fitter.log_likelihood_ / event.sum(), rel=1e-6)


def test_cox_minimum_is_scikit_survival_breslow_fit_on_tied_data():
    coxph = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv

    rng = np.random.default_rng(2)
    n = 80
    x = rng.normal(size=(n, 1))
    time = rng.integers(1, 8, size=n).astype(float)  # heavy ties
    event = rng.random(n) < 0.7
    model = coxph.CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x, Surv.from_arrays(event, time))
    beta_hat = float(model.coef_[0])

    def grad_at(beta: float) -> float:
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        cox_ph_loss(b * torch.from_numpy(x[:, 0]), torch.from_numpy(time), torch.from_numpy(event)).backward()
        return float(b.grad)

    # Our loss is Breslow's negative log partial likelihood / n_events: stationary at sksurv's MLE.
    assert abs(grad_at(beta_hat)) < 1e-6
    assert abs(grad_at(beta_hat + 0.5)) > 1e-2


def test_cox_is_stable_for_large_log_risks_and_shift_invariant():
    rng = np.random.default_rng(3)
    time = torch.from_numpy(rng.integers(1, 10, size=16).astype(float))
    event = torch.from_numpy((rng.random(16) < 0.5).astype(int))
    event[0] = 1
    base = torch.randn(16, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    big = (base * 1e3).requires_grad_(True)
    loss = cox_ph_loss(big, time, event)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    shifted = cox_ph_loss(base + 1e3, time, event)
    assert shifted.item() == pytest.approx(cox_ph_loss(base, time, event).item(), abs=1e-3)
    # In float64 the large case agrees with the shifted brute force (max subtracted by hand).
    scaled = (base.double() * 1e3).numpy()
    ref = brute_force_breslow(scaled - scaled.max(), time.numpy(), event.numpy())
    assert cox_ph_loss(torch.from_numpy(scaled), time, event).item() == pytest.approx(ref, rel=1e-9)


def test_cox_is_permutation_invariant():
    g = torch.Generator().manual_seed(4)
    log_risk = torch.randn(12, generator=g, dtype=torch.float64)
    time = torch.randint(1, 5, (12,), generator=g).double()
    event = torch.randint(0, 2, (12,), generator=g)
    event[3] = 1
    perm = torch.randperm(12, generator=g)
    a = cox_ph_loss(log_risk, time, event)
    b = cox_ph_loss(log_risk[perm], time[perm], event[perm])
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_cox_accepts_column_vector_and_rejects_bad_input():
    log_risk = torch.zeros(4, 1)
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert cox_ph_loss(log_risk, time, torch.tensor([1, 0, 1, 0])).item() == pytest.approx(
        (math.log(4) + math.log(2)) / 2
    )
    with pytest.raises(ValueError, match="no event"):
        cox_ph_loss(log_risk, time, torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        cox_ph_loss(log_risk, time[:3], torch.ones(3))


def test_soft_dice_matches_monai_and_edge_cases():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(5)
    prob = torch.rand(3, 1, 4, 5, 6, generator=g)
    target = (torch.rand(3, 1, 4, 5, 6, generator=g) > 0.7).float()
    ref = monai_losses.DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(prob, target)
    assert soft_dice_loss(prob, target, eps=1e-5).item() == pytest.approx(ref.item(), abs=1e-6)
    assert soft_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(torch.zeros(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)).item() == pytest.approx(0.0)
    assert soft_dice_loss(1 - target, target).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="shapes differ"):
        soft_dice_loss(prob, target[:, :, :3])


def test_deepmts_loss_weights_cox_twice():
    g = torch.Generator().manual_seed(6)
    out = {"seg_prob": torch.rand(4, 1, 3, 3, 3, generator=g), "risk": torch.randn(4, generator=g)}
    mask = (torch.rand(4, 3, 3, 3, generator=g) > 0.5).float()  # [B, D, H, W] accepted
    time, event = torch.tensor([3.0, 1.0, 2.0, 5.0]), torch.tensor([1, 0, 1, 0])
    total, parts = deepmts_loss(out, mask, time, event)
    dice = soft_dice_loss(out["seg_prob"], mask[:, None])
    cox = cox_ph_loss(out["risk"], time, event)
    assert total.item() == pytest.approx((dice + 2.0 * cox).item(), abs=1e-6)
    assert parts["dice"].item() == pytest.approx(dice.item()) and parts["cox"].item() == pytest.approx(cox.item())
    total1, _ = deepmts_loss(out, mask, time, event, cox_weight=1.0)
    assert total1.item() == pytest.approx((dice + cox).item(), abs=1e-6)


def test_cox_loss_accelerator_path_equals_the_host_path(monkeypatch):
    """The masked, sync-free form used off the CPU gives the indexed form's value and gradient."""
    from models import losses

    g = torch.Generator().manual_seed(3)
    risk = torch.randn(9, generator=g, dtype=torch.float64)
    time = torch.randint(1, 5, (9,), generator=g).double()  # ties in time
    event = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    a, b = risk.clone().requires_grad_(), risk.clone().requires_grad_()
    host = losses.cox_ph_loss(a, time, event)
    monkeypatch.setattr(losses, "HOST_CHECKED_DEVICES", ())
    masked = losses.cox_ph_loss(b, time, event)
    host.backward()
    masked.backward()
    torch.testing.assert_close(masked, host, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
    # Off the CPU an event-free batch is not checked (that would wait for the device): NaN.
    assert torch.isnan(losses.cox_ph_loss(risk, time, torch.zeros(9)))
