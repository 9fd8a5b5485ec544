"""What the image tests share: a CPU-sized VQGAN, synthetic JPEGs, a uint8 batch dataset.

Imported by test files and by the DDP launcher script; the fixtures built on these live in
``conftest.py``.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from provq_lightning.image.tokenizer import ImageTokenizer

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


class Batches(torch.utils.data.Dataset):
    """Fixed random uint8 images in the datamodules' batch format."""

    def __init__(self, n: int, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0, "key": f"img{i}"}


# What the tests train on a plain DataLoader over ``Batches``: the uint8 images go to the model
# as they come from the datamodules, and the model maps them to [-1, 1] itself.
Module = ImageTokenizer


def write_untrained_run(run: Path) -> Path:
    """A run folder as provq-fit leaves it, ``config.yaml`` and ``checkpoints/last.ckpt``, of an
    untrained ``TINY`` image tokenizer (seed 0): for tests about inputs, not reconstructions."""
    torch.manual_seed(0)
    model = ImageTokenizer(**TINY)
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    config = {"model": {"class_path": "provq_lightning.image.tokenizer.ImageTokenizer",
                        "init_args": init_args}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run
