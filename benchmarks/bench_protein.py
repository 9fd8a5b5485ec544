"""Protein data path and train-step throughput.

1. Structures/s of one epoch that parses the structure files with biotite (what a loader without
   a cache does every epoch) vs one epoch read from provq's shard cache (``CachedStructures``,
   opened afresh each round, so shard loading is included). Two parse baselines: the shared sample
   set as shipped (PDB, PDB.gz, mmCIF) and the same structures written as mmCIF (the format the
   paper's data come in). The ratio is the cache's speed-up (target >= 20x).
2. Train-step throughput (residues/s: forward, backward, AdamW step) of the ``proteins_sample``
   model on batches from the cache, in each curriculum phase: vanilla hard VQ (the baseline),
   ProVQ warmup (quantizer bypassed) and ProVQ transition (soft mix).

    .venv/bin/python benchmarks/bench_protein.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provq_lightning.data.paths import shared_data_dir  # noqa: E402
from provq_lightning.datamodules.proteins import CachedStructures  # noqa: E402
from provq_lightning.protein.batching import collate_structures  # noqa: E402
from provq_lightning.protein.cache import discover, prepare_cache  # noqa: E402
from provq_lightning.protein.parsing import StructureSkip, parse_structure, read_atoms  # noqa: E402
from provq_lightning.protein.tokenizer import ProteinTokenizer  # noqa: E402
from provq_lightning.schedules import Phase  # noqa: E402


def to_mmcif(files: list[Path], out_dir: Path) -> list[Path]:
    """Write every structure's first model as mmCIF (the format the paper's data come in)."""
    import biotite.structure.io.pdbx as pdbx

    out = []
    for i, path in enumerate(files):
        try:
            atoms = read_atoms(path)
        except StructureSkip:
            continue
        cif = pdbx.CIFFile()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pdbx.set_structure(cif, atoms)
        target = out_dir / f"{i:04d}_{path.name.split('.')[0]}.cif"
        cif.write(str(target))
        out.append(target)
    return out


def parse_epoch(files: list[Path]) -> int:
    n = 0
    for path in files:
        try:
            for chain in parse_structure(path).chains:
                torch.from_numpy(chain.coords)  # the same tensors the cache hands out
                n += 1
        except StructureSkip:
            pass
    return n


def cache_epoch(cache_dir: Path, crop: int) -> int:
    # A fresh dataset per epoch: the manifest read and shard loading count against the cache.
    dataset = CachedStructures(cache_dir, ("train", "val"), crop_length=crop)
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset)


def best_rate(fn, rounds: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(rounds):
        start = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - start)
    return count / best, count


PHASES = {  # name: (alpha, omega, phase) as the CurriculumCallback sets them
    "vanilla VQ (hard)": (0.0, 1.0, Phase.DISCRETE),
    "ProVQ warmup (bypass)": (1.0, 0.5, Phase.WARMUP),
    "ProVQ transition (alpha 0.5)": (0.5, 0.75, Phase.TRANSITION),
}


def train_step_throughput(
    dataset: CachedStructures, steps: int, batch_size: int = 8, warmup: int = 4
) -> dict[str, float]:
    """Residues/s of full training steps (the module's own ``_step``) in each phase.

    The phases take turns batch by batch, so load from other processes on a shared machine
    falls on all of them alike.
    """
    n = len(dataset)
    torch.manual_seed(0)
    batches = [
        collate_structures([dataset[(s * batch_size + j) % n] for j in range(batch_size)])
        for s in range(steps + warmup)
    ]
    runs = {}
    for name, (alpha, omega, phase) in PHASES.items():
        torch.manual_seed(0)
        model = ProteinTokenizer(variant="vanilla", num_codes=64, code_dim=32)  # proteins_sample
        model.train()
        model.set_curriculum(alpha, omega, phase)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(model, opt, batch) -> float:
        start = time.perf_counter()
        q, _, _, recon = model._step(batch)
        loss = recon + model.omega * q.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    seconds = dict.fromkeys(runs, 0.0)
    residues = 0
    for i, batch in enumerate(batches):
        timed = i >= warmup  # first calls per shape build kernels and grow the allocator
        for name, (model, opt) in runs.items():
            elapsed = step(model, opt, batch)
            seconds[name] += elapsed if timed else 0.0
        residues += int(batch["residue_mask"].sum()) if timed else 0
    return {name: residues / t for name, t in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--crop", type=int, default=128)
    args = parser.parse_args()
    source = shared_data_dir() / "proteins"
    if not source.is_dir():
        print(f"skipped: shared protein data not found at {source} (set PROVQ_SHARED_DATA)")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.rounds}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cif").mkdir()
        shipped = discover([source]).files
        cif = to_mmcif(shipped, tmp / "cif")
        prepare_cache([source], tmp / "cache", progress=False)
        cache_rate, n_cache = best_rate(lambda: cache_epoch(tmp / "cache", args.crop), args.rounds)
        print(f"one epoch of the shared sample set ({n_cache} chains), structures (chains)/s:")
        print(f"  {'read provq shard cache':<46} {cache_rate:9.1f}")
        for label, files in (("as shipped (PDB/PDB.gz/mmCIF)", shipped), ("as mmCIF", cif)):
            rate, n = best_rate(lambda files=files: parse_epoch(files), args.rounds)
            assert n == n_cache, (label, n, n_cache)
            print(
                f"  {f'parse {len(files)} files {label}':<46} {rate:9.1f}   "
                f"cache is {cache_rate / rate:.1f}x faster (target >= 20x)"
            )
        dataset = CachedStructures(tmp / "cache", ("train", "val"), crop_length=args.crop)
        rates = train_step_throughput(dataset, args.steps)
    base = rates["vanilla VQ (hard)"]
    print(f"train step, proteins_sample model, batch 8, crop {args.crop}, residues/s:")
    for name, rate in rates.items():
        print(f"  {name:<46} {rate:9.0f}   {rate / base:.2f}x vanilla")


if __name__ == "__main__":
    main()
