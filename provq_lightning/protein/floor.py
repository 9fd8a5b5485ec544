"""The no-training floor: k-means codes of each residue's CA (theta, tau), decoded by NeRF.

Every learned structure tokenizer is read against it. Each residue's feature is
``(cos theta, sin theta, cos tau, sin tau)`` (``internal.ca_internal``); provq's ``kmeans``
clusters the features of every training chain (whole chains, the run's training split:
``sources`` train plus ``train_sources``) into K codes; a residue's token is the nearest centre
over the angles it has (chain ends lack some); decoding chains the centres' angles with
``nerf_ca`` (3.8 A steps) and places N and C at the mean offsets of ``internal_decoder``.
Scoring is the model's own: the datamodule's validation crops (or the held-out chains, or
whole chains) and ``protein.metrics``.

    python -m provq_lightning.protein.floor --config experiments/proteins_sample.yaml \
        --seed 0 --out runs/proteins_sample_floor/seed_0

writes ``OUT/metrics.json`` (the keys ``provq-fit`` writes: ``val/lddt``, ``val/tm_score``,
``val/rmsd``, the codebook usage; ``test/...`` with ``--split holdout``) and ``timing.json``,
so ``protein.report`` puts the floor in the same table as the trained runs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from provq_lightning.errors import ProvqError
from provq_lightning.protein.batching import collate_structures
from provq_lightning.protein.internal import ca_internal, nerf_ca, place_n_c
from provq_lightning.protein.internal_decoder import MEAN_N_C_OFFSETS
from provq_lightning.protein.tokenizer import structure_metrics
from provq_lightning.vq.codebook_metrics import usage_statistics
from provq_lightning.vq.kmeans import kmeans

PROG = "python -m provq_lightning.protein.floor"
SPLITS = ("val", "holdout")


def angle_features(ca: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, L, 4) and per-dimension validity (B, L, 4) of every residue."""
    theta, tau, theta_ok, tau_ok = ca_internal(ca, mask)
    valid = torch.cat([theta_ok[..., None].expand(-1, -1, 2),
                       tau_ok[..., None].expand(-1, -1, 2)], -1)
    return torch.cat([theta, tau], -1), valid


def fit_codebook(batches: Iterable[dict], num_codes: int, seed: int) -> torch.Tensor:
    """K-means centres (K, 4) of the residues with both angles defined."""
    rows = []
    for batch in batches:
        feats, valid = angle_features(batch["coords"][:, :, 1].double(), batch["residue_mask"])
        rows.append(feats[valid.all(-1)])
    return kmeans(torch.cat(rows).float(), num_codes, seed=seed).centers


def assign_codes(feats: torch.Tensor, valid: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Nearest centre per residue (B, L), over the feature dimensions the residue has."""
    diff = (feats.unsqueeze(-2) - centres.to(feats)).pow(2) * valid.unsqueeze(-2)
    return diff.sum(-1).argmin(-1)


def decode_floor_codes(codes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Backbone (B, L, 3, 3) N/CA/C from codes (B, L): centre angles chained by NeRF."""
    angles = centres[codes]
    ca = nerf_ca(angles[..., :2], angles[..., 2:])
    offsets = torch.tensor(MEAN_N_C_OFFSETS, dtype=ca.dtype).expand(*codes.shape, 2, 3)
    return place_n_c(ca, offsets)


def evaluate(batches: Iterable[dict], centres: torch.Tensor, prefix: str) -> dict[str, float]:
    """The model's structure metrics and codebook usage of the floor tokens over ``batches``."""
    metrics = structure_metrics()
    counts = torch.zeros(centres.shape[0], dtype=torch.long)
    for batch in batches:
        mask = batch["residue_mask"]
        true = batch["coords"][:, :, :3].double()
        feats, valid = angle_features(true[:, :, 1], mask)
        codes = assign_codes(feats, valid, centres.double())
        pred = decode_floor_codes(codes, centres.double())
        for metric in metrics.values():
            metric.update(pred.float(), true.float(), mask)
        counts += torch.bincount(codes[mask], minlength=centres.shape[0])
    out = {f"{prefix}/{k}": float(m.compute()) for k, m in metrics.items()}
    out.update({f"{prefix}/{k}": float(v) for k, v in usage_statistics(counts).items()})
    return out


def _datamodule(config: Path, crop_length: int | None, keep_crop: bool) -> LightningDataModule:
    from provq_lightning.runs.loading import instantiate, read_config

    try:
        cfg = read_config(config)  # a variant brings its base's data and model
    except OSError as err:
        raise ProvqError(f"config {config} unreadable ({err.strerror}); pass a provq-fit "
                         "config with a data section") from None
    if not isinstance(cfg, dict) or "data" not in cfg:
        raise ProvqError(f"config {config} has no 'data' section; pass the provq-fit config "
                         "of the runs the floor is compared with")
    if not keep_crop:
        cfg["data"].setdefault("init_args", {})["crop_length"] = crop_length
    data = instantiate(cfg, "data", LightningDataModule)
    data.setup("fit")
    data.num_codes = int(cfg.get("model", {}).get("init_args", {}).get("num_codes", 0))
    return data


def _whole_chains(dataset) -> None:
    """Read every part of a (concatenated) training set uncropped."""
    for part in getattr(dataset, "parts", [dataset]):
        part.crop_length = None


def _floor(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True,
                        help="provq-fit config: its data section and model num_codes")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--num-codes", type=int, help="K (default: the config's num_codes)")
    parser.add_argument("--split", choices=SPLITS, default="val",
                        help="score the validation crops or the held-out train_sources chains")
    parser.add_argument("--whole-chains", action="store_true",
                        help="score whole chains instead of the config's crop_length window")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json")
    args = parser.parse_args(argv)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    data = _datamodule(args.config, None, keep_crop=not args.whole_chains)
    k = args.num_codes or data.num_codes
    if k < 1:
        raise ProvqError(f"no model.init_args.num_codes in {args.config}; pass --num-codes")
    train = data.train_set
    _whole_chains(train)
    loader = DataLoader(train, batch_size=16, collate_fn=collate_structures)
    centres = fit_codebook(loader, k, args.seed)
    if args.split == "holdout":
        if not hasattr(data, "holdout_set"):
            raise ProvqError(f"{args.config} holds out no chains; set data.init_args."
                             "train_sources and train_holdout to score --split holdout")
        evaluated, prefix = data.holdout_set, "test"
    else:
        evaluated, prefix = data.val_set, "val"
    metrics = evaluate(DataLoader(evaluated, batch_size=8, collate_fn=collate_structures),
                       centres, prefix)
    metrics.update(global_step=0, status="finished", num_codes=k, seed=args.seed,
                   chains=len(evaluated))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    timing = {"cpu_s": time.process_time() - start_cpu,
              "wall_s": time.perf_counter() - start_wall}
    (args.out / "timing.json").write_text(json.dumps(timing) + "\n")
    torch.save({"centres": centres}, args.out / "centres.pt")
    print(f"k-means floor K={k} seed {args.seed} ({args.split}, {len(evaluated)} chains): "
          f"lDDT {metrics[prefix + '/lddt']:.3f}, TM {metrics[prefix + '/tm_score']:.3f}, "
          f"RMSD {metrics[prefix + '/rmsd']:.2f}, utilization "
          f"{metrics[prefix + '/utilization']:.1%}; wrote {args.out / 'metrics.json'}")


def main(argv: list[str] | None = None) -> None:
    from provq_lightning.reporting.run_report import run_cli

    run_cli(PROG, _floor, argv)


if __name__ == "__main__":
    main()
