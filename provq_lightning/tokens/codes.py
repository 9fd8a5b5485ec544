"""The range check every ``decode_codes`` runs before it looks code ids up in a codebook."""

from __future__ import annotations

import torch


def check_codes(codes: torch.Tensor, num_codes: int, missing: int | None = None) -> None:
    """Refuse code ids a codebook of ``num_codes`` entries cannot decode (``ValueError``).

    ``missing``: the id a modality writes where an item has no code (proteins: ``-1`` for a
    residue without a backbone frame), allowed besides ``[0, num_codes)``; such a modality
    decodes token sequences, so an empty one is refused on its own.
    """
    if missing is not None and codes.numel() == 0:
        raise ValueError("cannot decode an empty token sequence")
    lowest = 0 if missing is None else missing
    if codes.numel() == 0 or int(codes.min()) < lowest or int(codes.max()) >= num_codes:
        if missing is None:
            raise ValueError(
                f"code ids must lie in [0, {num_codes}); got shape {tuple(codes.shape)}"
            )
        raise ValueError(f"token ids must lie in [0, {num_codes}) or be {missing}")
