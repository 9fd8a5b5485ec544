"""Pictures of one reconstructed chain: what the structure metrics summarise, at a glance.

``chain_figure`` superposes a reconstruction onto its input (the same Kabsch superposition as
the backbone RMSD), scores it with the validation metrics and hands numpy arrays to
``structure_figure``, a pure drawing function: CA traces in two projections, the two CA
distance maps side by side and the per-residue error.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

import provq_lightning.reporting.plots  # noqa: F401  (selects the headless matplotlib backend first)
from provq_lightning.protein.geometry import kabsch
from provq_lightning.protein.metrics import backbone_rmsd, lddt_ca, tm_score_ca

INPUT_COLOR = "tab:blue"
RECON_COLOR = "tab:orange"
# Titles of the panels, in drawing order; tests and readers find panels by them.
PANEL_TITLES = (
    "CA trace, x-y",
    "CA trace, x-z",
    "per-residue error",
    "CA distances, input",
    "CA distances, reconstruction",
)


def _distance_map(ca: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ca[:, None, :] - ca[None, :, :], axis=-1)


def structure_figure(
    true_ca: np.ndarray,
    pred_ca: np.ndarray,
    title: str = "",
) -> plt.Figure:
    """Input vs reconstruction of one chain, ``true_ca`` and superposed ``pred_ca`` (L, 3).

    Top row: both CA traces projected on x-y and x-z, and the per-residue CA distance between
    them. Bottom row: the input's and the reconstruction's CA distance maps on one colour scale
    (so a shrunken reconstruction looks darker, not merely rescaled).
    """
    true_ca = np.asarray(true_ca, dtype=np.float64)
    pred_ca = np.asarray(pred_ca, dtype=np.float64)
    if true_ca.shape != pred_ca.shape or true_ca.ndim != 2 or true_ca.shape[-1] != 3:
        raise ValueError(
            f"true_ca and pred_ca must both be (L, 3); got {true_ca.shape} and {pred_ca.shape}"
        )
    fig = plt.figure(figsize=(12, 7.5), layout="constrained")  # no overlapping labels
    grid = fig.add_gridspec(2, 6, height_ratios=(1, 1))
    trace_axes = [fig.add_subplot(grid[0, 0:2]), fig.add_subplot(grid[0, 2:4])]
    error_ax = fig.add_subplot(grid[0, 4:6])
    map_axes = [fig.add_subplot(grid[1, 0:3]), fig.add_subplot(grid[1, 3:6])]

    for ax, (i, j), name in zip(trace_axes, ((0, 1), (0, 2)), PANEL_TITLES[:2], strict=True):
        ax.plot(true_ca[:, i], true_ca[:, j], "-o", ms=2, lw=1, color=INPUT_COLOR, label="input")
        ax.plot(
            pred_ca[:, i], pred_ca[:, j], "-o", ms=2, lw=1, color=RECON_COLOR,
            label="reconstruction",
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x (Å)")
        ax.set_ylabel("xyz"[j] + " (Å)")
        ax.set_aspect("equal", adjustable="datalim")
    trace_axes[0].legend(fontsize=7, loc="best")

    error = np.linalg.norm(pred_ca - true_ca, axis=-1)
    error_ax.plot(np.arange(len(error)), error, color="tab:red", lw=1)
    error_ax.set_title(PANEL_TITLES[2], fontsize=9)
    error_ax.set_xlabel("residue")
    error_ax.set_ylabel("CA distance after superposition (Å)", fontsize=8)
    error_ax.set_ylim(bottom=0.0)

    maps = [_distance_map(true_ca), _distance_map(pred_ca)]
    vmax = max(float(m.max()) for m in maps) or 1.0
    image = None
    for ax, dist, name in zip(map_axes, maps, PANEL_TITLES[3:], strict=True):
        image = ax.imshow(dist, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("residue")
        ax.set_ylabel("residue")
    fig.colorbar(image, ax=map_axes, label="Å", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return fig


def _principal_frame(ca: torch.Tensor) -> torch.Tensor:
    """Rotation putting the chain's largest spread on x, the next on y (projections show most)."""
    centred = ca - ca.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    if torch.linalg.det(vh) < 0:  # a rotation, not a mirror: keep the chain's handedness
        vh = vh * torch.tensor([1.0, 1.0, -1.0], dtype=vh.dtype)[:, None]
    return vh


def chain_figure(name: str, pred: torch.Tensor, true: torch.Tensor) -> plt.Figure:
    """The picture of one chain from backbones ``pred``, ``true`` (L, 3, 3) N/CA/C.

    Only residues with a full backbone may be passed (the caller drops masked ones). The
    reconstruction is superposed onto the input on all backbone atoms, as for the RMSD; the
    title carries the chain's backbone RMSD, CA-lDDT and CA TM-score.
    """
    pred = pred.detach().double().cpu()
    true = true.detach().double().cpu()
    mask = torch.ones(1, true.shape[0], dtype=torch.bool)
    rmsd = float(backbone_rmsd(pred[None], true[None], mask)[0])
    lddt = float(lddt_ca(pred[None, :, 1], true[None, :, 1], mask)[0])
    tm = float(tm_score_ca(pred[None, :, 1], true[None, :, 1], mask)[0])
    rot, trans = kabsch(pred.reshape(1, -1, 3), true.reshape(1, -1, 3))
    moved_ca = pred[:, 1] @ rot[0].T + trans[0]
    true_ca = true[:, 1]
    centre = true_ca.mean(0)
    frame = _principal_frame(true_ca)
    true_ca = (true_ca - centre) @ frame.T
    moved_ca = (moved_ca - centre) @ frame.T
    title = f"{name}: RMSD {rmsd:.2f} Å, lDDT {lddt:.3f}, TM-score {tm:.3f} ({len(true_ca)} res.)"
    return structure_figure(true_ca.numpy(), moved_ca.numpy(), title)
