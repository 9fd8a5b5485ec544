"""SE(3)-invariant local structure encoder in the style of the ESM3 / StructTokenBench VQ-VAE.

Per residue: take its k nearest neighbours by CA distance (itself first), embed each
neighbour's sequence offset (clamped to +-32), run geometric-attention blocks inside that
neighbourhood using every neighbour's rigid frame, read out the query residue's vector and
project it to the code dimension. Frames enter attention only through rotated/translated
query/key/value vectors that are compared or brought back into the query's own frame, so the
output does not change when the whole structure is rotated or translated.

``esm3=True`` makes the network ESM3's ``StructureTokenEncoder`` (``esm/models/vqvae.py``, the
encoder StructTokenBench trains too), so its weights load by name (``protein/esm3.py``): a
SwiGLU feed-forward of width ``((4 d + 255) // 256) * 256`` with biases, biases in the attention's
projections, no norm before the output projection, ESM3's residue frame (x along C->CA instead of
CA->C; y from N as here), distances taken directly (no expansion, whose cancellation costs
float32 digits), and neighbourhoods that fall back to sequence distance where coordinates are
missing. The default (``esm3=False``) is provq's own variant, unchanged, so existing checkpoints
load as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from provq_lightning.protein.geometry import frames_from_backbone, gram_schmidt

# Real CA distances are far below this; pairs with a missing residue sort after every real pair
# (ESM3's ``knn_graph`` uses the same bound).
FAR = 1e6


def knn_neighbours(
    ca: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, L, E) of each residue's E = min(k, L) nearest valid residues by CA distance,
    the residue itself first, and a mask (B, L, E) of the real neighbours."""
    b, n, _ = ca.shape
    e = min(k, n)
    with torch.no_grad(), torch.autocast(ca.device.type, enabled=False):
        x = ca.float()
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        valid = mask.unsqueeze(1) & mask.unsqueeze(2)
        dist = dist.masked_fill(~valid, float("inf"))
        # The query itself always comes first (even for duplicate coordinates).
        dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=ca.device), -1.0)
        values, index = dist.topk(e, dim=-1, largest=False)
        return index, torch.isfinite(values) & mask.unsqueeze(-1)


def knn_neighbours_esm3(
    ca: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``knn_neighbours`` as ESM3 ranks them: real pairs by CA distance, then pairs with a
    missing residue by sequence distance (``FAR + 100 |i - j|``), so a residue without
    coordinates still gets its sequence neighbours. Such neighbours are masked keys, so the
    output of a residue with a frame does not depend on them; the edge lists match ESM3's."""
    b, n, _ = ca.shape
    e = min(k, n)
    with torch.no_grad(), torch.autocast(ca.device.type, enabled=False):
        x = ca.float().masked_fill(~mask.unsqueeze(-1), 0.0)
        dist = (x.unsqueeze(2) - x.unsqueeze(1)).norm(dim=-1)
        valid = mask.unsqueeze(1) & mask.unsqueeze(2)
        pos = torch.arange(n, device=ca.device, dtype=dist.dtype)
        fallback = FAR + 100.0 * (pos.unsqueeze(0) - pos.unsqueeze(1)).abs()
        dist = torch.where(valid, dist, fallback.expand_as(dist))
        dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=ca.device), -1.0)
        index = dist.topk(e, dim=-1, largest=False).indices
        real = torch.gather(valid, 2, index)
        return index, real


