"""Reconstruction metrics of the validation loop, as torchmetrics (reduced across DDP ranks).

- PSNR: per-image PSNR on [0, 1] images rounded to 8 bits (what a saved PNG holds), averaged
  over images (not the PSNR of the set's pooled MSE).
- SSIM: torchmetrics SSIM on [0, 1] images with ``data_range=1.0``. (LlamaGen's evaluation
  passes ``data_range=2.0`` for [0, 1] images, which inflates SSIM; provq does not.)
- LPIPS: VGG LPIPS (``pretrained.build_lpips``), mean over images.
- rFID: torchmetrics' FID over the FID Inception-V3 (``pretrained.build_fid_inception``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image import StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from provq_lightning.image.pretrained import build_fid_inception, build_lpips
from provq_lightning.image.transforms import to_unit_range


def quantize_8bit(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats rounded to the 256 levels of an 8-bit image."""
    return (unit * 255.0).round() / 255.0


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image pair of [0, 1] batches; (B,)."""
    return peak_signal_noise_ratio(
        pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


class ReconstructionMetrics(nn.Module):
    """PSNR, SSIM, optional LPIPS and rFID over a whole evaluation set.

    ``lpips_net`` and ``fid_net`` are the frozen pretrained networks (or None to skip them);
    they are held outside ``state_dict`` by the owner, so checkpoints stay small.
    """

    def __init__(self, lpips_net: nn.Module | None, fid_net: nn.Module | None) -> None:
        super().__init__()
        self.psnr = MeanMetric()
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.lpips = MeanMetric() if lpips_net is not None else None
        self.fid = (
            FrechetInceptionDistance(feature=fid_net, reset_real_features=True)
            if fid_net is not None
            else None
        )
        self._lpips_net = [lpips_net]  # a list hides it from nn.Module registration

    @torch.no_grad()
    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of model-range ([-1, 1]) reconstructions and originals."""
        with torch.autocast(device_type=recon.device.type, enabled=False):
            pred = quantize_8bit(to_unit_range(recon))
            real = quantize_8bit(to_unit_range(target))
            self.psnr.update(psnr_per_image(pred, real))
            self.ssim.update(pred, real)
            if self.lpips is not None:
                net = self._lpips_net[0]
                self.lpips.update(net(pred * 2 - 1, real * 2 - 1).flatten())
            if self.fid is not None:
                self.fid.update(real, real=True)
                self.fid.update(pred, real=False)

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/psnr": self.psnr.compute(), f"{prefix}/ssim": self.ssim.compute()}
        if self.lpips is not None:
            out[f"{prefix}/lpips"] = self.lpips.compute()
        if self.fid is not None:
            out[f"{prefix}/rfid"] = self.fid.compute()
        return out

    def reset(self) -> None:
        for metric in (self.psnr, self.ssim, self.lpips, self.fid):
            if metric is not None:
                metric.reset()


def frozen_nets(hp: Any) -> dict[str, Any]:
    """The frozen pretrained nets an ``ImageTokenizer`` with hyperparameters ``hp`` needs:
    ``lpips`` (loss and/or evaluation; absent when neither uses it) and ``metrics`` (its
    ``ReconstructionMetrics``). Missing weights fail here, at the start of a run."""
    nets: dict[str, Any] = {}
    if hp.lpips_weight > 0 or hp.eval_lpips:
        hint = "model.init_args.lpips_weight: 0 and eval_lpips: false"
        nets["lpips"] = build_lpips(hp.lpips_vgg_path, hint)
    fid = None
    if hp.eval_fid:
        fid = build_fid_inception(hp.fid_inception_path, "model.init_args.eval_fid: false")
    nets["metrics"] = ReconstructionMetrics(nets.get("lpips") if hp.eval_lpips else None, fid)
    return nets
