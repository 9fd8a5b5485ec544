"""Encoder from explicit local geometry: each residue sees the CA-trace internal coordinates of
a window around it (and, optionally, RBF-encoded distances to its nearest residues in space).

The window of ``(cos, sin)`` of theta and tau plus their validity flags is what a residue's
local backbone conformation is; a few residual 1-D convolutions mix neighbouring windows. All
features are rotation- and translation-invariant; tau's sign makes them see the hand (a mirrored
chain gets other codes), which the decoder needs to rebuild the right one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from provq_lightning.protein.encoder import gather_neighbours, knn_neighbours
from provq_lightning.protein.internal import ca_internal

ANGLE_FEATURES = 6  # cos/sin theta, cos/sin tau, theta valid, tau valid
ANGLE_SKIP_DIMS = 4  # cos/sin theta, cos/sin tau


def window_features(
    ca: torch.Tensor, mask: torch.Tensor, before: int, after: int
) -> torch.Tensor:
    """(B, L, (before + 1 + after) * 6): the internal coordinates of residues i-before..i+after
    (zeros outside the chain or where undefined)."""
    theta, tau, theta_ok, tau_ok = ca_internal(ca, mask)
    per_res = torch.cat(
        [theta, tau, theta_ok.unsqueeze(-1).to(ca.dtype), tau_ok.unsqueeze(-1).to(ca.dtype)], -1
    )
    padded = F.pad(per_res, (0, 0, before, after))
    n = ca.shape[1]
    return torch.cat([padded[:, k : k + n] for k in range(before + 1 + after)], dim=-1)


def rbf(d: torch.Tensor, low: float = 2.0, high: float = 22.0, bins: int = 16) -> torch.Tensor:
    """Gaussian radial basis features (..., bins) of distances (...) in Angstrom."""
    centers = torch.linspace(low, high, bins, device=d.device, dtype=d.dtype)
    width = (high - low) / bins
    return torch.exp(-(((d.unsqueeze(-1) - centers) / width) ** 2))


class ConvBlock(nn.Module):
    """Residual pre-norm 1-D convolution block over the sequence, padding masked to zero."""

    def __init__(self, dim: int, kernel: int = 5, dilation: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel // 2),
                              dilation=dilation)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).masked_fill(~pad_mask.unsqueeze(-1), 0.0)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + self.mlp(h)


class LocalGeometryEncoder(nn.Module):
    """Backbone (B, L, >=3, 3) -> per-residue latents (B, L, code_dim) from local geometry.

    Args:
        dim: hidden width; layers: residual conv blocks after the per-residue MLP.
        code_dim: output dimension (the quantizer's).
        window_before, window_after: residues of internal coordinates each one sees
            (2, 3: theta/tau of i-2..i+3, every angle that moves CA(i-1)..CA(i+3)).
        knn: also encode RBF distances to this many nearest residues (0: off), with their
            clamped sequence offsets.
        kernel: convolution width.
        angle_skip: > 0: the latent's first 4 dimensions are the residue's own (cos theta,
            sin theta, cos tau, sin tau) times this scale (zeros where undefined), the rest is
            learned; the quantizer then clusters the angles themselves (as the k-means floor
            does) together with the learned context, and ``angle_residual`` in the decoder
            reads them back.
    """

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        code_dim: int = 32,
        window_before: int = 2,
        window_after: int = 3,
        knn: int = 0,
        kernel: int = 3,
        rel_pos_bins: int = 32,
        angle_skip: float = 0.0,
    ) -> None:
        super().__init__()
        if angle_skip > 0 and code_dim <= ANGLE_SKIP_DIMS:
            raise ValueError(f"angle_skip needs code_dim > {ANGLE_SKIP_DIMS}, got {code_dim}")
        self.before, self.after, self.knn = window_before, window_after, knn
        self.angle_skip = angle_skip
        width = (window_before + 1 + window_after) * ANGLE_FEATURES
        self.inp = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))
        if knn > 0:
            self.rel_pos_bins = rel_pos_bins
            self.edge = nn.Sequential(
                nn.Linear(16 + 2 * rel_pos_bins + 1, dim), nn.GELU(), nn.Linear(dim, dim)
            )
        self.blocks = nn.ModuleList(ConvBlock(dim, kernel) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, code_dim - (ANGLE_SKIP_DIMS if angle_skip > 0 else 0))

    def forward(
        self, coords: torch.Tensor, residue_mask: torch.Tensor, residue_index: torch.Tensor
    ) -> torch.Tensor:
        with torch.autocast(coords.device.type, enabled=False):
            ca = coords[:, :, 1].float().masked_fill(~residue_mask.unsqueeze(-1), 0.0)
            x = self.inp(window_features(ca, residue_mask, self.before, self.after))
            if self.knn > 0:
                x = x + self._neighbours(ca, residue_mask, residue_index)
        pad = residue_mask
        for block in self.blocks:
            x = block(x, pad)
        z = self.proj(self.norm(x))
        if self.angle_skip > 0:
            with torch.autocast(coords.device.type, enabled=False):
                angles = window_features(ca, residue_mask, 0, 0)[..., :ANGLE_SKIP_DIMS]
            z = torch.cat([self.angle_skip * angles.to(z.dtype), z], dim=-1)
        return z.masked_fill(~residue_mask.unsqueeze(-1), 0.0)

    def _neighbours(self, ca, mask, residue_index) -> torch.Tensor:
        """Mean over the k nearest residues (not itself) of an MLP of RBF(distance) and the
        one-hot clamped sequence offset (ProteinMPNN-style edges, pooled)."""
        index, valid = knn_neighbours(ca, mask, self.knn + 1)
        index, valid = index[..., 1:], valid[..., 1:]
        d = (gather_neighbours(ca, index) - ca.unsqueeze(-2)).norm(dim=-1)
        offset = gather_neighbours(residue_index, index) - residue_index.unsqueeze(-1)
        bins = self.rel_pos_bins
        onehot = F.one_hot(offset.clamp(-bins, bins) + bins, 2 * bins + 1).to(d.dtype)
        edges = self.edge(torch.cat([rbf(d), onehot], -1)) * valid.unsqueeze(-1)
        return edges.sum(-2) / valid.sum(-1, keepdim=True).clamp_min(1)
