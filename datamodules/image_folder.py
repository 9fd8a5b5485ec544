"""A plain image-folder datamodule for small sets (no shards needed).

Reads an ImageNet-layout folder (``<wnid>/*.JPEG``) or a flat folder of ``<wnid>_*.JPEG``
(the shared sample photos), with the same crops and batch format as ``ImageNetDataModule``.
A deterministic hold-out (``val_fraction``, chosen by a hash of the file name, so it does not
move when files are added) gives a validation set when there is no separate folder.
``test_root`` is what ``provq-fit test`` evaluates: any folder of pictures (searched
recursively, any file names, no classes needed).
Training reads through an ``EpochSampler`` (``DistributedSampler``'s epoch-seeded order, ranks
interleaved under DDP) behind a resumable loader: a run resumed mid-epoch from a checkpoint
continues with the batches and crops the uninterrupted run would have used (a
``ResumableDataModule``, ``provq_lightning.data.resumable``). An unreadable image (a
truncated JPEG, a file that is no picture) is skipped and counted, as the shard loader does:
its batch is one image smaller, a warning names the file, and ``skipped_images`` counts them.
"""

from __future__ import annotations

import logging
import random
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from provq_lightning.data.resumable import ResumableDataModule
from provq_lightning.data.stream_position import SamplerLoader
from provq_lightning.datamodules.imagenet import read_class_list, resolve_path
from provq_lightning.errors import ProvqError
from provq_lightning.image.make_shards import SourceImage, find_images
from provq_lightning.image.transforms import (
    IMAGE_SUFFIXES,
    UndecodableImage,
    center_crop,
    decode_image,
    random_crop,
    to_uint8_tensor,
)

log = logging.getLogger("provq.data")
SKIPPED = "skipped"  # batch key: (path, reason) of the images a batch left out


def collate_readable(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the readable images; the unreadable ones go under ``SKIPPED``."""
    readable = [item for item in items if SKIPPED not in item]
    skipped = [item[SKIPPED] for item in items if SKIPPED in item]
    if not readable:
        names = ", ".join(path for path, _ in skipped)
        raise ProvqError(f"every image of a batch is unreadable ({names}); remove or replace "
                         "them")
    batch = default_collate(readable)
    batch[SKIPPED] = skipped
    return batch


def holdout(images: list[SourceImage], fraction: float) -> tuple[list, list]:
    """Split by a hash of each key: (train, val); ``fraction`` 1.0 holds out every image."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {fraction}")
    cut = int(fraction * 2**32)
    val = [im for im in images if zlib.crc32(im.key.encode()) < cut]
    train = [im for im in images if zlib.crc32(im.key.encode()) >= cut]
    return train, val


def any_images(root: Path) -> list[SourceImage]:
    """Every picture under ``root``, recursively, whatever its name; no class (label -1)."""
    if not root.is_dir():
        raise ProvqError(f"test_root {root} is not a folder; give a folder of pictures")
    paths = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ProvqError(f"no pictures ({', '.join(sorted(IMAGE_SUFFIXES))}) under test_root "
                         f"{root}; give a folder that holds some")
    # The relative path (suffix included) keeps keys unique; webdataset-safe characters only.
    keys = [re.sub(r"[^A-Za-z0-9_\-]", "_", str(p.relative_to(root))) for p in paths]
    return [SourceImage(p, "", key) for p, key in zip(paths, keys, strict=True)]


