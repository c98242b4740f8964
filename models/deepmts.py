"""DeepMTS (Meng et al., IEEE JBHI 2022) with one DAFT block and late FM-embedding fusion.

Layout: every volume is ``[B, C, D, H, W]`` with ``D`` the slice (z) axis, i.e. the numpy
``(z, y, x)`` order of the preprocessed cache (``survival/pet`` ``[48, 80, 80]``). The
survival CNN input is the 80 x 80 x 48 (x, y, z) crop, so ``input_size = (D, H, W) =
(48, 80, 80)``. Image channels: 0 = PET (SUV), 1 = CT (HU), as normalised by the data loader.

Architecture (paper widths; see :class:`DeepMTSConfig`):

* **Segmentation U-Net** on ``[PET, CT]``: 5 levels of 8, 16, 32, 64, 128 filters, 2x
  max-pool down, nearest 2x up with the skip concatenated after the upsampled map. Every
  stage is a :class:`ResidualStage`: a 1x1 Conv-BN-ReLU projection starts a running sum and
  each 3x3 Conv-BN-ReLU (the first reads the stage input, later ones read the running sum)
  is added to it; 3x3 convs per stage: encoder 2, 2, 3, 3, 4, decoder 3, 3, 2, 2. A 1x1
  conv to 2 classes + softmax; **channel 0 is the tumour** (as upstream), returned as
  ``seg_prob`` ``[B, 1, D, H, W]``.
* **Segmentation taps**: a 1x1 Conv-BN-ReLU of 4, 8, 16, 32, 64 channels on each encoder
  level, globally average-pooled -> 124-d.
* **Cascaded 3D DenseNet** on ``[PET, CT, tumour map]``: stem conv 24 x 3^3 stride 2 without
  padding (plain conv, no BN/ReLU, as upstream) -> dropout 0.05 -> max-pool 3 stride 2
  without padding; dense blocks of 4, 8, 16 layers (BN-ReLU-1x1 conv 64-dropout,
  BN-ReLU-3x3 conv 16-dropout, concat); after each block a transition BN-ReLU-1x1 conv to
  16, 32, 64 channels + dropout, tapped through its own BN-ReLU and globally pooled
  (-> 112-d); 2x2x2 average pooling (floor) after the first two transitions only (upstream
  does not pool after the last). At 48 x 80 x 80 the grids are 23x39x39 (stem), 11x19x19
  (block 1), 5x9x9 (block 2), 2x4x4 (block 3).
* **DAFT** (one block, conditioned on the clinical vector) modulates the output of the
  **last dense block** (32 + 16 * 16 = 288 channels at paper widths), i.e. after the last
  dense block and before the last transition, its tap and the global average pooling.
  Placing it there (rather than on the tapped 64-channel map right before pooling) keeps it
  a genuine feature-map transform: the transition's BN-ReLU-conv that follows makes the
  per-channel affine act non-linearly per voxel, whereas an affine right before a linear
  GAP would only be an affine map of the pooled vector.
* **Head**: seg taps (124) -> dropout 0.5 -> dense 64 ReLU; DenseNet taps (112) -> dropout
  0.5 -> dense 64 ReLU; concat ``[seg64, dense64, clinical, FM projections]``
  (:class:`models.fusion.FMProjection`) -> dropout 0.5 -> linear 1 = log-risk.

Tumour map into the DenseNet (``tumour_input``), with ``p = seg_prob`` and
``m = 1[p > gate_threshold]``:

* ``"gate"`` (seed paper, default): input ``[PET * m, CT * m, m]``; the thresholded map
  gates the images to the predicted tumour.
* ``"binary"``: input ``[PET, CT, m]`` (thresholded map as a channel, images not gated).
* ``"soft"`` (DeepMTS upstream): input ``[PET, CT, p]``.

Gradient flow: the threshold is a step function, so in ``"gate"`` and ``"binary"`` the
survival (Cox) loss sends **no** gradient through the tumour map: the segmentation decoder
and output conv learn from the Dice loss only, while the segmentation **encoder** still
receives survival gradients through its five taps. In ``"soft"`` the Cox loss also reaches
the decoder and output conv through ``p``.

Departures from the Keras original, all deliberate: convs followed directly by BN carry no
bias (BN cancels it); BN uses PyTorch defaults (momentum 0.1, eps 1e-5; Keras 0.01/1e-3);
L2 penalties become optimiser weight decay (:meth:`DeepMTS.param_groups`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.daft import DAFTBlock
from models.fusion import FMProjection
from models.pooling import AvgPool3d, MaxPool3d

__all__ = [
    "DeepMTS",
    "DeepMTSConfig",
    "ConvBNReLU",
    "ResidualStage",
    "SegmentationUNet",
    "DenseLayer",
    "SurvivalDenseNet",
    "TUMOUR_INPUTS",
]

TUMOUR_INPUTS = ("gate", "binary", "soft")
_TUPLE_FIELDS = (
    "input_size",
    "seg_filters",
    "seg_encoder_convs",
    "seg_decoder_convs",
    "tap_filters",
    "dense_blocks",
    "transition_filters",
)


@dataclass
class DeepMTSConfig:
    """Hyper-parameters of :class:`DeepMTS`; defaults are the paper's / upstream values.

    Args:
        n_clinical: length of the (already encoded) clinical vector.
        input_size: expected spatial size ``(D, H, W)`` of the image input; D (slices) first.
        in_channels: image channels (2: PET, CT).
        seg_filters: U-Net filters per level (5 levels).
        seg_encoder_convs: 3x3 convs per encoder stage.
        seg_decoder_convs: 3x3 convs per decoder stage (deepest first).
        tap_filters: 1x1 tap channels per encoder level (sum 124 at paper widths).
        dense_stem_filters: DenseNet stem conv filters.
        dense_blocks: layers per dense block.
        growth: dense-layer growth rate (3x3 conv filters).
        bottleneck_filters: dense-layer 1x1 conv filters.
        transition_filters: transition 1x1 conv filters per block (sum 112 at paper widths).
        dense_dropout: dropout inside the DenseNet.
        head_dropout: dropout before each head dense layer and the risk layer.
        head_units: width of the two head dense layers.
        tumour_input: ``"gate"``, ``"binary"`` or ``"soft"`` (see the module docstring).
        gate_threshold: threshold on the tumour probability for ``"gate"``/``"binary"``.
        use_daft: insert the DAFT block after the last dense block (needs ``n_clinical >= 1``).
        daft_bottleneck_factor: DAFT hidden width = ``int((C + n_clinical) / factor)``.
        fm_dims: FM embedding (an encoder's, ``ct``/``pet``, or an imported table's) -> its
            size, e.g. ``{"ct": 512, "pet": 768}``; empty = none.
        fm_proj: projection size of each embedding (64, 128, 256) or ``None`` ("orig").
        zero_init_risk: start the risk layer at zero weights, so the initial log-risk is
            the same for every case, as a Cox fit starts from beta = 0. With Glorot weights
            the directly concatenated clinical vector (unit scale) would set an arbitrary
            initial ranking that training must first undo.
        daft_identity_init: DAFT starts as the identity (``scale = 1 + alpha``, output
            layer zero; :class:`models.daft.DAFTBlock`), instead of multiplying the feature
            map by a random, clinical-dependent factor.
        tap_norm: batch-normalise the pooled segmentation and DenseNet taps before the head
            dense layers (not in the paper). Pooled features of a small tumour in a large
            crop vary little between cases; this puts them on the clinical vector's unit
            scale, so the image paths learn as fast as the clinical one. On in the demo.
    """

    n_clinical: int
    input_size: tuple[int, int, int] = (48, 80, 80)
    in_channels: int = 2
    seg_filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    seg_encoder_convs: tuple[int, ...] = (2, 2, 3, 3, 4)
    seg_decoder_convs: tuple[int, ...] = (3, 3, 2, 2)
    tap_filters: tuple[int, ...] = (4, 8, 16, 32, 64)
    dense_stem_filters: int = 24
    dense_blocks: tuple[int, ...] = (4, 8, 16)
    growth: int = 16
    bottleneck_filters: int = 64
    transition_filters: tuple[int, ...] = (16, 32, 64)
    dense_dropout: float = 0.05
    head_dropout: float = 0.5
    head_units: int = 64
    tumour_input: str = "gate"
    gate_threshold: float = 0.5
    use_daft: bool = True
    daft_bottleneck_factor: float = 7.0
    fm_dims: dict[str, int] = field(default_factory=dict)
    fm_proj: int | None = None
    zero_init_risk: bool = True
    daft_identity_init: bool = True
    tap_norm: bool = False

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        self.fm_dims = {str(k): int(v) for k, v in dict(self.fm_dims).items()}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field when the configuration cannot work."""
        if self.n_clinical < 0:
            raise ValueError(f"n_clinical must be >= 0, got {self.n_clinical}")
        if self.use_daft and self.n_clinical < 1:
            raise ValueError("use_daft=True needs n_clinical >= 1 (DAFT is conditioned on the clinical vector)")
        if self.tumour_input not in TUMOUR_INPUTS:
            raise ValueError(f"tumour_input must be one of {TUMOUR_INPUTS}, got {self.tumour_input!r}")
        if not 0.0 < self.gate_threshold < 1.0:
            raise ValueError(f"gate_threshold must lie in (0, 1), got {self.gate_threshold}")
        levels = len(self.seg_filters)
        if levels < 2:
            raise ValueError(f"seg_filters needs >= 2 levels, got {self.seg_filters}")
        for name, expected in (
            ("seg_encoder_convs", levels),
            ("tap_filters", levels),
            ("seg_decoder_convs", levels - 1),
        ):
            if len(getattr(self, name)) != expected:
                raise ValueError(
                    f"{name} needs {expected} entries for {levels} U-Net levels, got {getattr(self, name)}"
                )
        if len(self.transition_filters) != len(self.dense_blocks) or not self.dense_blocks:
            raise ValueError(
                f"transition_filters {self.transition_filters} and dense_blocks {self.dense_blocks} "
                "must be non-empty and of equal length"
            )
        positive = {n: getattr(self, n) for n in _TUPLE_FIELDS if n != "input_size"}
        positive.update(input_size=self.input_size)
        for name, values in positive.items():
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must hold positive integers, got {values}")
        if len(self.input_size) != 3:
            raise ValueError(f"input_size must be (D, H, W), got {self.input_size}")
        factor = 2 ** (levels - 1)
        if any(s % factor for s in self.input_size):
            raise ValueError(
                f"input_size {self.input_size} (D, H, W) must be divisible by {factor} for a {levels}-level U-Net"
            )
        final = densenet_output_size(self.input_size, len(self.dense_blocks))
        if any(s < 1 for s in final):
            raise ValueError(
                f"input_size {self.input_size} (D, H, W) is too small for the DenseNet: "
                f"its last dense block would be {final}"
            )
        for name in ("dense_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")

    @classmethod
    def tiny(cls, n_clinical: int, **overrides: Any) -> DeepMTSConfig:
        """A narrow configuration at 32^3 for tests and demos: same code, small widths.

        Args:
            n_clinical: length of the clinical vector.
            **overrides: any further field values.
        """
        return cls.from_preset("tiny", n_clinical, **overrides)

    @classmethod
    def from_preset(cls, preset: str, n_clinical: int, **overrides: Any) -> DeepMTSConfig:
        """A named size (:data:`PRESETS`: ``"paper"``, ``"demo"``, ``"tiny"``) plus overrides.

        Raises:
            ValueError: for an unknown preset name.
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(n_clinical=n_clinical, **{**PRESETS[preset], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (for run configs and ``params_hash``)."""
        return dataclasses.asdict(self)


