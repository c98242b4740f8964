"""PET-FM: the SegAnyPET image encoder (SAM-Med3D ``vit_b_ori`` 3D ViT), frozen.

The network reproduces SAM-Med3D's ``ImageEncoderViT3D`` as built by ``vit_b_ori``
(img 128^3, patch 16, 768-d, 12 blocks of 12 heads, window 14, global attention in blocks
2, 5, 8, 11, neck to 384 channels) with identical parameter names and shapes, so the public
SegAnyPET weights load strictly (189 keys, 92,924,928 parameters).

Two upstream behaviours are reproduced on purpose because the released weights were
trained with them:

* **Pad-to-window attention.** The token grid is 8^3 but the window is 14, so windowed
  blocks zero-pad the grid to 14^3 *after* ``norm1`` and attend over the whole padded window
  with no mask. Padded tokens are zeros, so their query/key/value equal the qkv bias and they
  still take part in every real query's softmax.
* **The 3D decomposed relative-position quirk.** For query ``(qd, qh, qw)`` and key
  ``(kd, kh, kw)`` upstream adds ``q(qd,qh,qw)·Rd[qd,kw] + q(qd,qh,w=kd)·Rh[qh,kw] +
  q(qd,qh,w=kh)·Rw[kh,kw]`` (every table's key index lands on the kw axis, and two terms read
  the query at another w position). ``R*[i, j] = table[i - j + size - 1]``.

Two numerically equivalent implementations of the windowed blocks are offered:

* ``fast_windowed=False`` (literal): pad, attend over all ``14^3`` tokens, crop.
* ``fast_windowed=True`` (default): attend the real queries over the real keys plus one
  *virtual* key whose value is the value bias and whose logit is ``log`` of the summed
  ``exp``-logits of all padded keys. Every padded key has key vector ``k_b`` and value
  ``v_b`` (the biases), so its logit is ``scale q·k_b + A(kw) + B(kd, kw) + C(kh, kw)`` and
  the sum over the padded set factorises per kw into products of one-axis sums. The padded
  set is split into the disjoint parts ``{kw >= gW}``, ``{kw < gW, kd >= gD}`` and
  ``{kw < gW, kd < gD, kh >= gH}`` so every part is a product of positive sums (computed in
  log space, no cancellation). The result equals the literal path to fp32 rounding.

Layouts: input volumes are ``[B, 1, D, H, W]`` (D = slice axis, as torch reads a
SimpleITK array ``(z, y, x)``); tokens are channels-last ``[B, d, h, w, C]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PETFMEncoder", "LayerNorm3d", "relative_position_table"]


def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Expand a relative-position table to ``[size, size, C]`` indexed (query, key).

    Args:
        rel_pos: learned table ``[2 * size - 1, C]``.
        size: number of positions along the axis (queries and keys alike).

    Returns:
        ``R`` with ``R[i, j] = rel_pos[i - j + size - 1]``, shape ``[size, size, C]``.

    Raises:
        ValueError: if the table length is not ``2 * size - 1`` (upstream would
            interpolate; the encoder only ever runs at its trained size).
    """
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative-position table has {rel_pos.shape[0]} rows, expected {2 * size - 1} "
            f"for an axis of {size} positions"
        )
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, D, H, W]`` (keys ``weight``, ``bias``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class _PatchEmbed(nn.Module):
    """Conv patch embedding; ``[B, Cin, D, H, W] -> [B, d, h, w, C]`` (channels last)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class _Attention(nn.Module):
    """Multi-head self-attention with upstream's decomposed 3D relative positions.

    Args:
        dim: token width C.
        num_heads: heads; head width ``C // num_heads``.
        rel_size: positions per axis the tables are built for (window size, or the grid
            size for global blocks); tables are ``[2 * rel_size - 1, C // num_heads]``.
    """

    def __init__(self, dim: int, num_heads: int, rel_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.rel_size = rel_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, d, h, w, C] -> q, k, v`` each ``[B, heads, d*h*w, head_dim]``."""
        b = x.shape[0]
        qkv = self.qkv(x).reshape(b, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge_heads(self, out: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``[B, heads, N, head_dim] -> [B, d, h, w, C]`` then the output projection."""
        b = out.shape[0]
        out = out.permute(0, 2, 1, 3).reshape(b, *grid, self.num_heads * self.head_dim)
        return self.proj(out)

    def forward_literal(self, x: torch.Tensor) -> torch.Tensor:
        """Full attention over a cubic block of tokens, exactly as upstream.

        Args:
            x: tokens ``[B, s, s, s, C]`` with ``s == rel_size`` (a padded window or the
                whole grid of a global block).

        Returns:
            ``[B, s, s, s, C]``.
        """
        b, d, h, w, _ = x.shape
        if not d == h == w == self.rel_size:
            raise ValueError(f"attention block expects a {self.rel_size}^3 token cube, got {d}x{h}x{w}")
        s = self.rel_size
        q, k, v = self._split_heads(x)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, n, N, N]
        rd = relative_position_table(self.rel_pos_d, s)
        rh = relative_position_table(self.rel_pos_h, s)
        rw = relative_position_table(self.rel_pos_w, s)
        qr = q.reshape(b, self.num_heads, s, s, s, self.head_dim)
        # Each term is [B, n, qd, qh, w, k]; its trailing k always meets the kw axis and its
        # w axis lands on qw / kd / kh respectively: upstream's broadcasting, kept verbatim.
        term_d = torch.einsum("bndhwc,dkc->bndhwk", qr, rd)
        term_h = torch.einsum("bndhwc,hkc->bndhwk", qr, rh)
        term_w = torch.einsum("bndhwc,wkc->bndhwk", qr, rw)
        view = logits.view(b, self.num_heads, s, s, s, s, s, s)
        view.add_(term_d[:, :, :, :, :, None, None, :])
        view.add_(term_h[:, :, :, :, None, :, None, :])
        view.add_(term_w[:, :, :, :, None, None, :, :])
        out = logits.softmax(dim=-1) @ v
        return self._merge_heads(out, (s, s, s))

    def forward_padded_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Exact equivalent of zero-padding ``x`` to one ``rel_size`` window + literal attention.

        Args:
            x: real tokens ``[B, gD, gH, gW, C]`` (after ``norm1``), each ``g <= rel_size``.

        Returns:
            ``[B, gD, gH, gW, C]``: what the literal path returns after cropping.
        """
        b, gd, gh, gw, _ = x.shape
        s = self.rel_size
        if max(gd, gh, gw) > s:
            raise ValueError(f"fast windowed attention needs a grid <= window {s}, got {gd}x{gh}x{gw}")
        n = self.num_heads
        q, k, v = self._split_heads(x)  # [B, n, N, c]
        bias = self.qkv.bias.view(3, n, self.head_dim)
        q_b, k_b, v_b = bias[0], bias[1], bias[2]  # query/key/value of a zero (padded) token
        rd = relative_position_table(self.rel_pos_d, s)
        rh = relative_position_table(self.rel_pos_h, s)
        rw = relative_position_table(self.rel_pos_w, s)

        qr = q.reshape(b, n, gd, gh, gw, self.head_dim)
        # Query vectors along the padded w axis: real ones, then the bias-only query.
        q_ext = torch.cat([qr, q_b.view(1, n, 1, 1, 1, -1).expand(b, n, gd, gh, s - gw, -1)], dim=4)
        term_a = torch.einsum("bndhwc,dkc->bndhwk", qr, rd[:gd])  # [B,n,gD,gH,gW, kw]
        term_b = torch.einsum("bndhwc,hkc->bndhwk", q_ext, rh[:gh])  # [B,n,gD,gH, kd, kw]
        term_c = torch.einsum("bndhwc,wkc->bndhwk", q_ext, rw)  # [B,n,gD,gH, kh, kw]

        logits = (q * self.scale) @ k.transpose(-2, -1)  # real keys only, [B, n, N, N]
        view = logits.view(b, n, gd, gh, gw, gd, gh, gw)
        view.add_(term_a[:, :, :, :, :, None, None, :gw])
        view.add_(term_b[:, :, :, :, None, :gd, None, :gw])
        view.add_(term_c[:, :, :, :, None, None, :gh, :gw])
        logits = logits.view(b, n, gd * gh * gw, gd * gh * gw)

        if (gd, gh, gw) == (s, s, s):  # nothing padded
            out = logits.softmax(dim=-1) @ v
            return self._merge_heads(out, (gd, gh, gw))

        neg_inf = torch.tensor(float("-inf"), dtype=term_b.dtype, device=term_b.device)

        def lse(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            # log-sum-exp over the key-coordinate axis (dim 4) in [lo, hi); -inf if empty.
            if hi <= lo:
                return neg_inf.expand(t.shape[:4] + t.shape[5:])
            return torch.logsumexp(t[:, :, :, :, lo:hi], dim=4)

        b_all, b_real, b_pad = lse(term_b, 0, s), lse(term_b, 0, gd), lse(term_b, gd, s)  # [B,n,gD,gH,kw]
        c_all, c_pad = lse(term_c, 0, s), lse(term_c, gh, s)
        # Per kw: log sum over padded (kd, kh) of exp(B + C), split into disjoint parts.
        inner_low = torch.logsumexp(torch.stack([b_pad + c_all, b_real + c_pad]), dim=0)[..., :gw]
        inner_high = (b_all + c_all)[..., gw:]
        inner = torch.cat([inner_low, inner_high], dim=-1)  # [B, n, gD, gH, s]
        c0 = self.scale * torch.einsum("bnqc,nc->bnq", q, k_b)  # [B, n, N]
        log_pad = c0 + torch.logsumexp(term_a + inner[:, :, :, :, None, :], dim=-1).reshape(b, n, -1)

        probs = torch.cat([logits, log_pad[..., None]], dim=-1).softmax(dim=-1)
        out = probs[..., :-1] @ v + probs[..., -1:] * v_b.view(1, n, 1, -1)
        return self._merge_heads(out, (gd, gh, gw))


class _Block(nn.Module):
    """Pre-norm transformer block; ``window_size == 0`` means global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: int, fast_windowed: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, rel_size=window_size if window_size > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.fast_windowed = fast_windowed

    def _windowed_literal(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad to multiples of the window, attend per window, unpartition, crop."""
        b, d, h, w, c = x.shape
        s = self.window_size
        pd, ph, pw = (-d) % s, (-h) % s, (-w) % s
        xp = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
        nd, nh, nw = (d + pd) // s, (h + ph) // s, (w + pw) // s
        win = xp.view(b, nd, s, nh, s, nw, s, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, s, s, s, c)
        # One window at a time bounds the memory of the 14^3 x 14^3 logits.
        out = torch.cat([self.attn.forward_literal(win[i : i + 1]) for i in range(win.shape[0])])
        out = out.view(b, nd, nh, nw, s, s, s, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, nd * s, nh * s, nw * s, c)[:, :d, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size == 0:
            y = self.attn.forward_literal(y)
        elif self.fast_windowed and max(y.shape[1:4]) <= self.window_size:
            y = self.attn.forward_padded_fast(y)
        else:
            y = self._windowed_literal(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PETFMEncoder(nn.Module):
    """SAM-Med3D ``vit_b_ori`` image encoder as used by SegAnyPET, frozen and eval-only.

    Args:
        img_size: input edge length (voxels, cubic input).
        patch_size: patch edge; the token grid is ``img_size // patch_size`` per axis.
        in_chans: input channels.
        embed_dim: token width C (the embedding size).
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / C.
        out_chans: neck output channels.
        window_size: window edge of the windowed blocks (grid zero-padded up to it).
        global_attn_indexes: blocks that attend globally over the unpadded grid.
        fast_windowed: use the exact virtual-key reformulation for windowed blocks whose
            grid fits one window (otherwise the literal pad-attend-crop path).

    Shapes:
        ``forward([B, in_chans, S, S, S]) -> [B, embed_dim]`` (mean of the tokens before the
        neck); ``forward_tokens -> [B, g, g, g, embed_dim]``;
        ``forward_neck -> [B, out_chans, g, g, g]``; ``S = img_size``, ``g = S // patch_size``.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        fast_windowed: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{depth - 1}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.grid = img_size // patch_size
        self.embedding_dim = embed_dim
        self.fast_windowed = fast_windowed
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, self.grid, embed_dim))
        self.blocks = nn.ModuleList(
            _Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                grid=self.grid,
                fast_windowed=fast_windowed,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PETFMEncoder:
        """Stay in eval mode whatever is asked: the encoder is frozen."""
        return super().train(False)

    def set_fast_windowed(self, fast: bool) -> None:
        """Switch the windowed blocks between the fast and the literal path."""
        self.fast_windowed = fast
        for blk in self.blocks:
            blk.fast_windowed = fast

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.in_chans, self.img_size, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"PET-FM expects input [B, {', '.join(map(str, want))}], got {list(x.shape)}")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block: ``[B, C, S, S, S] -> [B, g, g, g, embed_dim]``."""
        self._check_input(x)
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding = mean over the ``g^3`` tokens before the neck, ``[B, embed_dim]``."""
        return self.forward_tokens(x).mean(dim=(1, 2, 3))

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Upstream encoder output (neck applied), ``[B, out_chans, g, g, g]``."""
        return self.neck(self.forward_tokens(x).permute(0, 4, 1, 2, 3))
