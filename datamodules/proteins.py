"""Protein structure datamodule: parse once into a shard cache, then stream chains from it.

``prepare_data`` (rank 0 only under DDP) builds the cache with ``provq-prep-structures``'s code
when it is missing or stale (the cache directory is keyed by a fingerprint of the files and the
parse/split settings); every rank then reads its share of the shards, memory-mapped. Training
crops long chains to a random contiguous window of ``crop_length``; validation and test take the
first window, so their metrics are deterministic.

Resuming mid-epoch: training reads through an ``EpochSampler`` (``DistributedSampler``'s
epoch-seeded order, so under DDP the order is the one Lightning's own sampler gave) behind a
resumable loader (``provq_lightning.data.stream_position``): the checkpoint holds the epoch and the
batches taken, and a resumed run drops those indices without loading them. Each training index
carries a seed for its crop window, so the resumed run also crops exactly as the uninterrupted
one would have.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from provq_lightning.data.paths import resolve_data_path
from provq_lightning.data.resumable import ResumableDataModule
from provq_lightning.data.stream_position import SamplerLoader
from provq_lightning.errors import ProvqError
from provq_lightning.protein.batching import collate_structures
from provq_lightning.protein.cache import (
    CacheSettings,
    counts_line,
    discover,
    fingerprint,
    load_manifest,
    load_shard,
    log_ignored,
    prepare_cache,
    unpack_chain,
)
from provq_lightning.protein.parsing import ParseOptions

log = logging.getLogger("provq.protein")


class CachedStructures(Dataset):
    """Chains of one split of a structure cache, as centred, optionally cropped tensors."""

    def __init__(
        self,
        cache_dir: Path | str,
        split: str | Sequence[str],
        crop_length: int | None = 512,
        random_crop: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        manifest = load_manifest(self.cache_dir)
        splits = [split] if isinstance(split, str) else list(split)
        self.shard_files: list[Path] = []
        self.starts: list[int] = []
        total = 0
        for name in splits:
            for shard in manifest["shards"].get(name, []):
                self.shard_files.append(self.cache_dir / shard["file"])
                self.starts.append(total)
                total += shard["chains"]
        self.length = total
        self.crop_length = crop_length
        self.random_crop = random_crop
        self._shards: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.length

    def _shard(self, k: int) -> dict:
        if k not in self._shards:  # loaded lazily, so each worker/rank maps only what it reads
            self._shards[k] = load_shard(self.shard_files[k])
        return self._shards[k]

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Chain ``index``; ``(index, crop_seed)`` (from ``EpochSampler``) seeds a random crop."""
        crop_seed = None
        if isinstance(index, tuple):
            index, crop_seed = index
        if not 0 <= index < self.length:
            raise IndexError(index)
        k = bisect.bisect_right(self.starts, index) - 1
        chain = unpack_chain(self._shard(k), index - self.starts[k])
        coords = torch.from_numpy(np.array(chain.coords))
        residue_index = torch.from_numpy(np.array(chain.residue_index))
        aatype = torch.from_numpy(np.array(chain.aatype)).long()
        n = coords.shape[0]
        if self.crop_length is not None and n > self.crop_length:
            if self.random_crop and crop_seed is not None:
                start = random.Random(crop_seed).randrange(n - self.crop_length + 1)
            elif self.random_crop:
                start = int(torch.randint(0, n - self.crop_length + 1, ()).item())
            else:
                start = 0
            sl = slice(start, start + self.crop_length)
            coords, residue_index, aatype = coords[sl], residue_index[sl], aatype[sl]
        residue_mask = torch.isfinite(coords[:, :3]).all(-1).all(-1)
        # Centre on the mean CA: the model is translation-invariant, the float32 maths is
        # better conditioned near the origin.
        if residue_mask.any():
            coords = coords - coords[residue_mask, 1].mean(0)
        return {
            "id": chain.id,
            "coords": coords,
            "residue_index": residue_index - residue_index[0],
            "aatype": aatype,
            "residue_mask": residue_mask,
        }


class ConcatStructures(Dataset):
    """Several ``CachedStructures`` read as one; passes ``(index, crop_seed)`` through."""

    def __init__(self, parts: Sequence[CachedStructures]) -> None:
        self.parts = list(parts)
        self.starts = []
        total = 0
        for part in self.parts:
            self.starts.append(total)
            total += len(part)
        self.length = total

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        if not 0 <= index < self.length:
            raise IndexError(index)
        k = bisect.bisect_right(self.starts, index) - 1
        local = index - self.starts[k]
        return self.parts[k][local if seed is None else (local, seed)]