#: Named network sizes: the paper's, the demo's (4-level U-Net, volumes of 24+ voxels per axis such as
#: the demo's 24^3) and the tests' (32^3). The same code runs all three.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "demo": dict(
        seg_filters=(2, 4, 4, 8),
        seg_encoder_convs=(1, 1, 1, 1),
        seg_decoder_convs=(1, 1, 1),
        tap_filters=(1, 2, 2, 4),
        dense_stem_filters=4,
        dense_blocks=(1, 1, 1),
        growth=4,
        bottleneck_filters=8,
        transition_filters=(4, 4, 8),
        head_units=8,
        # An 8-unit head: dropout 0.5 would silence half its features at every step.
        head_dropout=0.1,
        tap_norm=True,
    ),
    "tiny": dict(
        input_size=(32, 32, 32),
        seg_filters=(2, 2, 4, 4, 8),
        seg_encoder_convs=(1, 1, 1, 1, 2),
        seg_decoder_convs=(1, 1, 1, 1),
        tap_filters=(1, 2, 2, 3, 4),
        dense_stem_filters=4,
        dense_blocks=(1, 2, 2),
        growth=4,
        bottleneck_filters=8,
        transition_filters=(4, 4, 8),
        head_dropout=0.1,
        tap_norm=True,
    ),
}


