"""Image decoding and the LlamaGen-style crops, as plain functions on PIL images.

Images leave the loader, and reach the model, as uint8 (B, 3, H, W) tensors: the worker
queues and the host-to-device copy move 4x fewer bytes than float32. The model alone maps them
to [-1, 1], on its device (``ImageTokenizer.model_input``, with ``to_model_range``).

Training crop (LlamaGen's ``random_crop_arr``): the short side is resized to a random length in
``[size / max_crop_frac, size / min_crop_frac]``, then a random ``size`` x ``size`` window is
cut and flipped horizontally with probability 0.5. Validation: short side resized to ``size``,
centre crop. The crop box is computed on the original image and resized in one PIL call
(``resize(box=...)``), so pixels outside the crop are never resampled.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from provq_lightning.errors import ProvqError

# The picture files every image tool reads (make_shards, the image-folder datamodule, rFID).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".webp")


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can fully decode (truncated, corrupt, not an image)."""


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image; ``draft_size`` lets libjpeg decode at a reduced scale
    that still leaves the short side >= ``draft_size`` (a large speed-up for small crops)."""
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size is not None and img.format == "JPEG":
            w, h = img.size
            scale = draft_size / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()  # forces a full decode: a truncated JPEG raises here, not later
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UndecodableImage(str(exc)) from exc


def _resized_crop(
    img: Image.Image, size: int, short: float, left_frac: float, top_frac: float
) -> Image.Image:
    """Resize so the short side is ``short``, then cut ``size`` x ``size`` at the given place."""
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left = round((new_w - size) * left_frac)
    top = round((new_h - size) * top_frac)
    # The same window in original coordinates.
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=None)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side to ``size``, centre ``size`` x ``size`` window."""
    return _resized_crop(img, size, size, 0.5, 0.5)


def random_crop(
    img: Image.Image,
    size: int,
    rng: random.Random,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    flip: bool = True,
) -> Image.Image:
    """LlamaGen's training crop: random rescale of the short side, random window, flip."""
    short = rng.uniform(size / max_crop_frac, size / min_crop_frac)
    out = _resized_crop(img, size, short, rng.random(), rng.random())
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the model's input range."""
    if images.dtype != torch.uint8:
        raise ProvqError(f"image batch is {images.dtype}, not uint8: ImageTokenizer maps uint8 "
                         "images (B, 3, H, W) to [-1, 1] itself; deliver uint8 pixels (0-255)")
    return images.float().div_(127.5).sub_(1.0)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> [0, 1], clamped (what metrics and PNGs take)."""
    return ((images.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """One (3, H, W) model-range image -> (H, W, 3) uint8 array, rounded."""
    unit = to_unit_range(image.detach().cpu())
    return (unit * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def pairs_grid(inputs: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Model-range inputs and their reconstructions side by side, one pair per row: a [0, 1]
    (3, H', W') picture, as ``image_log.log_figure`` takes it."""
    from torchvision.utils import make_grid

    pairs = torch.stack([inputs, recons], dim=1).flatten(0, 1)
    return make_grid(to_unit_range(pairs), nrow=2, padding=2)
