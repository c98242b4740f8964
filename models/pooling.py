"""3D max and average pooling with a deterministic CUDA backward.

``nn.MaxPool3d`` and ``nn.AvgPool3d`` have no deterministic CUDA backward kernels (their
backward scatters with atomics; ``torch.use_deterministic_algorithms(True)`` makes them
raise). :class:`MaxPool3d` and :class:`AvgPool3d` are drop-in subclasses (same arguments,
no parameters, same ``state_dict``) that, on a CUDA input while deterministic algorithms are
enabled, pool through views and elementwise ops whose backward is a gather:

* windows are taken with ``Tensor.unfold`` on the ``D, H, W`` axes of ``[B, C, D, H, W]``
  (no padding, floor mode; the output grid is ``(n - k) // s + 1`` per axis);
* max: the first maximum of each window (``argmax``, the index ``nn.MaxPool3d`` picks on ties,
  scanning ``kd, kh, kw`` in order) as a one-hot mask, times the window, summed; the gradient
  goes to that element only, as ``nn.MaxPool3d``'s;
* average: the window's mean.

Everywhere else (CPU, or deterministic mode off) they are the ``torch.nn`` modules, so the
CPU path's numbers and speed are unchanged. On CPU the deterministic path gives the same
outputs and gradients (to float rounding of the window sums; tested).
"""

from __future__ import annotations

import torch
from torch import nn


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def windows(x: torch.Tensor, kernel_size, stride) -> torch.Tensor:
    """``[B, C, D, H, W]`` -> ``[B, C, D', H', W', kd * kh * kw]``: every pooling window (a view
    until the final reshape; no padding, floor mode)."""
    k, s = _triple(kernel_size), _triple(stride if stride is not None else kernel_size)
    w = x.unfold(2, k[0], s[0]).unfold(3, k[1], s[1]).unfold(4, k[2], s[2])
    return w.reshape(*w.shape[:5], k[0] * k[1] * k[2])


def deterministic_max_pool3d(x: torch.Tensor, kernel_size, stride=None) -> torch.Tensor:
    """Max pooling whose backward is a gather (see the module doc)."""
    w = windows(x, kernel_size, stride)
    first = nn.functional.one_hot(w.argmax(dim=-1), w.shape[-1]).to(w.dtype)
    return (w * first).sum(dim=-1)


def deterministic_avg_pool3d(x: torch.Tensor, kernel_size, stride=None) -> torch.Tensor:
    """Average pooling (no padding) whose backward is a broadcast (see the module doc)."""
    return windows(x, kernel_size, stride).mean(dim=-1)


def use_deterministic_path(x: torch.Tensor) -> bool:
    """Whether to pool through :func:`windows`: a CUDA input with deterministic algorithms on."""
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


def _plain(module: nn.Module) -> bool:
    return (
        module.padding in (0, (0, 0, 0))
        and not module.ceil_mode
        and getattr(module, "dilation", 1) in (1, (1, 1, 1))
        and not getattr(module, "return_indices", False)
    )


class MaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` with a deterministic CUDA path (no padding, dilation or ceil mode)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _plain(self):
            raise ValueError(f"{self!r}: the deterministic path supports no padding, dilation, ceil mode or indices")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_deterministic_path(x):
            return deterministic_max_pool3d(x, self.kernel_size, self.stride)
        return super().forward(x)


class AvgPool3d(nn.AvgPool3d):
    """``nn.AvgPool3d`` with a deterministic CUDA path (no padding or ceil mode)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _plain(self) or self.divisor_override is not None:
            raise ValueError(f"{self!r}: the deterministic path supports no padding, ceil mode or divisor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_deterministic_path(x):
            return deterministic_avg_pool3d(x, self.kernel_size, self.stride)
        return super().forward(x)
