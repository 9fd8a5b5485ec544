"""ESM3's structure decoder as a provq decoder: codes -> backbone frames, distogram logits.

The network of ESM3's ``StructureTokenDecoder`` (``esm/models/vqvae.py``), with its parameter
names so that its weights load by name (``protein/esm3.py``): pre-norm transformer blocks
(rotary attention with LayerNorm on queries and keys, SwiGLU feed-forward of width
``((8/3) d + 255) // 256 * 256``, no biases), a final LayerNorm, a frame head (two 3-vectors
and a translation, Gram-Schmidt) placing ESM3's ideal N, CA, C, and a pairwise head whose first
64 of 224 outputs are the C-beta distogram (the rest: direction bins and predicted aligned
error). ESM3's pLDDT head is not built (provq trains no confidence).

Two inputs:

- vectors (``tokens=False``, StructTokenBench): ``post_vq_proj``, a linear map of the quantized
  latents, so the decoder trains end to end with the encoder. Residues without a code are masked
  as attention keys (StructTokenBench drops them from the chain instead; chains without missing
  residues decode identically).
- token ids (``tokens=True``, ESM3's released decoder): ``embed``, a table of 4096 codes and 5
  special tokens (mask, end, start, padding, chain break); a chain is read as start, its codes
  (mask where a residue has none), end, as ESM3 decodes. Ids carry no gradient, so this decoder
  decodes but does not train with the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from provq_lightning.protein.decoder import DecoderOutput
from provq_lightning.protein.encoder import SwiGLU
from provq_lightning.protein.geometry import gram_schmidt

# ESM3's token table: codes 0..4095, then its special tokens.
TOKEN_CODES = 4096
MASK_TOKEN, EOS_TOKEN, BOS_TOKEN, PAD_TOKEN = 4096, 4097, 4098, 4099
TOKEN_TABLE = TOKEN_CODES + 5
# Output bins of ESM3's pairwise head: distogram, 6 x 16 direction bins, aligned error.
PAIRWISE_BINS = (64, 96, 64)
# N, CA, C in a residue's frame as ESM3's frame head places them (Angstrom).
ESM3_BACKBONE = torch.tensor([[0.5256, 1.3612, 0.0], [0.0, 0.0, 0.0], [-1.5251, 0.0, 0.0]])


def swiglu_hidden_esm3(dim: int) -> int:
    """ESM3's decoder feed-forward width: (8/3) x dim rounded up to a multiple of 256."""
    return int((8 / 3 * dim + 255) // 256 * 256)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding that pairs channel ``c`` with ``c + D/2`` (x: B, L, H, D)."""
    a, b = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rotary_angles(n: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Self-attention with LayerNorm on queries and keys and rotary positions."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"decoder dim {dim} must split into {heads} heads of even size")
        self.heads = heads
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim, bias=False))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.q_ln = nn.LayerNorm(dim, bias=False)
        self.k_ln = nn.LayerNorm(dim, bias=False)

    def forward(self, x, cos, sin, attn_mask):
        b, n, d = x.shape
        q, k, v = self.layernorm_qkv(x).chunk(3, dim=-1)
        q, k = self.q_ln(q).to(x.dtype), self.k_ln(k).to(x.dtype)
        q, k, v = (t.view(b, n, self.heads, -1) for t in (q, k, v))
        q = rotate_halves(q, cos.to(q.dtype), sin.to(q.dtype))
        k = rotate_halves(k, cos.to(k.dtype), sin.to(k.dtype))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        hidden = swiglu_hidden_esm3(dim)
        self.attn = Attention(dim, heads)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, 2 * hidden, bias=False),
            SwiGLU(),
            nn.Linear(hidden, dim, bias=False),
        )

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.attn(x, cos, sin, attn_mask)
        return x + self.ffn(x)


