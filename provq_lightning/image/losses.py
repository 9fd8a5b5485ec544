"""``VQGANLoss``: the image tokenizer's losses, one module as LlamaGen's ``VQLoss`` and taming's
``VQLPIPSWithDiscriminator`` are.

Generator: ``pixel_weight`` x pixel L2 + ``lpips_weight`` x LPIPS + the (curriculum-weighted)
VQ loss handed in, plus ``disc_weight`` x the PatchGAN hinge term once the discriminator is
active (optionally scaled by taming's adaptive weight). Discriminator: the hinge loss on
detached images. ``disc_active`` says when the GAN trains: ``disc_start`` steps after step 0
(``disc_start_from: run``) or after the first step that quantized (``quantization``).

The module owns the discriminator, so its weights are ``loss.discriminator.*`` in checkpoints
(``provq_lightning.runs.migrations`` moves the top-level ``discriminator.*`` of earlier ones). The
LPIPS net is frozen and kept out of checkpoints by the tokenizer, which hands it to each call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from provq_lightning.image.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from provq_lightning.tokenizer import zero_weight_term

DISC_START_FROM = ("run", "quantization")


class Losses(NamedTuple):
    generator: torch.Tensor  # what the generator minimises (VQ loss included)
    discriminator: torch.Tensor  # what the discriminator minimises (a zero-weight term if idle)
    terms: dict[str, torch.Tensor]  # detached parts, for logging


class VQGANLoss(nn.Module):
    """Pixel L2 + LPIPS + VQ + PatchGAN losses; arguments as ``ImageTokenizer``'s same names."""

    def __init__(
        self,
        pixel_weight: float = 1.0,
        lpips_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_start: int = 20000,
        disc_start_from: str = "run",
        adaptive_disc_weight: bool = False,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "batch",
    ) -> None:
        super().__init__()
        if disc_start_from not in DISC_START_FROM:
            raise ValueError(f"model.init_args.disc_start_from: {disc_start_from!r} is not "
                             f"allowed; use one of {', '.join(DISC_START_FROM)}")
        self.pixel_weight, self.lpips_weight = pixel_weight, lpips_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.disc_start_from, self.adaptive = disc_start_from, adaptive_disc_weight
        self.discriminator = (
            PatchDiscriminator(3, disc_ndf, disc_layers, disc_norm) if disc_weight > 0 else None
        )

    def disc_active(self, step: int, quantization_start: int) -> bool:
        """Whether the GAN trains at optimizer step ``step`` (``quantization_start``: the first
        step that quantized, -1 before)."""
        if self.discriminator is None:
            return False
        if self.disc_start_from == "run":
            return step >= self.disc_start
        return quantization_start >= 0 and step >= quantization_start + self.disc_start

    def forward(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        vq_loss: torch.Tensor,
        *,
        disc_active: bool,
        lpips: nn.Module | None,
        last_layer: torch.Tensor,
    ) -> Losses:
        """Both nets' losses for model-range ``images`` and their reconstructions ``recon``;
        ``vq_loss`` already carries its curriculum weight; ``last_layer``: the decoder's output
        weight (for the adaptive GAN weight)."""
        pixel = F.mse_loss(recon.float(), images.float())
        perceptual = lpips(recon, images).mean() if self.lpips_weight > 0 else recon.new_zeros(())
        nll = self.pixel_weight * pixel + self.lpips_weight * perceptual
        loss = nll + vq_loss
        gan = weight = d_loss = images.new_zeros(())
        if disc_active:
            self.discriminator.requires_grad_(False)  # the GAN term trains the generator only
            gan = hinge_g_loss(self.discriminator(recon))
            weight = images.new_ones(())
            if self.adaptive:
                weight = adaptive_weight(nll, gan, last_layer)
            loss = loss + self.disc_weight * weight * gan
            self.discriminator.requires_grad_(True)
            # Detached images: this loss trains the discriminator only.
            logits_real = self.discriminator(images.detach())
            logits_fake = self.discriminator(recon.detach())
            d_loss = self.disc_weight * hinge_d_loss(logits_real, logits_fake)
        # A waiting discriminator still joins the backward (zero weight): plain DDP sees it used.
        waiting = self.discriminator is not None and not disc_active
        d_total = zero_weight_term(self.discriminator) if waiting else d_loss
        terms = {"pixel_l2": pixel, "lpips": perceptual, "gan_g": gan, "gan_weight": weight,
                 "gan_d": d_loss}
        return Losses(loss, d_total, {k: v.detach() for k, v in terms.items()})

