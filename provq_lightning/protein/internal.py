"""CA-trace internal coordinates and differentiable NeRF chaining (pure tensor functions).

Each residue ``i`` carries two angles of the CA trace:

- ``theta[i]``: the bond angle at CA(i) between CA(i-1) and CA(i+1) (defined for 1..L-2);
- ``tau[i]``: the dihedral CA(i-1), CA(i), CA(i+1), CA(i+2) (defined for 1..L-3), IUPAC sign
  (a right-handed alpha helix has tau ~ +50 degrees, a mirrored one ~ -50).

Angles travel as unit vectors ``(cos, sin)`` so that nothing wraps at +-pi. ``nerf_ca`` places
the trace from those angles with a fixed 3.8 A CA-CA step; its result is defined up to a proper
rigid motion (the first three residues fix the gauge), never up to a reflection: the sign of tau
decides the hand.

Chaining is a prefix product of per-step rotations, computed by doubling (log2 L batched
matmuls instead of L sequential steps), which keeps autograd graphs short on long chains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CA_CA = 3.8  # Angstrom: trans peptides; cis (~2.9 A) are rare
# CA(i)-CA(i+1) farther apart than this is a chain break (a missing residue, not a bond).
CA_BREAK = 4.5


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def ca_links(ca: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L-1) True where CA(i) and CA(i+1) are both present and bonded (closer than
    ``CA_BREAK``): a numbering gap or a missing residue breaks the link."""
    present = mask[:, 1:] & mask[:, :-1]
    step = (ca[:, 1:] - ca[:, :-1]).norm(dim=-1)
    return present & (step < CA_BREAK)


