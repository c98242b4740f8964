"""CT-FM: the frozen SegResEncoder of Pai et al. (2025), pooled to a 512-d embedding.

The class *is* MONAI's ``SegResEncoder`` (subclassed, not wrapped), so its ``state_dict``
keys are exactly those of the public ``project-lighter/ct_fm_feature_extractor``
``model.safetensors`` file (``conv_init.weight``, ``layers.0.blocks.0.conv1.weight``,
``layers.{0..3}.downsample.weight``, ...). At the defaults it has 77,760,992 parameters.

Layout: input ``[B, 1, D, H, W]`` with D the slice axis (a SimpleITK image's (x, y, z)
array read by numpy/torch as (z, y, x)); each of the 5 levels halves D, H and W, so the
spatial size must be divisible by 16 for the maps to stay aligned (48 x 128 x 128 -> 3 x 8 x 8
at the last level).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

__all__ = ["CTFMEncoder"]


class CTFMEncoder(SegResEncoder):
    """MONAI ``SegResEncoder`` (3D, BatchNorm, ReLU, no head), frozen and eval-only.

    Args:
        in_channels: input channels (1 for CT).
        init_filters: channels of the first level; level ``i`` has ``init_filters * 2**i``.
        blocks_down: residual blocks per level; the CT-FM release uses ``(1, 2, 2, 4, 4)``.

    Attributes:
        embedding_dim: channels of the last level (512 at the defaults).

    Shapes:
        ``forward([B, in_channels, D, H, W]) -> [B, embedding_dim]``: global average pool of
        the last feature map. ``forward_features`` returns all level maps.
    """

    def __init__(
        self, in_channels: int = 1, init_filters: int = 32, blocks_down: Sequence[int] = (1, 2, 2, 4, 4)
    ) -> None:
        blocks_down = tuple(int(b) for b in blocks_down)
        if not blocks_down or min(blocks_down) < 1:
            raise ValueError(f"blocks_down must be a non-empty sequence of positive ints, got {blocks_down!r}")
        super().__init__(spatial_dims=3, init_filters=init_filters, in_channels=in_channels, blocks_down=blocks_down)
        self.embedding_dim = init_filters * 2 ** (len(blocks_down) - 1)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> CTFMEncoder:
        """Stay in eval mode whatever is asked: BatchNorm always uses its running stats."""
        return super().train(False)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"CT-FM expects input [B, {self.in_channels}, D, H, W], got {list(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All level maps, ``[B, init_filters * 2**i, D / 2**i, H / 2**i, W / 2**i]``."""
        self._check_input(x)
        return self._forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Embedding ``[B, embedding_dim]`` = mean of the last map over D, H, W."""
        return self.forward_features(x)[-1].mean(dim=(2, 3, 4))