def densenet_output_size(input_size: Sequence[int], n_blocks: int) -> tuple[int, ...]:
    """Spatial size ``(D, H, W)`` of the last dense block for a given input size.

    Stem conv k3 s2 and max-pool k3 s2 without padding, then a floor 2x average pooling
    between consecutive blocks.
    """
    sizes = []
    for s in input_size:
        s = (s - 3) // 2 + 1  # stem conv
        s = (s - 3) // 2 + 1  # max-pool
        for _ in range(n_blocks - 1):
            s //= 2
        sizes.append(s)
    return tuple(sizes)


class ConvBNReLU(nn.Sequential):
    """Conv3d (same padding, no bias) -> BatchNorm3d -> ReLU. ``[B, Cin, ...] -> [B, Cout, ...]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class ResidualStage(nn.Module):
    """DeepMTS U-Net stage: a 1x1 projection starts a running sum; each 3x3 conv is added to it.

    ``s = proj(x)``; ``s = conv_1(x) + s``; ``s = conv_k(s) + s`` for k >= 2; returns ``s``.

    Args:
        in_channels: input channels.
        out_channels: stage filters.
        n_convs: number of 3x3 Conv-BN-ReLU (>= 1).

    Shapes:
        ``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, n_convs: int) -> None:
        super().__init__()
        self.proj = ConvBNReLU(in_channels, out_channels, 1)
        self.convs = nn.ModuleList(
            ConvBNReLU(in_channels if i == 0 else out_channels, out_channels, 3) for i in range(n_convs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running = self.proj(x)
        for i, conv in enumerate(self.convs):
            running = conv(x if i == 0 else running) + running
        return running


class SegmentationUNet(nn.Module):
    """DeepMTS segmentation U-Net with encoder taps.

    Args:
        config: the network configuration.

    Shapes:
        ``forward(x [B, in_channels, D, H, W]) -> (seg_prob [B, 1, D, H, W], taps [B, sum(tap_filters)])``;
        ``seg_prob`` is softmax channel 0 (tumour).
    """

    def __init__(self, config: DeepMTSConfig) -> None:
        super().__init__()
        f = config.seg_filters
        self.encoder = nn.ModuleList()
        in_ch = config.in_channels
        for filters, n_convs in zip(f, config.seg_encoder_convs):
            self.encoder.append(ResidualStage(in_ch, filters, n_convs))
            in_ch = filters
        self.pool = MaxPool3d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.ModuleList()
        for level, n_convs in zip(range(len(f) - 2, -1, -1), config.seg_decoder_convs):
            self.decoder.append(ResidualStage(in_ch + f[level], f[level], n_convs))
            in_ch = f[level]
        self.out_conv = nn.Conv3d(in_ch, 2, 1)
        self.taps = nn.ModuleList(ConvBNReLU(fl, ft, 1) for fl, ft in zip(f, config.tap_filters))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for level, stage in enumerate(self.encoder):
            x = stage(x if level == 0 else self.pool(x))
            skips.append(x)
        taps = torch.cat([tap(s).mean(dim=(2, 3, 4)) for tap, s in zip(self.taps, skips)], dim=1)
        for stage, skip in zip(self.decoder, reversed(skips[:-1])):
            x = stage(torch.cat([self.up(x), skip], dim=1))
        seg_prob = torch.softmax(self.out_conv(x), dim=1)[:, 0:1]
        return seg_prob, taps


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-dropout-BN-ReLU-3x3 conv-dropout; output concatenated to the input.

    Shapes:
        ``[B, C, D, H, W] -> [B, C + growth, D, H, W]``.
    """

    def __init__(self, in_channels: int, bottleneck: int, growth: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm3d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, bottleneck, 1),
            nn.Dropout(dropout),
            nn.BatchNorm3d(bottleneck),
            nn.ReLU(inplace=True),
            nn.Conv3d(bottleneck, growth, 3, padding=1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class SurvivalDenseNet(nn.Module):
    """DeepMTS cascaded 3D DenseNet with transition taps and the optional DAFT block.

    Args:
        config: the network configuration.
        in_channels: input channels (3: PET, CT, tumour map).

    Shapes:
        ``forward(x [B, 3, D, H, W], clinical [B, n_clinical]) -> taps [B, sum(transition_filters)]``.
    """

    def __init__(self, config: DeepMTSConfig, in_channels: int = 3) -> None:
        super().__init__()
        p = config.dense_dropout
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, config.dense_stem_filters, 3, stride=2, padding=0),
            nn.Dropout(p),
            MaxPool3d(3, stride=2, padding=0),
        )
        ch = config.dense_stem_filters
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.taps = nn.ModuleList()
        for n_layers, t_filters in zip(config.dense_blocks, config.transition_filters):
            layers = []
            for _ in range(n_layers):
                layers.append(DenseLayer(ch, config.bottleneck_filters, config.growth, p))
                ch += config.growth
            self.blocks.append(nn.Sequential(*layers))
            #: channels of the last dense block's output (what DAFT modulates).
            self.last_block_channels = ch
            self.transitions.append(
                nn.Sequential(
                    nn.BatchNorm3d(ch),
                    nn.ReLU(inplace=True),
                    nn.Conv3d(ch, t_filters, 1),
                    nn.Dropout(p),
                )
            )
            self.taps.append(nn.Sequential(nn.BatchNorm3d(t_filters), nn.ReLU()))
            ch = t_filters
        self.daft = (
            DAFTBlock(
                self.last_block_channels,
                config.n_clinical,
                bottleneck_factor=config.daft_bottleneck_factor,
                identity_init=config.daft_identity_init,
            )
            if config.use_daft
            else None
        )
        self.pool = AvgPool3d(2, stride=2)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        taps = []
        last = len(self.blocks) - 1
        for i, (block, transition, tap) in enumerate(zip(self.blocks, self.transitions, self.taps)):
            x = block(x)
            if i == last and self.daft is not None:
                x = self.daft(x, clinical)
            x = transition(x)
            taps.append(tap(x).mean(dim=(2, 3, 4)))
            if i != last:
                x = self.pool(x)
        return torch.cat(taps, dim=1)


class DeepMTS(nn.Module):
    """DeepMTS + DAFT + late FM fusion: joint tumour segmentation and log-risk prediction.

    Args:
        config: :class:`DeepMTSConfig` (paper values by default; ``n_clinical`` required).

    Shapes:
        ``forward(image [B, 2, D, H, W], clinical [B, n_clinical], fm {name: [B, dim]} | None)``
        -> ``{"seg_prob": [B, 1, D, H, W], "risk": [B]}``; channels PET, CT; D = slices.
    """

    def __init__(self, config: DeepMTSConfig) -> None:
        super().__init__()
        self.config = config
        self.segmenter = SegmentationUNet(config)
        self.densenet = SurvivalDenseNet(config, in_channels=config.in_channels + 1)
        # Pooled taps vary little between cases (a small tumour in a large crop); batch norm over
        # the batch puts them on the unit between-case scale of the z-scored clinical vector.
        self.seg_norm = nn.BatchNorm1d(sum(config.tap_filters)) if config.tap_norm else nn.Identity()
        self.dense_norm = nn.BatchNorm1d(sum(config.transition_filters)) if config.tap_norm else nn.Identity()
        self.seg_fc = nn.Sequential(
            nn.Dropout(config.head_dropout),
            nn.Linear(sum(config.tap_filters), config.head_units),
            nn.ReLU(),
        )
        self.dense_fc = nn.Sequential(
            nn.Dropout(config.head_dropout),
            nn.Linear(sum(config.transition_filters), config.head_units),
            nn.ReLU(),
        )
        self.fusion = FMProjection(config.fm_dims, config.fm_proj)
        self.risk_in_features = 2 * config.head_units + config.n_clinical + self.fusion.out_dim
        self.risk_head = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(self.risk_in_features, 1))
        self._init_weights()

    def _init_weights(self) -> None:
        # Keras defaults of the original: he_uniform convs, glorot_uniform dense, zero biases.
        # DAFT keeps PyTorch's default Linear init, as in the DAFT code.
        daft_modules = set(self.densenet.daft.modules()) if self.densenet.daft is not None else set()
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.Linear) and module not in daft_modules:
                nn.init.xavier_uniform_(module.weight)
            else:
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.config.zero_init_risk:
            nn.init.zeros_(self.risk_head[-1].weight)

    def tumour_map_input(self, image: torch.Tensor, seg_prob: torch.Tensor) -> torch.Tensor:
        """The DenseNet input ``[B, in_channels + 1, D, H, W]`` for the configured ``tumour_input``."""
        mode = self.config.tumour_input
        if mode == "soft":
            return torch.cat([image, seg_prob], dim=1)
        # A step function: no gradient flows back through it (see module docstring).
        binary = (seg_prob.detach() > self.config.gate_threshold).to(image.dtype)
        if mode == "binary":
            return torch.cat([image, binary], dim=1)
        return torch.cat([image * binary, binary], dim=1)

    def forward(
        self,
        image: torch.Tensor,
        clinical: torch.Tensor,
        fm: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Segment, then predict the log-risk.

        Args:
            image: ``[B, 2, D, H, W]`` (PET, CT), ``(D, H, W) == config.input_size``.
            clinical: ``[B, n_clinical]`` encoded covariates.
            fm: name -> ``[B, dim]`` cached FM embeddings (exactly ``config.fm_dims``'s
                names), or ``None`` when the model has none.

        Returns:
            ``{"seg_prob": [B, 1, D, H, W] tumour probability, "risk": [B] log-risk}``.
        """
        cfg = self.config
        if image.dim() != 5 or image.shape[1] != cfg.in_channels:
            raise ValueError(f"image must be [B, {cfg.in_channels}, D, H, W] (PET, CT), got {tuple(image.shape)}")
        if tuple(image.shape[2:]) != cfg.input_size:
            raise ValueError(
                f"image spatial size {tuple(image.shape[2:])} != DeepMTSConfig.input_size {cfg.input_size} "
                "(both (D, H, W), slices first); set input_size or fix the array layout"
            )
        if clinical.dim() != 2 or clinical.shape != (image.shape[0], cfg.n_clinical):
            raise ValueError(f"clinical must be [{image.shape[0]}, {cfg.n_clinical}], got {tuple(clinical.shape)}")
        clinical = clinical.to(image.dtype)
        seg_prob, seg_taps = self.segmenter(image)
        dense_taps = self.densenet(self.tumour_map_input(image, seg_prob), clinical)
        fm_part = self.fusion(fm, reference=clinical)
        features = torch.cat(
            [
                self.seg_fc(self.seg_norm(seg_taps)),
                self.dense_fc(self.dense_norm(dense_taps)),
                clinical,
                fm_part.to(image.dtype),
            ],
            dim=1,
        )
        risk = self.risk_head(features)[:, 0]
        return {"seg_prob": seg_prob, "risk": risk}

    def param_groups(
        self,
        wd_classifier: float = 0.1,
        wd_densenet: float = 1e-4,
        wd_segmentation: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Optimiser parameter groups with the paper's weight decays.

        * ``classifier`` (``wd_classifier``, paper 0.1): the weights of the two head dense
          layers, the risk layer and the FM projections (upstream: L2 0.1 on the three dense
          kernels; the projections sit in the same classifier). Their biases go to
          ``classifier_bias`` with no decay, as Keras ``kernel_regularizer`` leaves biases alone.
        * ``densenet`` (``wd_densenet``, paper 1e-4): every DenseNet parameter, DAFT included.
        * ``segmentation`` (``wd_segmentation``, default 0: upstream regularises none of it):
          the U-Net and its taps.

        Note that ``torch.optim.Adam(weight_decay=w)`` adds ``w * theta`` to the gradient; a
        Keras ``l2(w)`` penalty adds ``2 * w * theta``. The paper quotes 0.1, used as is.

        Returns:
            A list of ``{"name", "params", "weight_decay"}`` dicts for ``torch.optim``; every
            trainable parameter appears in exactly one group; empty groups are omitted.
        """
        classifier_weights, classifier_biases = [], []
        for module in (self.seg_fc, self.dense_fc, self.risk_head, self.fusion):
            for name, param in module.named_parameters():
                (classifier_biases if name.endswith("bias") else classifier_weights).append(param)
        for module in (self.seg_norm, self.dense_norm):  # normalisation affine: never decayed
            classifier_biases.extend(module.parameters())
        groups = [
            {"name": "classifier", "params": classifier_weights, "weight_decay": wd_classifier},
            {"name": "classifier_bias", "params": classifier_biases, "weight_decay": 0.0},
            {"name": "densenet", "params": list(self.densenet.parameters()), "weight_decay": wd_densenet},
            {"name": "segmentation", "params": list(self.segmenter.parameters()), "weight_decay": wd_segmentation},
        ]
        return [g for g in groups if g["params"]]
