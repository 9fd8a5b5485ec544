"""``provq-tokenize --format llamagen``: codes in the layout LlamaGen's c2i GPT trains on.

LlamaGen's ``autoregressive/train/extract_codes_c2i.py`` writes, for the n-th image (0, 1, ...
in loader order), ``<out>/imagenet<S>_codes/<n>.npy``: int64, shape ``(1, A, h*w)`` (the
row-major code grid of each of A views) and ``<out>/imagenet<S>_labels/<n>.npy``: int64, shape
``(1,)`` (the class index). S is the crop size (256 -> 16x16 codes for VQ-16). Views: the
centre crop and its horizontal flip (A = 2), or with ``--ten-crop`` a centre crop of
``int(S * crop_range)`` cut into torchvision's ten crops (four corners and centre, then the
same of the flipped image; A = 10). Its ``dataset/imagenet.py`` ``CustomDataset`` reads the
pair back and, when its code path contains ``flip``, keeps one random view: ``(1, h*w)``.

Beside LlamaGen's two folders: ``index.jsonl`` (number, key, label per image, so a number can
be traced to its photo) and ``meta.json``.

Under DDP (``provq-fit predict`` with ``CodePredictionWriter(format="llamagen")``) each rank
writes its share of the images as such a folder, its index lines also giving each image's
``order`` (its dataset index where the loader knows it, else rank and position), and
``merge_shares`` numbers them all by that order into one folder: the numbers a single process
gives a map-style dataset, whatever the number of ranks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from provq_lightning.errors import ProvqError

DATASET = "imagenet"  # LlamaGen's build_imagenet_code reads imagenet<S>_codes / _labels


def ten_crop_source_size(image_size: int, crop_range: float) -> int:
    """The centre-crop size the ten crops are cut from (LlamaGen: ``int(S * crop_range)``)."""
    return int(image_size * crop_range)


def views(images: torch.Tensor, image_size: int, ten_crop: bool) -> torch.Tensor:
    """(B, A, 3, S, S) views of (B, 3, H, W) images: [image, flipped] or the ten crops."""
    if not ten_crop:
        return torch.stack([images, images.flip(-1)], dim=1)
    from torchvision.transforms.functional import ten_crop as tv_ten_crop

    return torch.stack(tv_ten_crop(images, [image_size, image_size]), dim=1)


class LlamaGenCodeWriter:
    """Numbered ``.npy`` code and label files under ``out`` (see the module docstring)."""

    def __init__(self, out: Path, image_size: int) -> None:
        self.out, self.count = out, 0
        self.codes_dir = out / f"{DATASET}{image_size}_codes"
        self.labels_dir = out / f"{DATASET}{image_size}_labels"
        for folder in (self.codes_dir, self.labels_dir):
            if folder.is_dir() and any(folder.iterdir()):
                # Stale higher-numbered files from an earlier run would join the data set.
                raise ProvqError(f"{folder} is not empty; pass a new --out (LlamaGen reads every "
                                 "numbered file, so old ones would mix with the new codes)")
            folder.mkdir(parents=True, exist_ok=True)
        self._index = (out / "index.jsonl").open("w")
        self.view_shape: tuple[int, ...] | None = None

    def add(self, key: str, label: int, codes: torch.Tensor,
            order: Sequence[int] | None = None) -> None:
        """One image: ``codes`` (A, h, w) code ids of its views, ``label`` its class index;
        ``order``: where the image goes when shares are merged (``merge_shares``)."""
        if label < 0:
            raise ProvqError(f"image {key!r} has no class label (-1: its class is not in the "
                             "datamodule's class index); LlamaGen's c2i GPT needs one per image")
        n = self.count
        array = codes.reshape(1, codes.shape[0], -1).cpu().numpy().astype(np.int64)
        np.save(self.codes_dir / f"{n}.npy", array, allow_pickle=False)
        np.save(self.labels_dir / f"{n}.npy", np.array([label], dtype=np.int64),
                allow_pickle=False)
        record = {"number": n, "key": key, "label": label}
        if order is not None:
            record["order"] = list(order)
        self._index.write(json.dumps(record) + "\n")
        self.view_shape = tuple(codes.shape)
        self.count += 1

    def move_in(self, share: Path, record: dict[str, Any]) -> None:
        """Image ``record`` (an index line) of the folder ``share``, written by another writer
        of the same image size, as this writer's next number: its files are renamed."""
        n = self.count
        for folder in (self.codes_dir, self.labels_dir):
            os.replace(share / folder.name / f"{record['number']}.npy", folder / f"{n}.npy")
        self._index.write(json.dumps({"number": n, "key": record["key"],
                                      "label": record["label"]}) + "\n")
        self.count += 1

    def close(self, meta: dict[str, Any]) -> None:
        self._index.close()
        views_, h, w = self.view_shape or (None, None, None)
        meta = {**meta, "format": "llamagen", "count": self.count, "views": views_,
                "code_grid": [h, w], "codes_dir": self.codes_dir.name,
                "labels_dir": self.labels_dir.name}
        (self.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def merge_shares(shares: Sequence[Path], writer: LlamaGenCodeWriter) -> None:
    """Move every image of the closed share folders into ``writer``, numbered by the ``order``
    of each image (see the module docstring); a share without ``meta.json`` is named."""
    records = []
    for share in shares:
        if not (share / "meta.json").is_file():
            raise ProvqError(
                f"{share} has no meta.json: its rank did not finish writing its codes, or the "
                "output folder is not on a file system every rank sees; give an output_dir on "
                "a shared file system")
        meta = json.loads((share / "meta.json").read_text())
        if meta["views"] is not None:
            writer.view_shape = (meta["views"], *meta["code_grid"])
        for line in (share / "index.jsonl").read_text().splitlines():
            record = json.loads(line)
            records.append((record["order"], share, record))
    records.sort(key=lambda item: item[0])
    for _, share, record in records:
        writer.move_in(share, record)


@torch.no_grad()
def tokenize_views(model: Any, batch: dict[str, Any], image_size: int,
                   ten_crop: bool) -> list[tuple[str, int, torch.Tensor]]:
    """``(key, label, codes (A, h, w))`` per image of a batch, through ``model.encode_codes``."""
    if not callable(getattr(model, "model_input", None)) or "label" not in batch:
        raise ProvqError(f"--format llamagen needs an image tokenizer and a datamodule with class "
                         f"labels; {type(model).__name__} with batch keys {sorted(batch)} has not")
    stacked = views(model.model_input(batch), image_size, ten_crop)
    b, a = stacked.shape[:2]
    with model.eval_mode():
        codes = model.encode_codes(stacked.flatten(0, 1)).cpu()
    codes = codes.reshape(b, a, *codes.shape[-2:])
    labels = torch.as_tensor(batch["label"]).tolist()
    return [(str(key), int(labels[i]), codes[i]) for i, key in enumerate(batch["key"])]
