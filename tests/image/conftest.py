"""Fixtures for the image tests: small synthetic JPEG sets, shards, the shared sample photos."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(os.environ.get("PROVQ_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared"
                             / "data"))
SAMPLE_PHOTOS = SHARED / "images" / "imagenet_sample"

# A VQGAN small enough for CPU tests: 3 levels (4x down), GroupNorm with 8 groups.
TINY = dict(
    ch=16,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=16,
    norm_groups=8,
    num_codes=64,
    code_dim=4,
    lpips_weight=0.0,
    eval_lpips=False,
    eval_fid=False,
    disc_ndf=8,
    disc_layers=2,
    num_log_images=2,
)


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    # Smooth gradients plus noise: compressible like a photo, distinct per seed.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (seed % 7 + 1)) % 256, (yy * 3) % 256, (xx + yy + seed) % 256], -1)
    pixels = (base + rng.integers(0, 30, base.shape)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_flat_folder(root: Path, n: int, classes: int = 4) -> list[str]:
    """``n`` JPEGs named ``<wnid>_<i>.JPEG`` over ``classes`` wnids; returns their keys."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    rnd = random.Random(0)
    for i in range(n):
        wnid = f"n{1000000 + i % classes:08d}"
        size = (rnd.randint(24, 80), rnd.randint(24, 80))
        mode = "L" if i == 3 else "RGB"  # one grayscale photo, like the real set
        (root / f"{wnid}_img{i:03d}.JPEG").write_bytes(jpeg_bytes(i, size, mode))
        keys.append(f"{wnid}_img{i:03d}")
    return keys


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
