"""Rigid-frame geometry of protein backbones (pure tensor functions, batched over leading dims).

Convention: a frame is ``(R, t)`` with ``R`` (..., 3, 3) whose columns are the local axes in
global coordinates, so ``x_global = R @ x_local + t``. A residue's frame has its origin at CA,
x along CA->C and N in the xy-plane (positive y).
"""

from __future__ import annotations

import math

import torch

# Ideal backbone geometry (Engh & Huber): bond lengths in Angstrom, N-CA-C angle.
N_CA = 1.458
CA_C = 1.525
C_O = 1.231
N_CA_C_DEG = 111.0
_angle = math.radians(N_CA_C_DEG)
# N, CA, C of one residue in its own frame.
IDEAL_BACKBONE = torch.tensor(
    [
        [N_CA * math.cos(_angle), N_CA * math.sin(_angle), 0.0],
        [0.0, 0.0, 0.0],
        [CA_C, 0.0, 0.0],
    ]
)
# Virtual C-beta from N, CA, C (ideal tetrahedral geometry; standard coefficients).
_CB_A, _CB_B, _CB_C = -0.58273431, 0.56802827, -0.54067466


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def gram_schmidt(x_axis: torch.Tensor, xy_plane: torch.Tensor) -> torch.Tensor:
    """Rotation whose first column is along ``x_axis`` and second in the (x, xy_plane) plane."""
    e1 = _unit(x_axis)
    e2 = _unit(xy_plane - (e1 * xy_plane).sum(-1, keepdim=True) * e1)
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


def frames_from_backbone(
    n: torch.Tensor, ca: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-residue frames ``(R, t)`` from N, CA, C coordinates (..., 3)."""
    return gram_schmidt(c - ca, n - ca), ca


def apply_frame(rot: torch.Tensor, trans: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Local points (..., P, 3) to global with frames (..., 3, 3), (..., 3)."""
    return torch.einsum("...ij,...pj->...pi", rot, local) + trans.unsqueeze(-2)


def invert_apply_frame(rot: torch.Tensor, trans: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Global points (..., P, 3) into the local coordinates of frames (..., 3, 3), (..., 3)."""
    return torch.einsum("...ji,...pj->...pi", rot, x - trans.unsqueeze(-2))


def place_backbone(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Ideal N, CA, C (..., 3, 3) for frames (..., 3, 3), (..., 3)."""
    return apply_frame(rot, trans, IDEAL_BACKBONE.to(rot))


def virtual_cb(n: torch.Tensor, ca: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Idealised C-beta position from the backbone (defined for glycine too)."""
    b = ca - n
    cc = c - ca
    a = torch.cross(b, cc, dim=-1)
    return _CB_A * a + _CB_B * b + _CB_C * cc + ca


def place_oxygen(ca: torch.Tensor, c: torch.Tensor, n_next: torch.Tensor) -> torch.Tensor:
    """Carbonyl O of residue i in the CA(i)-C(i)-N(i+1) plane, opposite the two bonds."""
    return c + C_O * _unit(_unit(c - ca) + _unit(c - n_next))


def backbone_with_oxygen(bb: torch.Tensor) -> torch.Tensor:
    """(L, 3, 3) N/CA/C -> (L, 4, 3) with O; the last residue's O uses an ideal psi of 180."""
    n, ca, c = bb.unbind(-2)
    o = torch.empty_like(ca)
    if bb.shape[0] > 1:
        o[:-1] = place_oxygen(ca[:-1], c[:-1], n[1:])
    # The C-terminus has no next N: put a pseudo one trans to N (psi = 180) at the ideal
    # CA-C-N angle (116 degrees) and bond length (1.33).
    u = _unit(c[-1] - ca[-1])
    side = n[-1] - ca[-1]
    perp = _unit(side - (side * u).sum() * u)
    cos_out = math.cos(math.radians(180.0 - 116.2))
    sin_out = math.sin(math.radians(180.0 - 116.2))
    pseudo_next = c[-1] + 1.33 * (cos_out * u - sin_out * perp)
    o[-1] = place_oxygen(ca[-1], c[-1], pseudo_next)
    return torch.cat([bb, o.unsqueeze(-2)], dim=-2)


def rotation_from_6d(v: torch.Tensor) -> torch.Tensor:
    """Rotation from an unconstrained 6-vector (two 3-vectors, Gram-Schmidt)."""
    return gram_schmidt(v[..., :3], v[..., 3:])


def random_rotation(generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """A uniformly random proper rotation (3, 3)."""
    q = torch.randn(4, generator=generator, dtype=dtype)
    w, x, y, z = (q / q.norm()).unbind()
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
        ]
    )


def kabsch(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proper rotation and translation minimising ||R x + t - y|| over masked points.

    ``x``, ``y``: (B, P, 3); ``mask``: (B, P). Solved in float64 (the SVD of a near-degenerate
    covariance is unstable in float32). Returns R (B, 3, 3) and t (B, 3).
    """
    x64, y64 = x.double(), y.double()
    w = (
        torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
        if mask is None
        else mask.double()
    )
    count = w.sum(-1, keepdim=True).clamp_min(1.0)
    mx = (w.unsqueeze(-1) * x64).sum(-2) / count
    my = (w.unsqueeze(-1) * y64).sum(-2) / count
    xc, yc = x64 - mx.unsqueeze(-2), y64 - my.unsqueeze(-2)
    cov = torch.einsum("bpi,bpj->bij", w.unsqueeze(-1) * yc, xc)
    u, _, vh = torch.linalg.svd(cov)
    # Flip the last singular direction when needed so the result is a rotation, not a mirror.
    d = torch.sign(torch.linalg.det(u @ vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(x.shape[0], 3, dtype=torch.float64, device=x.device)
    diag[:, 2] = d
    rot = u @ torch.diag_embed(diag) @ vh
    trans = my - torch.einsum("bij,bj->bi", rot, mx)
    return rot.to(x.dtype), trans.to(x.dtype)


def kabsch_rmsd(
    pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSD (B,) after optimal superposition of ``pred`` onto ``true`` (B, P, 3)."""
    rot, trans = kabsch(pred, true, mask)
    moved = torch.einsum("bij,bpj->bpi", rot.double(), pred.double()) + trans.double()[:, None]
    sq = (moved - true.double()).pow(2).sum(-1)
    w = torch.ones_like(sq) if mask is None else mask.double()
    return (sq * w).sum(-1).div(w.sum(-1).clamp_min(1.0)).sqrt().to(pred.dtype)


def pairwise_distances(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Euclidean distances (..., P, P), differentiable at zero."""
    diff = x.unsqueeze(-2) - x.unsqueeze(-3)
    return (diff.pow(2).sum(-1) + eps).sqrt()
