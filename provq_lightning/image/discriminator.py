"""PatchGAN discriminator (pix2pix's N-layer net, as LlamaGen uses it) and GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Conv net giving one real/fake logit per overlapping patch.

    ``n_layers`` stride-2 4x4 convs after the first, channels doubling up to 8x ``ndf``, then a
    stride-1 conv and a 1-channel conv; BatchNorm between (``norm="group"`` for tiny batches).
    """

    def __init__(
        self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()

        def make_norm(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c // 4) or 1, c)
            raise ValueError(f"unknown discriminator norm {norm!r}; use 'batch' or 'group'")

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                make_norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation, as pix2pix/taming use for this net.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(D(x_hat))."""
    return -logits_fake.mean()


def adaptive_weight(
    recon_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight=1e4
) -> torch.Tensor:
    """Taming's balance: ||grad recon|| / ||grad gan|| at the decoder's last layer (detached)."""
    g_rec = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.norm() / (g_gan.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
