"""Late fusion of frozen foundation-model embeddings.

Each cached FM embedding (e.g. CT-FM 512-d, PET-FM 768-d) goes through its own single
``nn.Linear`` to ``proj`` dimensions (64, 128 or 256 in the paper) or stays at its native size
(``proj=None``, the paper's "orig"). The results are concatenated in a fixed, sorted
order of the embeddings' names (the encoders', ``ct``/``pet``, or an imported table's) so
that a checkpoint's weights always meet the same embedding and the concatenated layout does
not depend on dict insertion order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["FMProjection", "PAPER_PROJ_DIMS"]

#: Projection sizes the paper ablates (``None`` = "orig", no projection).
PAPER_PROJ_DIMS: tuple[int | None, ...] = (64, 128, 256, None)


class FMProjection(nn.Module):
    """Project each FM embedding linearly (or keep it) and concatenate them.

    Args:
        fm_dims: embedding name -> native embedding size, e.g. ``{"ct": 512, "pet": 768}``.
            May be empty (no FM input; ``out_dim == 0``).
        proj: output size of every per-embedding ``nn.Linear`` (with bias), or ``None`` to
            pass embeddings through unchanged ("orig").

    Attributes:
        names: embedding names in the order they are concatenated (sorted).
        out_dim: length of the concatenated output.

    Shapes:
        ``forward({name: [B, fm_dims[name]]}) -> [B, out_dim]``.
    """

    def __init__(self, fm_dims: Mapping[str, int], proj: int | None = None) -> None:
        super().__init__()
        for name, dim in fm_dims.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"FM embedding names must be non-empty strings, got {name!r}")
            if int(dim) < 1:
                raise ValueError(f"FM embedding size of {name!r} must be >= 1, got {dim!r}")
        if proj is not None and int(proj) < 1:
            raise ValueError(f"proj must be None ('orig') or >= 1, got {proj!r}")
        self.fm_dims = {name: int(fm_dims[name]) for name in sorted(fm_dims)}
        self.names: tuple[str, ...] = tuple(self.fm_dims)
        self.proj = None if proj is None else int(proj)
        self.projections = nn.ModuleDict()
        if self.proj is not None:
            for name, dim in self.fm_dims.items():
                self.projections[name] = nn.Linear(dim, self.proj)
        self.out_dim = sum(self.fm_dims.values()) if self.proj is None else self.proj * len(self.fm_dims)

    def forward(self, fm: Mapping[str, torch.Tensor] | None, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate the (projected) embeddings.

        Args:
            fm: name -> ``[B, dim]`` tensor; must hold exactly the configured embeddings.
                ``None`` is accepted only when none is configured.
            reference: any ``[B, ...]`` tensor of the batch (e.g. the clinical vector); gives
                ``B``, device and dtype of the empty ``[B, 0]`` result when no embedding is
                configured, and is checked against the embeddings' batch size otherwise.

        Returns:
            ``[B, out_dim]``.
        """
        if not self.names:
            if fm:
                raise ValueError(f"FM embeddings {sorted(fm)} given, but the model was built without FM inputs")
            if reference is None:
                raise ValueError("reference is required when no FM embedding is configured")
            return reference.new_zeros(reference.shape[0], 0)
        if fm is None or set(fm) != set(self.names):
            got = None if fm is None else sorted(fm)
            raise ValueError(f"FM embeddings must cover exactly {list(self.names)}, got {got}")
        parts = []
        for name in self.names:
            emb = fm[name]
            if emb.dim() != 2 or emb.shape[1] != self.fm_dims[name]:
                raise ValueError(
                    f"FM embedding {name!r} must have shape [B, {self.fm_dims[name]}], got {tuple(emb.shape)}"
                )
            parts.append(self.projections[name](emb) if self.proj is not None else emb)
        sizes = {name: part.shape[0] for name, part in zip(self.names, parts)}
        expected = reference.shape[0] if reference is not None else parts[0].shape[0]
        if any(size != expected for size in sizes.values()):
            raise ValueError(f"FM embedding batch sizes {sizes} differ from the batch size {expected}")
        return torch.cat(parts, dim=1)