class ProteinStructureDataModule(ResumableDataModule):
    """Protein chains from PDB / mmCIF / BinaryCIF files (gzipped or not), via a shard cache.

    Args:
        sources: folders (searched recursively), structure files, or list files of paths;
            ``../shared/data/...`` resolves to the shared sample data (``PROVQ_SHARED_DATA``).
        cache_dir: where the cache lives; default ``runs/cache/proteins-<fingerprint>``.
        chains: keep only these ``<entry>_<chain>`` ids or entry (CATH domain) names.
        altloc: ``occupancy`` (highest-occupancy location) or ``first``.
        min_length: minimum residues with a full N/CA/C backbone for a chain to be used.
        max_length: drop chains longer than this (default: keep, and crop).
        crop_length: contiguous window length for training (random) and evaluation (first).
        val_fraction, split_seed: the deterministic by-entry train/val split; ``1.0`` puts
            every chain in validation (``provq-fit validate`` on a whole set; a fit refuses it).
        batch_size, num_workers: data loading.
        prep_workers: processes for parsing when the cache is built.
        train_sources: more chains for training only: parsed into a cache of their own with
            no validation split and added to the training split of ``sources``, so the
            validation split stays that of ``sources`` alone (whatever these hold).
        train_holdout: the fraction of ``train_sources`` entries (by the hash of the entry
            name and ``split_seed``, like the validation split) kept out of training: never
            trained on nor validated on, a set of structures the model has not seen.
        test_on_holdout: ``provq-fit test`` evaluates those held-out chains (whole set, crops
            as validation) instead of the validation split or ``test_sources``.
        test_sources: what ``provq-fit test`` evaluates, every chain of it (no split, no
            ``chains`` filter), in its own cache next to ``cache_dir``; the training
            ``sources`` are then not read. None: test on the validation split.
    """

    def __init__(
        self,
        sources: str | list[str] = "../shared/data/proteins",
        cache_dir: str | None = None,
        chains: list[str] | None = None,
        altloc: str = "occupancy",
        min_length: int = 10,
        max_length: int | None = None,
        crop_length: int | None = 512,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        prep_workers: int = 1,
        test_sources: str | list[str] | None = None,
        train_sources: str | list[str] | None = None,
        train_holdout: float = 0.0,
        test_on_holdout: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        self.test_sources = [test_sources] if isinstance(test_sources, str) else test_sources
        self.train_sources = (
            [train_sources] if isinstance(train_sources, str) else list(train_sources or [])
        )
        if not 0.0 <= train_holdout < 1.0:
            raise ValueError(f"data.init_args.train_holdout must lie in [0, 1), got "
                             f"{train_holdout}; it is the share of train_sources kept out")
        if test_on_holdout and not (self.train_sources and train_holdout > 0):
            raise ValueError("data.init_args.test_on_holdout needs train_sources and "
                             "train_holdout > 0 (the held-out chains it evaluates)")
        self.train_holdout = train_holdout
        self.test_on_holdout = test_on_holdout
        self.settings = CacheSettings(
            options=ParseOptions(altloc, min_length, max_length),
            val_fraction=val_fraction,
            split_seed=split_seed,
            chains=tuple(chains) if chains is not None else None,
        )
        self._cache_dir = cache_dir
        self.crop_length = crop_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prep_workers = prep_workers

    def resolved_sources(self) -> list[Path]:
        return [resolve_data_path(s) for s in self.sources]

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is not None:
            return resolve_data_path(self._cache_dir, must_exist=False)
        fp = fingerprint(discover(self.resolved_sources()).files, self.settings)
        return Path("runs") / "cache" / f"proteins-{fp}"

    # -- test_sources: a separate set that provq-fit test evaluates whole ------------------
    @property
    def test_settings(self) -> CacheSettings:
        return replace(self.settings, val_fraction=1.0, chains=None)

    @property
    def test_cache_dir(self) -> Path:
        files = discover([resolve_data_path(s) for s in self.test_sources]).files
        parent = self.cache_dir.parent if self._cache_dir is not None else Path("runs") / "cache"
        return parent / f"proteins-{fingerprint(files, self.test_settings)}"

    # -- train_sources: chains that only add to the training split ------------------------
    @property
    def train_only_settings(self) -> CacheSettings:
        # Its "val" split is the held-out part (never read for training or validation).
        return replace(self.settings, val_fraction=self.train_holdout)

    @property
    def train_only_cache_dir(self) -> Path:
        files = discover([resolve_data_path(s) for s in self.train_sources]).files
        parent = self.cache_dir.parent if self._cache_dir is not None else Path("runs") / "cache"
        return parent / f"proteins-{fingerprint(files, self.train_only_settings)}"

    def _prepare_train_only_cache(self) -> None:
        sources = [resolve_data_path(s) for s in self.train_sources]
        manifest = prepare_cache(
            sources, self.train_only_cache_dir, self.train_only_settings,
            workers=self.prep_workers,
        )
        log_ignored(manifest)
        print(f"train-only structures: {counts_line(manifest)} "
              f"(cache {self.train_only_cache_dir})", flush=True)

    def _tests_other_sources(self, stage: str | None = None) -> bool:
        if self.test_sources is None or self.test_on_holdout:
            return False
        if self.trainer is not None:
            return self.trainer.state.fn == TrainerFn.TESTING
        return stage == "test"

    def _prepare_test_cache(self) -> None:
        sources = [resolve_data_path(s) for s in self.test_sources]
        manifest = prepare_cache(
            sources, self.test_cache_dir, self.test_settings, workers=self.prep_workers
        )
        log_ignored(manifest)
        print(f"test structures: {counts_line(manifest)} (cache {self.test_cache_dir})",
              flush=True)

    def prepare_data(self) -> None:
        if self._tests_other_sources():
            self._prepare_test_cache()  # the training sources are not needed (nor read)
            return
        manifest = prepare_cache(
            self.resolved_sources(), self.cache_dir, self.settings, workers=self.prep_workers
        )
        # Printed, not logged at INFO: provq-fit shows no INFO lines, and a run that silently
        # used 4 of 70 files is the failure this line exists to expose.
        log_ignored(manifest)
        print(f"structures: {counts_line(manifest)} (cache {self.cache_dir})", flush=True)
        if self.train_sources:
            self._prepare_train_only_cache()

    def setup(self, stage: str | None = None) -> None:
        if self._tests_other_sources(stage):
            if self.trainer is None:
                self._prepare_test_cache()
            self.test_set = CachedStructures(
                self.test_cache_dir, "val", self.crop_length, random_crop=False
            )
            return
        cache = self.cache_dir
        # Outside a Trainer (provq-tokenize, scripts) nobody calls prepare_data; build or check
        # the cache here. Under a Trainer, prepare_data already ran once (rank 0).
        if self.trainer is None:
            self.prepare_data()
        self.train_set = CachedStructures(cache, "train", self.crop_length, random_crop=True)
        if self.train_sources:
            extra = CachedStructures(
                self.train_only_cache_dir, "train", self.crop_length, random_crop=True
            )
            self.train_set = ConcatStructures([self.train_set, extra])
            self.holdout_set = CachedStructures(
                self.train_only_cache_dir, "val", self.crop_length, random_crop=False
            )
        self.val_set = CachedStructures(cache, "val", self.crop_length, random_crop=False)
        if len(self.train_set) == 0 and stage in (None, "fit"):
            if self.settings.val_fraction >= 1.0:
                raise ProvqError(
                    "data.init_args.val_fraction 1.0 holds every chain out for validation, so "
                    "there is nothing to train on; use it with provq-fit validate/test only, "
                    "or set val_fraction below 1 to fit"
                )
            raise ValueError(
                f"structure cache {cache} has no training chains; see its skipped.tsv and "
                "manifest.json for why files were skipped"
            )

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None):
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_structures,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> SamplerLoader:
        return self.sampler_loader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_structures,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_on_holdout:
            return self._loader(self.holdout_set, shuffle=False)
        if self.test_sources is not None:
            return self._loader(self.test_set, shuffle=False)
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Every cached chain (train and val), uncropped, one per batch: for tokenization."""
        full = CachedStructures(self.cache_dir, ("train", "val"), crop_length=None)
        return self._loader(full, shuffle=False, batch_size=1)
