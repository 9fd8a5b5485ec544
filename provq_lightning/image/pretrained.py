"""Pretrained networks for LPIPS and rFID, loaded only from local files.

Nothing here downloads. A weight file is looked up at the path given in the config, else in
the torch hub cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``); when it is
missing the error names the exact path to put it at. Random weights are never substituted.

- LPIPS (the ``lpips`` package, VGG16 variant): the VGG16 trunk comes from torchvision's
  ImageNet checkpoint ``vgg16-397923af.pth``; the calibrated linear layers ship inside the
  ``lpips`` package itself (``lpips/weights/v0.1/vgg.pth``).
- rFID: the FID Inception-V3 (TF 2015-12-05 graph ported to PyTorch) in
  ``pt_inception-2015-12-05-6726825d.pth``, the file pytorch-fid uses. It is built from
  torchvision's Inception3 with the FID graph's pooling, and fed to torchmetrics' FID.
"""

from __future__ import annotations

import os
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.inception import InceptionE

from provq_lightning.runs.safe_load import load_weights_only

VGG16_FILE = "vgg16-397923af.pth"
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
LPIPS_VGG_SLICES = (range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30))


class MissingWeights(FileNotFoundError):
    """A pretrained weight file is not on disk."""


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's own rule, read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_weights(path: str | os.PathLike | None, filename: str, what: str, disable: str) -> Path:
    """The configured file, else ``<hub>/checkpoints/<filename>``; fail naming where it goes."""
    candidate = Path(path).expanduser() if path else hub_checkpoint_dir() / filename
    if candidate.is_file():
        return candidate
    raise MissingWeights(
        f"{what} needs pretrained weights that cannot be downloaded here; expected {candidate}. "
        f"Copy {filename} there (or set TORCH_HOME / the config path to a folder that has it), "
        f"or turn it off with {disable}."
    )


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = load_weights_only(path, "pretrained weights file")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


# -- LPIPS --------------------------------------------------------------------------------
def build_lpips(vgg_path: str | None = None, disable_hint: str = "lpips_weight: 0") -> lpips.LPIPS:
    """The lpips package's VGG LPIPS with the trunk loaded from a local VGG16 checkpoint.

    Frozen and in eval mode; inputs are images in [-1, 1].
    """
    path = locate_weights(vgg_path, VGG16_FILE, "LPIPS (VGG16 trunk)", disable_hint)
    # pnet_rand=True only stops lpips from downloading the trunk; it is overwritten right below.
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    load_vgg_trunk(model, _load_state(path), path)
    model.eval().requires_grad_(False)
    return model


def load_vgg_trunk(model: lpips.LPIPS, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy torchvision VGG16 ``features.*`` weights into the lpips slices, all or nothing."""
    mapped = {}
    for s, layers in enumerate(LPIPS_VGG_SLICES, start=1):
        for i in layers:
            for kind in ("weight", "bias"):
                key = f"features.{i}.{kind}"
                if key in state:
                    mapped[f"slice{s}.{i}.{kind}"] = state[key]
    expected = set(model.net.state_dict())
    missing = expected - set(mapped)
    if missing:
        raise ValueError(
            f"{path} is not a torchvision VGG16 checkpoint: missing {sorted(missing)[:4]} "
            f"(expected keys like features.0.weight)"
        )
    model.net.load_state_dict(mapped, strict=True)


# -- FID Inception ------------------------------------------------------------------------
def _no_pad_count_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """Turn the block's 3x3 average pool (padding counted) into one that ignores padding.

    torchvision's blocks average with ``count_include_pad=True``; the FID graph does not. Both
    share the window sum, so rescale by 9 / (number of real pixels in each window).
    """
    (x,) = args
    ones = torch.ones(1, 1, *x.shape[-2:], dtype=x.dtype, device=x.device)
    counts = F.avg_pool2d(ones, 3, stride=1, padding=1, count_include_pad=True) * 9.0
    return (x * (9.0 / counts),)


class _MaxPoolInceptionE(InceptionE):
    """The FID graph's last block pools with a 3x3 max instead of an average."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        branch_pool = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        return [branch1x1, branch3x3, branch3x3dbl, branch_pool]


class FIDInception(nn.Module):
    """2048-d pool features of the FID Inception-V3 for images in [0, 1] (B, 3, H, W).

    Images are resized to 299x299 (bilinear) and mapped to [-1, 1] inside, as pytorch-fid does.
    """

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=1008, init_weights=False
        )
        net.Mixed_7c = _MaxPoolInceptionE(2048)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7b"):
            getattr(net, name).branch_pool.register_forward_pre_hook(_no_pad_count_hook)
        net.fc = nn.Identity()
        net.dropout = nn.Identity()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The weights' dtype, not always float32: the parity test runs the net in float64.
        x = images.to(self.net.Conv2d_1a_3x3.conv.weight.dtype)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        return self.net._forward(x)[0]  # after global pooling; fc and dropout are identities


def build_fid_inception(path: str | None = None, disable_hint: str = "fid: false") -> FIDInception:
    """FID Inception loaded from a local ``pt_inception-2015-12-05-6726825d.pth``."""
    file = locate_weights(path, FID_INCEPTION_FILE, "rFID (FID Inception-V3)", disable_hint)
    model = FIDInception()
    state = {k: v for k, v in _load_state(file).items() if not k.startswith(("fc.", "AuxLogits."))}
    result = model.net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{file} does not match the FID Inception-V3: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    model.eval().requires_grad_(False)
    return model