def esm3_frames(bb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ESM3's residue frames from N, CA, C (..., 3, 3): x along CA - C, y from N - CA, origin
    CA. ``R_esm3 = R_provq @ diag(-1, 1, -1)``: the same frame turned half a turn about y."""
    n, ca, c = bb.unbind(-2)
    return gram_schmidt(ca - c, n - ca), ca


def swiglu_hidden(dim: int, expansion: int = 4) -> int:
    """ESM3's SwiGLU width: ``expansion * dim`` rounded up to a multiple of 256."""
    return (expansion * dim + 255) // 256 * 256


class SwiGLU(nn.Module):
    """``silu(a) * b`` of the two halves of the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def gather_neighbours(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, L, ...) gathered at ``index`` (B, L, E) -> (B, L, E, ...)."""
    b, n, e = index.shape
    flat = index.reshape(b, n * e)
    out = x[torch.arange(b, device=x.device).unsqueeze(1), flat]
    return out.reshape(b, n, e, *x.shape[2:])


class RelativePositionEmbedding(nn.Module):
    """Embedding of ``clamp(j - i, -bins, bins)``; id 0 is reserved for absent neighbours."""

    def __init__(self, bins: int, dim: int) -> None:
        super().__init__()
        self.bins = bins
        self.embedding = nn.Embedding(2 * bins + 2, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, offset: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        ids = offset.clamp(-self.bins, self.bins) + self.bins + 1
        return self.embedding(torch.where(valid, ids, torch.zeros_like(ids)))


class GeometricAttention(nn.Module):
    """Attention between residue frames, invariant to global rotations and translations.

    Each head projects every residue to a direction query/key pair and a value, rotated into
    the global frame by the residue's rotation, and to a point query/key pair placed by the full
    frame. Logits are ``w_rot * <q_dir_i, k_dir_j> - w_dist * |q_pt_i - k_pt_j|``; the weighted
    values are rotated back into the query's frame before the output projection.
    """

    def __init__(
        self, dim: int, v_heads: int, bias: bool = False, exact_distances: bool = False
    ) -> None:
        super().__init__()
        self.v_heads = v_heads
        self.exact_distances = exact_distances
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, 5 * v_heads * 3, bias=bias)
        self.out = nn.Linear(v_heads * 3, dim, bias=bias)
        # Per-head balance of orientation vs distance and softmax sharpness (softplus > 0).
        self.rotation_scale = nn.Parameter(torch.zeros(v_heads))
        self.distance_scale = nn.Parameter(torch.zeros(v_heads))

    def forward(
        self, s: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``s`` (N, E, dim); frames ``rot`` (N, E, 3, 3), ``trans`` (N, E, 3); ``mask`` (N, E)."""
        n, e, _ = s.shape
        h = self.v_heads
        vecs = self.proj(self.norm(s)).view(n, e, 5 * h, 3)
        glob = torch.einsum("neij,nehj->nehi", rot, vecs)  # rotate every vector
        q_dir, k_dir, value, q_pt, k_pt = glob.split(h, dim=2)
        q_pt = q_pt + trans.unsqueeze(2)
        k_pt = k_pt + trans.unsqueeze(2)
        rot_term = torch.einsum("nihc,njhc->nhij", q_dir, k_dir) / math.sqrt(3.0)
        if self.exact_distances:
            # |q - k| from the differences (cdist's direct mode: no (N, H, E, E, 3) tensor).
            dist = torch.cdist(
                q_pt.transpose(1, 2).float(), k_pt.transpose(1, 2).float(),
                compute_mode="donot_use_mm_for_euclid_dist",
            ).to(rot_term.dtype)
        else:
            # |q - k| by expansion: no (N, H, E, E, 3) intermediate for wide models.
            sq = (
                q_pt.pow(2).sum(-1).transpose(1, 2).unsqueeze(-1)
                + k_pt.pow(2).sum(-1).transpose(1, 2).unsqueeze(-2)
                - 2.0 * torch.einsum("nihc,njhc->nhij", q_pt, k_pt)
            )
            dist = (sq.clamp_min(0.0) + 1e-8).sqrt()
        dist_term = dist / math.sqrt(3.0)
        logits = (
            F.softplus(self.rotation_scale).view(1, h, 1, 1) * rot_term
            - F.softplus(self.distance_scale).view(1, h, 1, 1) * dist_term
        )
        logits = logits.masked_fill(~mask.view(n, 1, 1, e), torch.finfo(logits.dtype).min)
        attn = logits.softmax(dim=-1)
        out = torch.einsum("nhij,njhc->nihc", attn, value)
        local = torch.einsum("neji,nehj->nehi", rot, out)  # back into the query's frame: R^T v
        local = local.masked_fill(~mask.view(n, e, 1, 1), 0.0)
        return self.out(local.reshape(n, e, h * 3))


class GeometricBlock(nn.Module):
    """Geometric attention then a feed-forward, each pre-norm with a residual; ``esm3``: ESM3's
    block (attention biases, exact distances, SwiGLU feed-forward)."""

    def __init__(self, dim: int, v_heads: int, expansion: int = 4, esm3: bool = False) -> None:
        super().__init__()
        self.attn = GeometricAttention(dim, v_heads, bias=esm3, exact_distances=esm3)
        if esm3:
            hidden = swiglu_hidden(dim, expansion)
            self.mlp = nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 2 * hidden), SwiGLU(), nn.Linear(hidden, dim)
            )
        else:
            self.mlp = nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, expansion * dim),
                nn.GELU(),
                nn.Linear(expansion * dim, dim),
            )

    def forward(self, s, rot, trans, mask):
        s = s + self.attn(s, rot, trans, mask)
        return s + self.mlp(s)


class StructureEncoder(nn.Module):
    """Backbone (B, L, >=3, 3) -> per-residue latents (B, L, code_dim).

    Args:
        dim: width of the geometric blocks (paper 1024).
        v_heads: geometric attention heads (paper 128).
        layers: number of geometric blocks (paper 2).
        code_dim: output dimension, the quantizer's code dimension.
        knn: neighbourhood size (16).
        rel_pos_bins: relative-position clamp (32).
        esm3: ESM3's network (see the module docstring); its weights load with
            ``protein.esm3``.
    """

    def __init__(
        self,
        dim: int = 64,
        v_heads: int = 8,
        layers: int = 2,
        code_dim: int = 32,
        knn: int = 16,
        rel_pos_bins: int = 32,
        esm3: bool = False,
    ) -> None:
        super().__init__()
        self.knn = knn
        self.esm3 = esm3
        self.rel_pos = RelativePositionEmbedding(rel_pos_bins, dim)
        self.blocks = nn.ModuleList(
            GeometricBlock(dim, v_heads, esm3=esm3) for _ in range(layers)
        )
        # ESM3 projects the last block's output directly.
        self.norm = nn.Identity() if esm3 else nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, code_dim)

    def forward(
        self, coords: torch.Tensor, residue_mask: torch.Tensor, residue_index: torch.Tensor
    ) -> torch.Tensor:
        """``coords`` (B, L, >=3, 3) N/CA/C(/O); ``residue_mask`` (B, L) True where N, CA and C
        exist; ``residue_index`` (B, L) positions along the chain."""
        b, n = residue_mask.shape
        bb = coords[:, :, :3].masked_fill(~residue_mask[..., None, None], 0.0)
        if self.esm3:
            rot, trans = esm3_frames(bb)
        else:
            rot, trans = frames_from_backbone(bb[:, :, 0], bb[:, :, 1], bb[:, :, 2])
        # Frameless residues get the identity frame; they are masked as keys anyway.
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device).expand_as(rot)
        rot = torch.where(residue_mask[..., None, None], rot, eye)
        find = knn_neighbours_esm3 if self.esm3 else knn_neighbours
        index, edge_mask = find(trans, residue_mask, self.knn)
        e = index.shape[-1]
        nb_rot = gather_neighbours(rot, index).reshape(b * n, e, 3, 3)
        nb_trans = gather_neighbours(trans, index).reshape(b * n, e, 3)
        # Only differences of positions enter attention, so express each neighbourhood relative
        # to its query's CA: small numbers (better float32 distances) and exact translation
        # invariance.
        nb_trans = nb_trans - nb_trans[:, :1]
        offset = gather_neighbours(residue_index, index) - residue_index.unsqueeze(-1)
        mask = edge_mask.reshape(b * n, e)
        s = self.rel_pos(offset.reshape(b * n, e), mask)
        for block in self.blocks:
            s = block(s, nb_rot, nb_trans, mask)
        z = self.norm(s[:, 0]).view(b, n, -1)  # read out the query residue
        z = z.masked_fill(~residue_mask.unsqueeze(-1), 0.0)
        return self.proj(z)
