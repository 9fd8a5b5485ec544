"""Checkpoint compatibility: every step that reads what an older provq wrote, in one place.

Every checkpoint provq writes carries its format, ``checkpoint["provq_format"]``
(``CHECKPOINT_FORMAT``, set by ``VQTokenizer.on_save_checkpoint``). Where a checkpoint enters
provq, ``upgrade_checkpoint`` runs the steps from its format up to this one, in order, on the
loaded dict (the file is not rewritten): ``VQTokenizer.on_load_checkpoint`` (``provq-fit
--ckpt_path``, ``load_from_checkpoint``) and ``runs.loading.load_run`` (``provq-tokenize``,
``provq-decode``, the reports). A checkpoint of a newer format than this provq reads is
refused in one line naming the file.

Format 0 (no ``provq_format``: everything up to 46e1ba5) to 1:

- model weights without ``quantization_start`` (TopoDisc and protein runs from before it moved
  into ``VQTokenizer``) get -1, "not yet": the next quantizing batch sets it;
- an image tokenizer's PatchGAN at ``discriminator.*`` (before ``VQGANLoss`` held it) moves to
  ``loss.discriminator.*``;
- ``CurriculumCallback`` state: the setting ``seed`` is ``kmeans_seed``; state without
  ``settings`` (the first releases) gets an empty record, so a resume has nothing to compare.

A hyperparameter added since a checkpoint was written needs no step: the model is built through
its ``__init__`` (from the run's ``config.yaml``, or the checkpoint's hyperparameters), whose
default fills it. ``tests/data/topodisc_format0.ckpt`` is a stored format-0 checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from provq_lightning.errors import ProvqError

FORMAT_KEY = "provq_format"
CURRICULUM_STATE_KEY = "CurriculumCallback"  # the callback's state key (its class name)

Checkpoint = dict[str, Any]


def _default_quantization_start(checkpoint: Checkpoint) -> None:
    state = checkpoint.get("state_dict", {})
    if "curriculum_phase" in state:  # a VQTokenizer's weights: it has held this buffer always
        state.setdefault("quantization_start", torch.tensor(-1, dtype=torch.long))


def _discriminator_into_loss(checkpoint: Checkpoint) -> None:
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith("discriminator.")]:
        state[f"loss.{key}"] = state.pop(key)


def _curriculum_settings(checkpoint: Checkpoint) -> None:
    for key, state in checkpoint.get("callbacks", {}).items():
        if key == CURRICULUM_STATE_KEY or key.startswith(CURRICULUM_STATE_KEY + "{"):
            saved = state.get("settings") or {}
            state["settings"] = {("kmeans_seed" if k == "seed" else k): v for k, v in saved.items()}


# STEPS[n] upgrades format n to n + 1.
STEPS: tuple[tuple[Callable[[Checkpoint], None], ...], ...] = (
    (_default_quantization_start, _discriminator_into_loss, _curriculum_settings),
)
CHECKPOINT_FORMAT = len(STEPS)


def checkpoint_format(checkpoint: Checkpoint) -> int:
    """The format a checkpoint was written in (0: before provq recorded one)."""
    return int(checkpoint.get(FORMAT_KEY, 0))


def mark_format(checkpoint: Checkpoint) -> None:
    """Record this provq's format in a checkpoint being saved."""
    checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT


def upgrade_checkpoint(checkpoint: Checkpoint, source: str | Path | None = None) -> Checkpoint:
    """``checkpoint`` (changed in place) in this provq's format; ``source`` names it in errors.

    Refuses, in one ``ProvqError`` line, a checkpoint written by a newer provq.
    """
    found = checkpoint_format(checkpoint)
    if found > CHECKPOINT_FORMAT:
        name = f"checkpoint {source}" if source is not None else "the checkpoint"
        raise ProvqError(
            f"{name} has checkpoint format {found}, written by a newer provq; this one reads "
            f"formats up to {CHECKPOINT_FORMAT}: upgrade provq (pip install -U provq) to load it"
        )
    for steps in STEPS[found:]:
        for step in steps:
            step(checkpoint)
    mark_format(checkpoint)
    return checkpoint
