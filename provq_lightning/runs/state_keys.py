"""Reading another project's state dict by its key names (LlamaGen, ESM3, StructTokenBench)."""

from __future__ import annotations

import torch

from provq_lightning.errors import ProvqError


def required_tensor(state: dict[str, torch.Tensor], key: str, source: str, kind: str) -> torch.Tensor:
    """``state[key]``, or one line saying ``source`` lacks it and so is not ``kind``."""
    if key not in state:
        raise ProvqError(f"{source} lacks {key}; it is not {kind}")
    return state[key]


def numbered_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many consecutive ``<prefix><i>.`` indices (0, 1, ...) the keys have: a layer count."""
    n = 0
    while any(key.startswith(f"{prefix}{n}.") for key in state):
        n += 1
    return n
