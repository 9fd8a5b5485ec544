"""Decoder that composes local geometry: codes -> per-residue CA internal coordinates
(theta, tau as unit vectors) -> CA trace by differentiable NeRF -> N and C placed from offsets
predicted in each residue's CA-trace frame.

lDDT is mostly local, and a chain built from good local angles gets local distances right by
construction; a head regressing absolute frames has to learn that path integration itself.
The trunk is a stack of residual 1-D convolutions (``conv``, local by design) or the rotary
transformer of ``decoder.py`` (``transformer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from provq_lightning.protein.decoder import RotaryBlock, rotary_tables
from provq_lightning.protein.internal import nerf_ca, place_n_c
from provq_lightning.protein.local_encoder import ConvBlock

TRUNKS = ("conv", "transformer")
# N and C of a residue in its CA-trace frame (x along CA(i-1)->CA(i+1), y the outward
# bisector), their mean over the shared sample training chains: the head starts from here.
MEAN_N_C_OFFSETS = ((-1.15, -0.80, 0.30), (1.22, -0.79, -0.01))


@dataclass
class InternalOutput:
    backbone: torch.Tensor  # (B, L, 3, 3) N, CA, C
    theta: torch.Tensor  # (B, L, 2) unnormalised (cos, sin) of the CA bond angle
    tau: torch.Tensor  # (B, L, 2) unnormalised (cos, sin) of the CA dihedral
    offsets: torch.Tensor  # (B, L, 2, 3) N, C in the CA-trace frames
    distogram_logits: None = None  # no pairwise head: the losses are local


class InternalCoordinateDecoder(nn.Module):
    """Codes (B, L, code_dim) -> internal coordinates and the backbone they build.

    Args:
        code_dim: dimension of the quantized latents.
        dim, layers: trunk width and depth; ``heads`` for the transformer trunk.
        trunk: ``conv`` (kernel ``kernel``, dilations cycling 1, 2, 4) or ``transformer``.
        angle_residual: > 0 (the encoder's ``angle_skip`` scale): the code's first 4 dimensions,
            divided by it, are the residue's (theta, tau) as the codebook holds them, and the
            head predicts a correction on top (zero at initialisation).
    """

    def __init__(
        self,
        code_dim: int = 32,
        dim: int = 64,
        layers: int = 4,
        trunk: str = "conv",
        heads: int = 4,
        kernel: int = 5,
        angle_residual: float = 0.0,
    ) -> None:
        super().__init__()
        self.angle_residual = angle_residual
        if trunk not in TRUNKS:
            raise ValueError(f"decoder trunk must be one of {TRUNKS}, got {trunk!r}")
        self.trunk = trunk
        self.inp = nn.Linear(code_dim, dim)
        self.missing = nn.Parameter(torch.zeros(dim))
        if trunk == "conv":
            self.blocks = nn.ModuleList(
                ConvBlock(dim, kernel, dilation=(1, 2, 4)[i % 3]) for i in range(layers)
            )
        else:
            self.blocks = nn.ModuleList(RotaryBlock(dim, heads) for _ in range(layers))
            self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.angle_head = nn.Linear(dim, 4)
        self.offset_head = nn.Linear(dim, 6)
        with torch.no_grad():
            self.offset_head.weight.mul_(0.1)
            self.offset_head.bias.copy_(torch.tensor(MEAN_N_C_OFFSETS).flatten())
            if angle_residual > 0:
                self.angle_head.weight.zero_()
                self.angle_head.bias.zero_()

    def forward(
        self,
        z: torch.Tensor,
        residue_mask: torch.Tensor,
        pad_mask: torch.Tensor,
        with_distogram: bool = True,
    ) -> InternalOutput:
        """``residue_mask`` (B, L): residues that have a code; ``pad_mask``: real positions.
        ``with_distogram`` is accepted for the frame decoder's signature and ignored."""
        x = self.inp(z)
        x = torch.where(residue_mask.unsqueeze(-1), x, self.missing.to(x.dtype))
        if self.trunk == "conv":
            for block in self.blocks:
                x = block(x, pad_mask)
        else:
            cos, sin = rotary_tables(x.shape[1], self.head_dim, x.device, x.dtype)
            for block in self.blocks:
                x = block(x, cos, sin, pad_mask)
        x = self.norm(x)
        # NeRF in float32 even under bf16 autocast: errors compound along the chain.
        with torch.autocast(x.device.type, enabled=False):
            h = x.float()
            angles = self.angle_head(h)
            if self.angle_residual > 0:
                angles = angles + z[..., :4].float() / self.angle_residual
            theta, tau = angles[..., :2], angles[..., 2:]
            offsets = self.offset_head(h).unflatten(-1, (2, 3))
            ca = nerf_ca(theta, tau)
            backbone = place_n_c(ca, offsets)
        return InternalOutput(backbone, theta, tau, offsets)
