"""File names of items in token folders and decoded outputs."""

from __future__ import annotations

import re


def safe_file_name(key: str) -> str:
    """``key`` with every character other than ASCII letters, digits, ``.``, ``_`` and ``-``
    replaced by ``_``: the same file name for a key on every file system and modality."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)
