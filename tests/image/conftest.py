"""Fixtures for the image tests: small synthetic JPEG sets, shards, the shared sample photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.image.helpers import SAMPLE_PHOTOS, write_flat_folder


@pytest.fixture(scope="session")
def sample_photos() -> Path:
    if not SAMPLE_PHOTOS.is_dir():
        pytest.skip(f"shared sample photos not found at {SAMPLE_PHOTOS} (set PROVQ_SHARED_DATA)")
    return SAMPLE_PHOTOS


@pytest.fixture(scope="session")
def flat_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("flat")
    return root, write_flat_folder(root, 37)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core machine
    a busy-waiting OpenMP thread per process slows everything down; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
