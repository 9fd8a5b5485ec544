"""What the protein tests share: the sample-data paths, PDB line editing, a CPU-sized model
and a batch of real chains.

Imported by test files; the fixtures built on these live in ``conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from provq_lightning.data.paths import REPO_ROOT, shared_data_dir
from provq_lightning.datamodules.proteins import ProteinStructureDataModule
from provq_lightning.protein.batching import collate_structures
from provq_lightning.protein.parsing import parse_structure
from tests.helpers import effective_config, provq_fit

PROTEINS = shared_data_dir() / "proteins"
EDGE = PROTEINS / "biotite_edge_cases"

# A ProteinTokenizer small enough for CPU tests.
TINY = dict(
    num_codes=16,
    code_dim=8,
    encoder_dim=32,
    encoder_heads=4,
    encoder_layers=1,
    decoder_dim=32,
    decoder_heads=2,
    decoder_layers=1,
    pair_dim=16,
)


def need_shared_data() -> Path:
    if not (PROTEINS / "cath_domains").is_dir():
        pytest.skip(f"shared protein sample data not found at {PROTEINS} (set PROVQ_SHARED_DATA)")
    return PROTEINS


def pdb_atom_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(("ATOM", "HETATM"))]


def set_field(line: str, start: int, end: int, value: str) -> str:
    """Replace PDB columns [start, end) (0-based) with ``value`` right-aligned."""
    return line[:start] + value.rjust(end - start)[: end - start] + line[end:]


def chain_batch(names=("1aki.pdb", "1k6p.pdb")) -> dict:
    items = []
    for name in names:
        for chain in parse_structure(EDGE / name).chains:
            coords = torch.from_numpy(chain.coords)
            items.append(
                {
                    "id": chain.id,
                    "coords": coords,
                    "residue_index": torch.from_numpy(chain.residue_index),
                    "aatype": torch.from_numpy(chain.aatype).long(),
                    "residue_mask": torch.isfinite(coords[:, :3]).all(-1).all(-1),
                }
            )
    return collate_structures(items)


def fit_tiny_run(out: Path, files: tuple[str, ...]) -> Path:
    """A 4-step provq-fit of a ``TINY`` model with the proteins_sample config's layout on copies
    of ``files`` (from ``EDGE``), crops of 64 residues; returns the run directory."""
    src = out / "src"
    src.mkdir()
    for name in files:
        shutil.copy(EDGE / name, src / name)
    cfg = effective_config(REPO_ROOT / "experiments" / "proteins_sample.yaml")
    cfg["trainer"].update(max_steps=4, val_check_interval=4, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(out), version="t")
    cfg["curriculum"].update(warmup_steps=1, transition_steps=1, kmeans_collect_batches=1)
    cfg["model"]["init_args"].update(TINY)
    cfg["data"]["init_args"].update(sources=str(src), cache_dir=str(out / "cache"),
                                    crop_length=64, val_fraction=0.3, batch_size=2)
    drop_train_sources(cfg)
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    provq_fit("--config", str(config))
    return out / "proteins_sample_provq" / "t"


def drop_train_sources(cfg: dict) -> None:
    """A tiny test fit reads only its own files, not the sample config's extra training
    folder (hundreds of structures)."""
    for key in ("train_sources", "train_holdout", "test_on_holdout"):
        cfg["data"]["init_args"].pop(key, None)


def cath_datamodule(cache_dir: Path, val_fraction: float) -> ProteinStructureDataModule:
    """The shared CATH domains, crops of 48, batches of 4, its cache prepared under cache_dir."""
    dm = ProteinStructureDataModule(
        sources=str(need_shared_data() / "cath_domains"),
        cache_dir=str(cache_dir),
        crop_length=48,
        val_fraction=val_fraction,
        batch_size=4,
    )
    dm.prepare_data()
    return dm
