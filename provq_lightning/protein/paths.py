"""Where configs' relative data paths point: ``provq_lightning.data_paths``, under the names the
protein code and tests import from here."""

from __future__ import annotations

from provq_lightning.data_paths import REPO_ROOT, SHARED_PREFIX, resolve_data_path, shared_data_dir

__all__ = ["REPO_ROOT", "SHARED_PREFIX", "resolve_data_path", "shared_data_dir"]
