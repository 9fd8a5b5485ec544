"""``GeneratorEMA``: an exponential moving average of the generator's weights.

It holds a frozen copy of each live module under the live module's name, so checkpoints carry
it as ``ema.<name>.*`` (``ema.encoder.conv_in.weight``, ...). The owner passes the live modules
(an ``nn.ModuleDict`` with the same names) to each call: ``update`` after every optimizer step,
``swap`` before and after evaluation (evaluation sees the EMA weights), ``restart`` when the
live weights jumped (k-means replaced the codebook, a checkpoint was imported).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA(nn.Module):
    """EMA of ``live``'s state: floats move by ``(1 - decay)`` per update, the rest is copied."""

    def __init__(self, live: nn.ModuleDict, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.init_args.ema_decay: {decay} is not allowed; use a value "
                             "in (0, 1), e.g. 0.9999, or null for no EMA")
        for name, module in copy.deepcopy(live).items():
            self.add_module(name, module)
        self.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, live: nn.ModuleDict) -> None:
        """One step toward the live weights."""
        current = live.state_dict()
        for name, value in self.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(current[name], 1.0 - self.decay)
            else:
                value.copy_(current[name])

    @torch.no_grad()
    def restart(self, live: nn.ModuleDict) -> None:
        """Start again from the live weights."""
        self.load_state_dict(live.state_dict())

    @torch.no_grad()
    def swap(self, live: nn.ModuleDict) -> None:
        """Exchange live and EMA weights (twice restores both)."""
        current = live.state_dict()
        for name, value in self.state_dict().items():
            kept = current[name].clone()
            current[name].copy_(value)
            value.copy_(kept)