class Stack(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, bias=False)

    def forward(self, x, attn_mask):
        cos, sin = rotary_angles(x.shape[1], self.head_dim, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        return self.norm(x)


class FrameHead(nn.Module):
    """Per residue: a translation (x 10 A) and two directions -> a frame -> ideal N, CA, C."""

    def __init__(self, dim: int, trans_scale: float = 10.0) -> None:
        super().__init__()
        self.ffn1 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        # 9 frame numbers and 14 torsion outputs ESM3 does not use for the backbone.
        self.proj = nn.Linear(dim, 9 + 14)
        self.trans_scale = trans_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm(F.gelu(self.ffn1(x)))
        trans, ax, ay = self.proj(h)[..., :9].split(3, dim=-1)
        trans = trans * self.trans_scale
        ax = ax / (ax.norm(dim=-1, keepdim=True) + 1e-5)
        ay = ay / (ay.norm(dim=-1, keepdim=True) + 1e-5)
        # ESM3 builds the frame from the points trans + ax (on -x), trans, trans + ay: the same
        # differences, rounded the same way.
        rot = gram_schmidt(trans - (ax + trans), (ay + trans) - trans)
        local = ESM3_BACKBONE.to(x)
        backbone = torch.einsum("...ij,pj->...pi", rot, local) + trans.unsqueeze(-2)
        return backbone, rot, trans


class PairwiseHead(nn.Module):
    """Logits (B, L, L, 224) from products and differences of projected residue features."""

    def __init__(self, dim: int, pair_dim: int) -> None:
        super().__init__()
        self.downproject = nn.Linear(dim, pair_dim, bias=False)
        self.linear1 = nn.Linear(pair_dim, pair_dim, bias=False)
        self.norm = nn.LayerNorm(pair_dim)
        self.linear2 = nn.Linear(pair_dim, sum(PAIRWISE_BINS), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.downproject(x).chunk(2, dim=-1)
        # Entry (i, j) pairs key i with query j, as ESM3 orders it.
        pair = torch.cat([q[:, None] * k[:, :, None], q[:, None] - k[:, :, None]], dim=-1)
        return self.linear2(self.norm(F.gelu(self.linear1(pair))))


class ESM3StructureDecoder(nn.Module):
    """Codes (B, L, code_dim) or code ids -> ``DecoderOutput`` (see the module docstring).

    Args:
        code_dim: dimension of the quantized latents (vector input).
        dim, heads, layers: transformer width, heads, depth (ESM3 1280, 20, 30).
        pair_dim: width of the pairwise head (ESM3 128).
        tokens: read code ids through ESM3's token table instead of the latents.
    """

    def __init__(
        self,
        code_dim: int,
        dim: int,
        heads: int,
        layers: int,
        pair_dim: int = 128,
        tokens: bool = False,
    ) -> None:
        super().__init__()
        self.tokens = tokens
        if tokens:
            self.embed = nn.Embedding(TOKEN_TABLE, dim)
        else:
            self.post_vq_proj = nn.Linear(code_dim, dim)
        self.decoder_stack = Stack(dim, heads, layers)
        self.affine_output_projection = FrameHead(dim)
        self.pairwise_classification_head = PairwiseHead(dim, pair_dim)

    def token_input(
        self, codes: torch.Tensor, residue_mask: torch.Tensor, pad_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) code ids -> (B, L + 2) tokens: start, codes (mask where a residue has none),
        end after each chain's last position, padding after it."""
        b, n = codes.shape
        body = torch.where(residue_mask, codes, torch.full_like(codes, MASK_TOKEN))
        out = torch.full((b, n + 2), PAD_TOKEN, dtype=torch.long, device=codes.device)
        out[:, 0] = BOS_TOKEN
        out[:, 1:-1] = torch.where(pad_mask, body, torch.full_like(body, PAD_TOKEN))
        out[torch.arange(b, device=codes.device), pad_mask.sum(-1) + 1] = EOS_TOKEN
        return out

    def forward(
        self,
        z: torch.Tensor,
        residue_mask: torch.Tensor,
        pad_mask: torch.Tensor,
        with_distogram: bool = True,
        codes: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """``residue_mask`` (B, L): residues that have a code; ``pad_mask``: real positions;
        ``codes`` (B, L): the code ids, needed with ``tokens``."""
        n = residue_mask.shape[1]
        if self.tokens:
            if codes is None:
                raise ValueError("this decoder reads code ids (ESM3's token table); pass codes")
            ids = self.token_input(codes.long(), residue_mask, pad_mask)
            x = self.embed(ids)
            # Start, the chain's positions and its end; not the padding after it.
            ends = pad_mask.sum(-1, keepdim=True) + 1
            keys = torch.arange(n + 2, device=ids.device)[None] <= ends
        else:
            x = self.post_vq_proj(z)
            keys = residue_mask & pad_mask
        # Every position attends to itself too, so a row without any valid key stays finite.
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        attn_mask = (keys[:, None, :] | eye)[:, None]
        x = self.decoder_stack(x, attn_mask)
        if self.tokens:
            x = x[:, 1 : n + 1]  # drop start and end (end sits at n + 1 only in a full row)
        logits = None
        if with_distogram:
            logits = self.pairwise_classification_head(x)[..., : PAIRWISE_BINS[0]]
        # Frames in float32 even under bf16 autocast (bf16 would cost ~0.1 A per coordinate).
        with torch.autocast(x.device.type, enabled=False):
            backbone, rot, trans = self.affine_output_projection(x.float())
        return DecoderOutput(backbone, rot, trans, logits)