class FolderImages(Dataset):
    def __init__(
        self,
        images: list[SourceImage],
        class_index: dict[str, int],
        image_size: int,
        train: bool,
        seed: int = 0,
        min_crop_frac: float = 0.8,
        max_crop_frac: float = 1.0,
    ) -> None:
        self.images = images
        self.class_index = class_index
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.min_crop_frac = min_crop_frac
        self.max_crop_frac = max_crop_frac

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Image ``index``; ``(index, crop_seed)`` (from ``EpochSampler``) seeds the crop."""
        crop_seed = None
        if isinstance(index, tuple):
            index, crop_seed = index
        item = self.images[index]
        size = self.image_size
        draft = round(size / self.min_crop_frac) + 1 if self.train else size
        try:
            img = decode_image(item.path.read_bytes(), draft)
        except (UndecodableImage, OSError) as exc:
            return {SKIPPED: (str(item.path), str(exc))}  # left out of its batch, counted
        if self.train:
            # Seeded by the sampler when training (resumable); else fresh torch randomness.
            if crop_seed is None:
                crop_seed = int(torch.randint(0, 2**62, ()).item())
            rng = random.Random(crop_seed)
            img = random_crop(img, size, rng, self.min_crop_frac, self.max_crop_frac)
        else:
            img = center_crop(img, size)
        return {
            "image": to_uint8_tensor(img),
            "label": self.class_index.get(item.wnid, -1),
            "key": item.key,
        }


class ImageFolderDataModule(ResumableDataModule):
    """Images from a folder, for small sets and the CPU sample experiments.

    Args:
        root: the training folder (``../shared/data/...`` honours ``PROVQ_SHARED_DATA``).
        val_root: a separate validation folder; if None, ``val_fraction`` of ``root`` is held
            out (and not trained on).
        val_fraction: share of ``root`` held out for validation when ``val_root`` is None.
        image_size, batch_size, num_workers: as usual.
        class_list: only these wnids (one per line).
        seed, min_crop_frac, max_crop_frac: augmentation (see ``transforms.random_crop``).
        test_root: what ``provq-fit test`` evaluates: any folder of pictures (recursive, any
            names); ``root`` is then not read. None: test on the validation images.
    """

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        val_fraction: float = 0.1,
        image_size: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        class_list: str | None = None,
        seed: int = 0,
        min_crop_frac: float = 0.8,
        max_crop_frac: float = 1.0,
        drop_last: bool = True,
        test_root: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.skipped_images = 0  # unreadable images left out of their batches

    def _images(self, root: str) -> list[SourceImage]:
        images = find_images(resolve_path(root))
        if self.hparams.class_list:
            keep = read_class_list(self.hparams.class_list)
            images = [im for im in images if im.wnid in keep]
        return images

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "test" and hp.test_root is not None:
            images = any_images(resolve_path(hp.test_root))
            self.test_set = FolderImages(images, {}, hp.image_size, train=False, seed=hp.seed)
            return
        train = self._images(hp.root)
        if hp.val_root is not None:
            val = self._images(hp.val_root)
        else:
            train, val = holdout(train, hp.val_fraction)
        if stage == "fit" and not train:
            raise ProvqError(
                f"data.init_args.val_fraction {hp.val_fraction} holds out every image of "
                f"{hp.root}, so there is nothing to train on; use it with provq-fit "
                "validate/test only, or lower it to fit"
            )
        wnids = sorted({im.wnid for im in train + val})
        index = {w: i for i, w in enumerate(wnids)}
        common = dict(class_index=index, image_size=hp.image_size, seed=hp.seed)
        crops = dict(min_crop_frac=hp.min_crop_frac, max_crop_frac=hp.max_crop_frac)
        self.train_set = FolderImages(train, train=True, **common, **crops)
        self.val_set = FolderImages(val, train=False, **common) if val else None
        # Every image once, centre-cropped, in file order: what provq-tokenize encodes.
        self.predict_set = FolderImages(train + val, train=False, **common)

    def train_dataloader(self) -> SamplerLoader:
        hp = self.hparams
        return self.sampler_loader(
            self.train_set,
            collate_fn=collate_readable,
            batch_size=hp.batch_size,
            drop_last=hp.drop_last,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        hp = self.hparams
        return DataLoader(
            self.val_set,
            collate_fn=collate_readable,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
        )

    def test_dataloader(self) -> DataLoader | list:
        if self.hparams.test_root is not None:
            hp = self.hparams
            return DataLoader(self.test_set, batch_size=hp.val_batch_size or hp.batch_size,
                              shuffle=False, num_workers=hp.num_workers,
                              collate_fn=collate_readable)
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.predict_set,
            collate_fn=collate_readable,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            num_workers=hp.num_workers,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        skipped = batch.pop(SKIPPED, []) if isinstance(batch, dict) else []
        for path, reason in skipped:
            log.warning("skipped unreadable image %s (%s); remove or replace it", path, reason)
        self.skipped_images += len(skipped)
        self.note_training_batch(bad=[(path, "undecodable") for path, _ in skipped])
        return batch