def ca_internal(
    ca: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-residue ``(theta, tau)`` as unit vectors (B, L, 2) each, and their validity (B, L).

    ``ca`` (B, L, 3), ``mask`` (B, L) residues with a CA. An angle is valid when every link it
    spans is (``ca_links``); invalid entries are zeros.
    """
    b, n, _ = ca.shape
    x = ca.double()
    link = ca_links(x, mask)
    theta = x.new_zeros(b, n, 2)
    tau = x.new_zeros(b, n, 2)
    theta_ok = torch.zeros(b, n, dtype=torch.bool, device=ca.device)
    tau_ok = torch.zeros_like(theta_ok)
    if n >= 3:
        u = _unit(x[:, :-2] - x[:, 1:-1])  # CA(i) -> CA(i-1), for i = 1..L-2
        v = _unit(x[:, 2:] - x[:, 1:-1])  # CA(i) -> CA(i+1)
        cos = (u * v).sum(-1)
        sin = torch.cross(u, v, dim=-1).norm(dim=-1)
        theta[:, 1:-1] = torch.stack([cos, sin], -1)
        theta_ok[:, 1:-1] = link[:, :-1] & link[:, 1:]
    if n >= 4:
        b1 = x[:, 1:-2] - x[:, :-3]
        b2 = x[:, 2:-1] - x[:, 1:-2]
        b3 = x[:, 3:] - x[:, 2:-1]
        n1 = torch.cross(b1, b2, dim=-1)
        n2 = torch.cross(b2, b3, dim=-1)
        m1 = torch.cross(_unit(b2), n1, dim=-1)
        tau[:, 1:-2] = torch.stack([(n1 * n2).sum(-1), (m1 * n2).sum(-1)], -1)
        tau_ok[:, 1:-2] = link[:, :-2] & link[:, 1:-1] & link[:, 2:]
    theta = _unit(theta) * theta_ok.unsqueeze(-1)
    tau = _unit(tau) * tau_ok.unsqueeze(-1)
    return theta.to(ca.dtype), tau.to(ca.dtype), theta_ok, tau_ok


def _angle_unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(cos, sin) normalised; a zero vector (an undefined angle) reads as angle 0."""
    norm = x.norm(dim=-1, keepdim=True)
    zero = torch.zeros_like(x)
    zero[..., 0] = 1.0
    return torch.where(norm > eps, x / norm.clamp_min(eps), zero)


def step_rotations(theta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Local rotations (..., 3, 3) taking the frame of bond CA(k-1)->CA(k) to that of
    CA(k)->CA(k+1), from the angle at CA(k) and the dihedral ending at CA(k+1), both given as
    (cos, sin) (normalised here; zeros read as angle 0). Frame: x along the bond, z the normal
    of the previous plane."""
    ct, st = _angle_unit(theta).unbind(-1)
    cp, sp = _angle_unit(tau).unbind(-1)
    # The next bond in the current frame: angle theta from the reversed bond, turned by tau.
    d = torch.stack([-ct, st * cp, st * sp], -1)
    z_next = torch.stack([torch.zeros_like(sp), -sp, cp], -1)  # unit(x cross d)
    y_next = torch.cross(z_next, d, dim=-1)
    return torch.stack([d, y_next, z_next], dim=-1)


def prefix_products(m: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix products ``m[0] @ m[1] @ ... @ m[k]`` along dim -3 of (..., N, 3, 3),
    by doubling: log2(N) batched matmuls."""
    out = m
    shift = 1
    n = m.shape[-3]
    while shift < n:
        left = out[..., :-shift, :, :]
        right = out[..., shift:, :, :]
        out = torch.cat([out[..., :shift, :, :], left @ right], dim=-3)
        shift *= 2
    return out


def nerf_ca(theta: torch.Tensor, tau: torch.Tensor, bond: float = CA_CA) -> torch.Tensor:
    """CA trace (B, L, 3) from per-residue ``theta``, ``tau`` (B, L, 2) as (cos, sin).

    CA(0) at the origin, CA(1) on +x; CA(k+1) turns by ``theta[k]`` at CA(k) and by the
    dihedral ``tau[k-1]`` (``tau[0]``, whose dihedral does not exist, only sets the gauge, and
    ``theta[0]``, ``theta[L-1]``, ``tau[L-2:]`` are unused). Differentiable in both.
    """
    b, n, _ = theta.shape
    if n == 0:
        return theta.new_zeros(b, 0, 3)
    first = torch.eye(3, dtype=theta.dtype, device=theta.device).expand(b, 1, 3, 3)
    if n > 2:
        steps = step_rotations(theta[:, 1 : n - 1], tau[:, : n - 2])
        frames = prefix_products(torch.cat([first, steps], dim=1))
    else:
        frames = first
    bonds = bond * frames[..., 0]  # each frame's x axis is its bond direction
    ca = torch.cumsum(bonds, dim=1)[:, : n - 1]
    return torch.cat([theta.new_zeros(b, 1, 3), ca], dim=1)


def angular_loss(
    pred: torch.Tensor, true: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean ``1 - cos(angle difference)`` over valid entries; ``pred`` unnormalised (..., 2),
    ``true`` unit (..., 2), ``valid`` (...)."""
    cos_diff = (F.normalize(pred, dim=-1) * true).sum(-1)
    w = valid.to(cos_diff.dtype)
    return ((1.0 - cos_diff) * w).sum() / w.sum().clamp_min(1.0)


def trace_frames(ca: torch.Tensor) -> torch.Tensor:
    """Per-residue rotations (B, L, 3, 3) from the CA trace alone: x along CA(i-1)->CA(i+1),
    y the outward bisector at CA(i); chain ends use their neighbour's axes."""
    b, n, _ = ca.shape
    if n < 3:
        return torch.eye(3, dtype=ca.dtype, device=ca.device).expand(b, n, 3, 3)
    prev, mid, nxt = ca[:, :-2], ca[:, 1:-1], ca[:, 2:]
    e1 = _unit(nxt - prev)
    out = (mid - prev) + (mid - nxt)
    e2 = _unit(out - (e1 * out).sum(-1, keepdim=True) * e1)
    e3 = torch.cross(e1, e2, dim=-1)
    rot = torch.stack([e1, e2, e3], dim=-1)
    return torch.cat([rot[:, :1], rot, rot[:, -1:]], dim=1)


def local_offsets(bb: torch.Tensor, ca_rot: torch.Tensor) -> torch.Tensor:
    """N and C of (B, L, 3, 3) backbones in the CA-trace frames ``ca_rot``: (B, L, 2, 3)."""
    ca = bb[:, :, 1:2]
    rel = bb[:, :, (0, 2)] - ca
    return torch.einsum("blji,blpj->blpi", ca_rot, rel)


def place_n_c(ca: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Backbone (B, L, 3, 3) N/CA/C from a CA trace and N, C offsets (B, L, 2, 3) given in
    its own trace frames (``trace_frames``)."""
    rot = trace_frames(ca)
    nc = torch.einsum("blij,blpj->blpi", rot, offsets) + ca.unsqueeze(-2)
    return torch.stack([nc[:, :, 0], ca, nc[:, :, 1]], dim=-2)
