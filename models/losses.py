"""Losses of the joint segmentation / survival network: soft Dice and Cox partial likelihood.

The total training loss is ``L = L_dice + 2 * L_cox`` (seed paper; DeepMTS upstream uses
equal weights by default). ``L_dice = 1 - mean soft Dice`` (upstream DeepMTS uses the
negative Dice ``-Dice``; the two differ by a constant, so gradients are identical and only
the reported value changes: ``1 - Dice`` is >= 0 and 0 at a perfect overlap).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["cox_ph_loss", "soft_dice_loss", "deepmts_loss"]


#: Devices on which :func:`cox_ph_loss` checks the batch has an event and selects event rows by
#: boolean indexing (reads that cost nothing on the host); elsewhere it uses masked ops that
#: never wait for the device. Same value either way, up to the order of the float sum.
HOST_CHECKED_DEVICES = ("cpu",)


def cox_ph_loss(log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over events.

    ``loss = mean_{i: e_i = 1} [ logsumexp_{j in R_i} log_h_j - log_h_i ]`` with risk set
    ``R_i = {j : t_j >= t_i}`` (Breslow: every subject tied with ``i`` is in ``R_i``, tied
    events included). The log-sum-exp keeps it finite for log-risks of any magnitude, and
    the result does not depend on the order of the batch (no pre-sorting needed).

    Args:
        log_risk: ``[B]`` predicted log hazard ratio (higher = earlier event); ``[B, 1]`` is
            accepted and flattened.
        time: ``[B]`` event or censoring times (any unit).
        event: ``[B]`` event indicator (1 / True = event observed, 0 = censored).

    Returns:
        Scalar tensor (differentiable w.r.t. ``log_risk``).

    Raises:
        ValueError: on shape mismatch, or (on CPU) when the batch has no event (no partial
            likelihood exists; the batch sampler must guarantee at least one event). On an
            accelerator such a batch gives NaN instead: checking would wait for the device.
    """
    if log_risk.dim() == 2 and log_risk.shape[1] == 1:
        log_risk = log_risk[:, 0]
    if log_risk.dim() != 1:
        raise ValueError(f"log_risk must have shape [B] or [B, 1], got {tuple(log_risk.shape)}")
    n = log_risk.shape[0]
    if tuple(time.shape) != (n,) or tuple(event.shape) != (n,):
        raise ValueError(
            f"time and event must have shape [{n}] like log_risk, got {tuple(time.shape)} and {tuple(event.shape)}"
        )
    event = event.to(device=log_risk.device).bool()
    on_host = log_risk.device.type in HOST_CHECKED_DEVICES
    if on_host:
        n_events = int(event.sum())
        if n_events == 0:
            raise ValueError(f"Cox partial likelihood undefined: batch of {n} samples has no event (all censored)")
    time = time.to(device=log_risk.device)
    # at_risk[i, j] = t_j >= t_i; row i is the risk set of subject i.
    at_risk = time[None, :] >= time[:, None]
    masked = log_risk[None, :].masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)
    per_subject = log_denominator - log_risk
    if on_host:
        return per_subject[event].sum() / n_events
    # On an accelerator, masked ops: no host sync (boolean indexing and int() wait for the
    # device). An event-free batch gives NaN here (0 / 0); the training sampler never draws one.
    return torch.where(event, per_subject, torch.zeros_like(per_subject)).sum() / event.sum()


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean_b Dice_b`` with a soft Dice per sample.

    ``Dice_b = (2 sum(p * y) + eps) / (sum(p) + sum(y) + eps)`` over all voxels (and
    channels) of sample ``b``; ``eps`` smooths numerator and denominator alike, so a sample
    with an empty mask and an empty prediction scores Dice 1 (loss 0) and an empty mask
    pushes the prediction towards 0. Equals MONAI ``DiceLoss(smooth_nr=eps, smooth_dr=eps)``
    for a single foreground channel.

    Args:
        prob: ``[B, 1, D, H, W]`` (or ``[B, ...]``) predicted tumour probability in [0, 1].
        target: same shape, binary tumour mask.
        eps: smoothing constant (> 0).

    Returns:
        Scalar tensor in [0, 1].
    """
    if prob.shape != target.shape:
        raise ValueError(f"prob and target shapes differ: {tuple(prob.shape)} vs {tuple(target.shape)}")
    if prob.dim() < 2:
        raise ValueError(f"prob must be [B, ...] with a batch axis, got {tuple(prob.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    target = target.to(prob.dtype)
    dims = tuple(range(1, prob.dim()))
    intersection = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    dice = (2.0 * intersection + eps) / (total + eps)
    return 1.0 - dice.mean()


def deepmts_loss(
    out: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    cox_weight: float = 2.0,
    dice_eps: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Joint loss ``L = L_dice + cox_weight * L_cox`` (``cox_weight = 2`` per the paper).

    Args:
        out: the model's output dict with ``seg_prob`` ``[B, 1, D, H, W]`` and ``risk`` ``[B]``.
        mask: ``[B, 1, D, H, W]`` binary tumour mask (``[B, D, H, W]`` is accepted).
        time: ``[B]`` RFS times.
        event: ``[B]`` event indicators.
        cox_weight: weight of the Cox term.
        dice_eps: smoothing of :func:`soft_dice_loss`.

    Returns:
        ``(total, parts)`` where ``parts`` holds detached ``dice``, ``cox`` and ``total``.
    """
    seg_prob = out["seg_prob"]
    if mask.dim() == seg_prob.dim() - 1:
        mask = mask.unsqueeze(1)
    dice = soft_dice_loss(seg_prob, mask, eps=dice_eps)
    cox = cox_ph_loss(out["risk"], time, event)
    total = dice + cox_weight * cox
    return total, {"dice": dice.detach(), "cox": cox.detach(), "total": total.detach()}
