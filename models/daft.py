"""Dynamic Affine Feature-map Transform (DAFT; Poelsterl et al., MICCAI 2021).

A DAFT block conditions a 3D feature map on a tabular vector (here: the clinical
covariates). The feature map is squeezed by global average pooling, concatenated with the
tabular vector and passed through a two-layer bottleneck MLP (no biases) that predicts one
scale ``alpha`` and one shift ``beta`` per channel; the output is ``alpha * F + beta``.

Semantics follow the ``DAFTBlock.rescale_features`` of the public ai-med/DAFT code with its
defaults (scale and shift both on, linear scale activation, no ``1 +`` on the scale) and the
bottleneck size its command line derives: ``int((C + n_tab) / bottleneck_factor)`` with
factor 7. Unlike upstream, the block here is only the transform, not a whole residual
block, so it can be placed anywhere in a network.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["DAFTBlock", "daft_bottleneck_dim"]

_SCALE_ACTIVATIONS = ("linear", "sigmoid", "tanh")


def daft_bottleneck_dim(in_channels: int, n_tabular: int, bottleneck_factor: float = 7.0) -> int:
    """Width of the DAFT MLP's hidden layer: ``max(1, int((C + n_tab) / factor))``.

    Args:
        in_channels: channels ``C`` of the modulated feature map.
        n_tabular: length of the tabular vector.
        bottleneck_factor: reduction factor (7 in the DAFT paper and code).

    Returns:
        The hidden width, at least 1 (a zero-width layer would make the block a constant).
    """
    if bottleneck_factor <= 0:
        raise ValueError(f"bottleneck_factor must be > 0, got {bottleneck_factor!r}")
    return max(1, int((in_channels + n_tabular) / bottleneck_factor))


class DAFTBlock(nn.Module):
    """Per-channel affine modulation of a 3D feature map conditioned on a tabular vector.

    ``squeeze = GAP(x)`` ``[B, C]``; ``h = cat(squeeze, tab)`` ``[B, C + n_tab]``;
    ``alpha, beta = split(W2 relu(W1 h))`` each ``[B, C]``; output
    ``act(alpha)[..., None, None, None] * x + beta[..., None, None, None]``.

    Args:
        in_channels: channels ``C`` of the feature map.
        n_tabular: length of the tabular vector (>= 1).
        bottleneck_factor: hidden width = ``max(1, int((C + n_tab) / bottleneck_factor))``.
        bottleneck_dim: explicit hidden width; overrides ``bottleneck_factor`` when given.
        scale_activation: ``"linear"`` (DAFT default, alpha used as is), ``"sigmoid"`` or
            ``"tanh"``.
        identity_init: start as the identity transform: the MLP's output layer is
            zero-initialised and the scale is ``1 + act(alpha)`` (``"linear"`` or ``"tanh"``
            only). Upstream DAFT sits inside a residual block, so its random initial transform
            only perturbs a residual branch; placed on its own, as here, a random ``alpha``
            would multiply the whole feature map by a random, covariate-dependent factor per
            channel, and the image signal would first have to be recovered from it.

    Shapes:
        ``forward(x [B, C, D, H, W], tab [B, n_tab]) -> [B, C, D, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        n_tabular: int,
        bottleneck_factor: float = 7.0,
        bottleneck_dim: int | None = None,
        scale_activation: str = "linear",
        identity_init: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        if n_tabular < 1:
            raise ValueError(f"n_tabular must be >= 1 (DAFT needs a tabular vector), got {n_tabular!r}")
        if scale_activation not in _SCALE_ACTIVATIONS:
            raise ValueError(f"scale_activation must be one of {_SCALE_ACTIVATIONS}, got {scale_activation!r}")
        if identity_init and scale_activation == "sigmoid":
            raise ValueError("identity_init needs scale_activation 'linear' or 'tanh' (sigmoid(0) != 0)")
        if bottleneck_dim is None:
            bottleneck_dim = daft_bottleneck_dim(in_channels, n_tabular, bottleneck_factor)
        elif bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim must be >= 1, got {bottleneck_dim!r}")
        self.in_channels = in_channels
        self.n_tabular = n_tabular
        self.bottleneck_dim = bottleneck_dim
        self.scale_activation = scale_activation
        self.identity_init = identity_init
        self.aux = nn.Sequential(
            OrderedDict(
                [
                    ("aux_base", nn.Linear(in_channels + n_tabular, bottleneck_dim, bias=False)),
                    ("aux_relu", nn.ReLU()),
                    ("aux_out", nn.Linear(bottleneck_dim, 2 * in_channels, bias=False)),
                ]
            )
        )
        if identity_init:
            nn.init.zeros_(self.aux.aux_out.weight)

    def scale_shift(self, x: torch.Tensor, tab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample, per-channel ``(alpha, beta)``, each ``[B, C]`` (alpha after activation)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"DAFT expects x of shape [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        if tab.dim() != 2 or tab.shape[0] != x.shape[0] or tab.shape[1] != self.n_tabular:
            raise ValueError(f"DAFT expects tab of shape [{x.shape[0]}, {self.n_tabular}], got {tuple(tab.shape)}")
        squeeze = x.mean(dim=(2, 3, 4))
        attention = self.aux(torch.cat([squeeze, tab.to(squeeze.dtype)], dim=1))
        alpha, beta = torch.split(attention, self.in_channels, dim=1)
        if self.scale_activation == "sigmoid":
            alpha = torch.sigmoid(alpha)
        elif self.scale_activation == "tanh":
            alpha = torch.tanh(alpha)
        if self.identity_init:
            alpha = 1.0 + alpha
        return alpha, beta

    def forward(self, x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """Modulate ``x`` [B, C, D, H, W] with ``tab`` [B, n_tab]; returns [B, C, D, H, W]."""
        alpha, beta = self.scale_shift(x, tab)
        return alpha[:, :, None, None, None] * x + beta[:, :, None, None, None]
