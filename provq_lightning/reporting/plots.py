"""Figures people look at instead of reading numbers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def embedding_figure(
    latents: torch.Tensor,
    labels: torch.Tensor,
    codebook: torch.Tensor,
    title: str = "",
    names: dict[int, str] | None = None,
    ax: plt.Axes | None = None,
) -> plt.Figure:
    """Encoder embeddings coloured by component, with the codebook as black crosses.

    Only the first two latent dimensions are drawn.
    """
    names = names or {0: "disk", 1: "triangle"}
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    else:
        fig = ax.figure
    for label, name in names.items():
        sel = labels == label
        ax.scatter(
            latents[sel, 0],
            latents[sel, 1],
            s=6,
            alpha=0.6,
            color=COLORS[label % len(COLORS)],
            label=f"{name} embeddings",
        )
    ax.scatter(codebook[:, 0], codebook[:, 1], marker="x", s=40, color="black", label="codes")
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    # Below the axes: inside, it hides part of the embeddings whichever corner it takes.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def counts_figure(counts: torch.Tensor, title: str = "", ylabel: str = "uses") -> plt.Figure:
    """A bar per bin (e.g. uses per code): dead and over-used codes show at a glance."""
    counts = counts.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(counts)), counts.numpy(), width=1.0, color="tab:blue")
    ax.set_xlabel("code")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.5, len(counts) - 0.5)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_pixels(fig: plt.Figure) -> np.ndarray:
    """The figure rendered as an (H, W, 3) uint8 array."""
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def close_figure(fig: plt.Figure) -> None:
    """Free a figure pyplot still tracks (every figure made by ``plt.subplots`` is)."""
    plt.close(fig)
