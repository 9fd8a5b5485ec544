"""A vector quantizer usable by any tokenizer, with ProVQ's soft mixing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from provq_lightning.vq.revival import CodeRevival
from provq_lightning.vq.search import DEFAULT_MAX_CHUNK_BYTES, nearest_code


@dataclass
class QuantizerOutput:
    """What a tokenizer needs from one quantizer call.

    ``z_tilde`` is what the decoder consumes (``alpha * z + (1 - alpha) * z_q``), ``z_q`` the
    straight-through quantized latents, ``indices`` the code ids (``None`` when bypassed),
    ``loss`` = ``codebook_loss + beta * commit_loss`` (zero when bypassed).
    """

    z_tilde: torch.Tensor
    z_q: torch.Tensor
    indices: torch.Tensor | None
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    loss: torch.Tensor


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    sq = (a - b).pow(2).mean(dim=-1)
    if mask is None:
        return sq.mean()
    weights = mask.to(sq.dtype)
    return (sq * weights).sum() / weights.sum().clamp_min(1.0)


class VectorQuantizer(nn.Module):
    """Codebook of ``num_codes`` x ``code_dim`` with nearest-code assignment.

    Args:
        num_codes: K, the number of codes.
        code_dim: D, the latent dimension the codes live in.
        beta: weight of the commitment loss.
        l2_normalize: normalise codes and inputs to the unit sphere before the search
            (LlamaGen's ``codebook_l2_norm``); the decoder then sees unit vectors too.
        linear_codebook: effective codes are ``Linear(C)`` of a base codebook ``C``
            (SimVQ, AminoAseed).
        freeze_base_codebook: with ``linear_codebook``, keep ``C`` fixed and learn only the map.
        init: ``"uniform"`` (+-1/K, the VQ-VAE/LlamaGen default) or ``"normal"`` (unit Gaussian).
        max_chunk_bytes: memory bound of one distance block during the search.
        dead_code_threshold: > 0 revives, at each training step that quantizes, codes whose use
            average is below this fraction of the mean (see ``vq.revival``); 0: off.
        dead_code_decay: decay of that use average per step.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        l2_normalize: bool = False,
        linear_codebook: bool = False,
        freeze_base_codebook: bool = False,
        init: str = "uniform",
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        dead_code_threshold: float = 0.0,
        dead_code_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(
                f"num_codes and code_dim must be positive, got {num_codes}, {code_dim}"
            )
        if freeze_base_codebook and not linear_codebook:
            raise ValueError("freeze_base_codebook=True needs linear_codebook=True")
        if dead_code_threshold and linear_codebook:
            # A revived code is written as a latent; Linear(C) would need the map's inverse.
            raise ValueError(
                "dead_code_threshold needs a plain codebook; set it to 0 with linear_codebook"
            )
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.max_chunk_bytes = max_chunk_bytes
        self.embedding = nn.Embedding(num_codes, code_dim)
        if init == "uniform":
            nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        elif init == "normal":
            nn.init.normal_(self.embedding.weight)
        else:
            raise ValueError(f"unknown codebook init {init!r}; use 'uniform' or 'normal'")
        self.projection = nn.Linear(code_dim, code_dim) if linear_codebook else None
        if freeze_base_codebook:
            self.embedding.weight.requires_grad_(False)
        # Registered only when on, so checkpoints of codebooks without revival load unchanged.
        self.revival = (
            CodeRevival(num_codes, dead_code_threshold, dead_code_decay)
            if dead_code_threshold > 0
            else None
        )

    def codebook(self) -> torch.Tensor:
        """The effective codes (K x D) that inputs are compared with."""
        codes = self.embedding.weight
        if self.projection is not None:
            codes = self.projection(codes)
        if self.l2_normalize:
            codes = F.normalize(codes, dim=-1)
        return codes

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for an integer tensor of ids; shape ``indices.shape + (D,)``."""
        return F.embedding(indices, self.codebook())

    @torch.no_grad()
    def set_codebook(self, codes: torch.Tensor) -> None:
        """Make the effective codebook equal ``codes`` (K x D), e.g. k-means centres."""
        if codes.shape != (self.num_codes, self.code_dim):
            raise ValueError(
                f"codebook must be {(self.num_codes, self.code_dim)}, got {tuple(codes.shape)}"
            )
        self.embedding.weight.copy_(codes.to(self.embedding.weight))
        if self.projection is not None:
            # Identity map, so Linear(C) = C right after seeding.
            self.projection.weight.copy_(torch.eye(self.code_dim))
            self.projection.bias.zero_()
        if self.revival is not None:
            self.revival.reset()

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """The latent as the quantizer sees it (normalised when ``l2_normalize``)."""
        return F.normalize(z, dim=-1) if self.l2_normalize else z

    def forward(
        self,
        z: torch.Tensor,
        alpha: float = 0.0,
        mask: torch.Tensor | None = None,
        bypass: bool = False,
    ) -> QuantizerOutput:
        """Quantize ``z`` (..., D).

        ``alpha`` mixes the continuous latent back in (0 = hard VQ); ``mask`` (z.shape[:-1],
        True = real item) excludes padding from the losses; ``bypass`` skips quantization
        entirely (ProVQ's warmup).
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(
                f"expected latents with last dim {self.code_dim}, got {tuple(z.shape)}"
            )
        z = self.prepare(z)
        zero = z.new_zeros(())
        if bypass:
            return QuantizerOutput(z, z, None, zero, zero, zero)
        codes = self.codebook()
        flat = z.reshape(-1, self.code_dim)
        indices = nearest_code(flat, codes, self.max_chunk_bytes).view(z.shape[:-1])
        z_q = F.embedding(indices, codes).to(z.dtype)
        if self.training and self.revival is not None:
            real = mask.reshape(-1).bool() if mask is not None else slice(None)
            # .data: the move happens after this step's assignment and is not differentiated.
            self.revival.step(
                flat.detach()[real], indices.reshape(-1)[real], codes.detach(),
                self.embedding.weight.data,
            )
        codebook_loss = _masked_mse(z.detach(), z_q, mask)
        commit_loss = _masked_mse(z, z_q.detach(), mask)
        z_q_st = z + (z_q - z).detach()
        z_tilde = z_q_st if alpha == 0.0 else alpha * z + (1.0 - alpha) * z_q_st
        return QuantizerOutput(
            z_tilde=z_tilde,
            z_q=z_q_st,
            indices=indices,
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            loss=codebook_loss + self.beta * commit_loss,
        )
