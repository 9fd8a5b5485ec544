"""The convolutional encoder/decoder of LlamaGen's VQ-16 tokenizer (a VQGAN), sizes configurable.

Encoder: 3x3 conv in, then per level ``num_res_blocks`` residual blocks (self-attention after
each one at the lowest resolution) and a stride-2 downsample on all but the last level, a
middle block (res, attention, res), GroupNorm + SiLU + 3x3 conv out to ``z_channels``.
Decoder: the mirror image with ``num_res_blocks + 1`` blocks per level and nearest-neighbour
upsampling. ``ch_mult=(1, 1, 2, 2, 4)`` gives LlamaGen's 16x downsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right/bottom only, so an even size halves exactly (taming-transformers' choice).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        c_in = ch
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.blocks.append(ResBlock(c_in, c_out, norm_groups, dropout))
                c_in = c_out
                if i == last:
                    level.attn.append(AttnBlock(c_in, norm_groups))
            level.down = Downsample(c_in) if i != last else nn.Identity()
            self.levels.append(level)
        self.mid = nn.Sequential(
            ResBlock(c_in, c_in, norm_groups, dropout),
            AttnBlock(c_in, norm_groups),
            ResBlock(c_in, c_in, norm_groups, dropout),
        )
        self.norm_out = group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for i, block in enumerate(level.blocks):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            h = level.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(c_in, c_in, norm_groups, dropout),
            AttnBlock(c_in, norm_groups),
            ResBlock(c_in, c_in, norm_groups, dropout),
        )
        self.levels = nn.ModuleList()
        for i, mult in enumerate(reversed(ch_mult)):
            c_out = ch * mult
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(ResBlock(c_in, c_out, norm_groups, dropout))
                c_in = c_out
                if i == 0:
                    level.attn.append(AttnBlock(c_in, norm_groups))
            level.up = Upsample(c_in) if i != len(ch_mult) - 1 else nn.Identity()
            self.levels.append(level)
        self.norm_out = group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for i, block in enumerate(level.blocks):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The output conv's weight (for the adaptive adversarial weight)."""
        return self.conv_out.weight
