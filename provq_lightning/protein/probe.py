"""Token probe: how much secondary structure a structure tokenizer's codes carry.

The StructTokenBench idea at CPU scale. Every residue of a run's data gets a 3-state secondary
structure label (helix / strand / coil) from biotite's P-SEA (``annotate_sse``, CA only) and its
token from the run's checkpoint. A multinomial logistic regression from the token's codebook
vector to the label is trained on the train split and scored on the validation split (accuracy,
macro-F1, and the majority-class floor); the plug-in mutual information I(token; SSE) on the
validation split says how much of the label's entropy the tokens carry at all, whatever a linear
probe can read. Chains are tokenized whole (no crop), as ``provq-tokenize`` does.

    python -m provq_lightning.protein.probe ProVQ=runs/a/seed_0,runs/a/seed_1 \
        vanilla=runs/b/seed_0,runs/b/seed_1 [--markdown probe.md]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from provq_lightning.errors import ProvqError
from provq_lightning.reporting.mean_sd_table import Group, mean_sd_table
from provq_lightning.reporting.run_report import parse_runs, run_cli

SSE_CLASSES = ("helix", "strand", "coil")
NO_LABEL = -1  # no CA, or P-SEA gave no label
_PSEA_CLASS = {"a": 0, "b": 1, "c": 2}
PROG = "python -m provq_lightning.protein.probe"


# -- labels ---------------------------------------------------------------------------------
def sse_labels(ca: np.ndarray, residue_index: np.ndarray) -> np.ndarray:
    """P-SEA secondary structure of one chain from its CA trace: (L,) int64, 0 helix, 1 strand,
    2 coil, ``NO_LABEL`` where the CA is missing (NaN).

    ``residue_index`` becomes biotite's ``res_id``, so a numbering gap is a chain break, as it
    is for biotite on the full-atom file.
    """
    import biotite.structure as struc

    ca = np.asarray(ca, dtype=np.float32).reshape(-1, 3)
    labels = np.full(len(ca), NO_LABEL, dtype=np.int64)
    present = np.isfinite(ca).all(-1)
    n = int(present.sum())
    if n == 0:
        return labels
    atoms = struc.AtomArray(n)
    atoms.coord = ca[present]
    atoms.res_id = np.asarray(residue_index)[present]
    atoms.res_name[:] = "ALA"  # P-SEA only asks "amino acid with a CA"
    atoms.atom_name[:] = "CA"
    atoms.element[:] = "C"
    atoms.chain_id[:] = "A"
    sse = struc.annotate_sse(atoms)
    labels[present] = [_PSEA_CLASS.get(str(s), NO_LABEL) for s in sse]
    return labels


# -- measures on (token, label) pairs --------------------------------------------------------
def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(labels))) if len(labels) else float("nan")


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int = len(SSE_CLASSES)) -> float:
    """Mean F1 over the classes that occur in ``labels`` or ``pred``."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    scores = []
    for c in range(num_classes):
        tp = int(np.sum((pred == c) & (labels == c)))
        predicted, actual = int(np.sum(pred == c)), int(np.sum(labels == c))
        if predicted + actual:
            scores.append(2 * tp / (predicted + actual))
    return float(np.mean(scores)) if scores else float("nan")


def majority_accuracy(train_labels: np.ndarray, val_labels: np.ndarray) -> float:
    """Accuracy on ``val_labels`` of always answering the most frequent training label."""
    majority = np.bincount(np.asarray(train_labels)).argmax()
    return accuracy(np.full(len(val_labels), majority), val_labels)


def _plugin_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy_bits(labels: np.ndarray) -> float:
    """Plug-in entropy (bits) of a label sequence."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return _plugin_entropy(counts) if len(counts) else 0.0


def mutual_information_bits(tokens: np.ndarray, labels: np.ndarray) -> float:
    """Plug-in I(token; label) in bits from the joint histogram: H(T) + H(L) - H(T, L).

    Biased upward by about (distinct tokens - 1)(labels - 1) / (2 N ln 2) bits on N pairs."""
    tokens, labels = np.asarray(tokens), np.asarray(labels)
    if len(tokens) != len(labels):
        raise ValueError(f"{len(tokens)} tokens but {len(labels)} labels")
    if len(tokens) == 0:
        return 0.0
    _, t = np.unique(tokens, return_inverse=True)
    _, s = np.unique(labels, return_inverse=True)
    joint = np.zeros((t.max() + 1, s.max() + 1))
    np.add.at(joint, (t.ravel(), s.ravel()), 1)
    mi = _plugin_entropy(joint.sum(1)) + _plugin_entropy(joint.sum(0)) - _plugin_entropy(joint)
    return max(mi, 0.0)  # rounding can leave -1e-16 for independent variables


# -- the linear probe ------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor  # (features, classes)
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double() - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> np.ndarray:
        return self.logits(features).argmax(-1).numpy()


def fit_linear_probe(
    features: torch.Tensor,
    labels: np.ndarray,
    num_classes: int = len(SSE_CLASSES),
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> LinearProbe:
    """Full-batch L-BFGS on the mean cross-entropy plus ``weight_decay`` x |W|^2.

    The loss is convex and the weights start at zero, so the result depends on the data only
    (no seed); the small decay keeps it finite when classes are separable."""
    x = features.detach().double()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))  # constant columns
    x = (x - mean) / scale
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(mean, scale, weight.detach(), bias.detach())


# -- one run ----------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """The probe's numbers for one run (validation split unless named train)."""

    train_residues: int
    val_residues: int
    accuracy: float
    macro_f1: float
    majority: float
    mi_bits: float
    sse_entropy_bits: float
    codes_used: int

    @property
    def mi_fraction(self) -> float:
        """I(token; SSE) / H(SSE): the share of the label's uncertainty the tokens remove."""
        return self.mi_bits / self.sse_entropy_bits if self.sse_entropy_bits > 0 else 0.0


def token_labels(model: Any, loader: Iterable[dict], advance=None) -> tuple[np.ndarray, ...]:
    """(tokens, labels) of every residue with both a code and an SSE label, in loader order;
    ``advance()`` is called once per batch (a progress bar)."""
    tokens, labels = [], []
    for batch in loader:
        codes = model.encode_codes(batch).cpu().numpy()
        lengths = batch["pad_mask"].sum(-1).tolist()
        for i, n in enumerate(lengths):
            ca = batch["coords"][i, :n, 1].float().numpy()
            sse = sse_labels(ca, batch["residue_index"][i, :n].numpy())
            keep = (codes[i, :n] >= 0) & (sse != NO_LABEL)
            tokens.append(codes[i, :n][keep])
            labels.append(sse[keep])
        if advance is not None:
            advance()
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(tokens), np.concatenate(labels)


def check_run_dir(run_dir: Path) -> Path:
    """``run_dir/checkpoints/last.ckpt``, or a one-line error naming what is missing."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not run_dir.is_dir():
        raise ProvqError(f"run directory {run_dir} not found; train the runs first "
                         "(make protein-sample) or pass NAME=RUN_DIR of a provq-fit log folder")
    if not (run_dir / "config.yaml").is_file():
        raise ProvqError(f"{run_dir / 'config.yaml'} not found; RUN_DIR must be the log folder "
                         "provq-fit wrote (it holds config.yaml and checkpoints/)")
    if not ckpt.is_file():
        raise ProvqError(f"{ckpt} not found; let the provq-fit run in {run_dir} finish "
                         "(make protein-sample) or resume it with --ckpt_path last")
    return ckpt


def probe_run(run_dir: Path, progress: Any = None) -> ProbeResult:
    """Tokens and P-SEA labels of the run's train and validation splits, the probe, the MI."""
    from provq_lightning.protein.tokenizer import ProteinTokenizer
    from provq_lightning.runs.loading import dataloader, load_run

    ckpt = check_run_dir(run_dir)
    model, cfg = load_run(ckpt, None, None, "cpu")
    if not isinstance(model, ProteinTokenizer):
        raise ProvqError(f"{run_dir} holds a {type(model).__name__}, not a ProteinTokenizer; "
                         "the token probe needs a structure tokenizer run")
    cfg["data"].setdefault("init_args", {})["crop_length"] = None  # whole chains
    splits = {}
    for split in ("train", "val"):
        loader, _ = dataloader(cfg, split)
        task = None
        if progress is not None:
            task = progress.add_task(f"{run_dir.name} {split}", total=len(loader))
        splits[split] = token_labels(
            model, loader, None if task is None else lambda t=task: progress.advance(t)
        )
        if task is not None:
            progress.remove_task(task)
    (train_t, train_y), (val_t, val_y) = splits["train"], splits["val"]
    if len(train_t) == 0 or len(val_t) == 0:
        raise ProvqError(f"{run_dir}: no labelled residues in the "
                         f"{'train' if len(train_t) == 0 else 'validation'} split; check "
                         "data.init_args.sources and val_fraction in its config.yaml")
    with torch.no_grad():
        lookup = model.quantizer.lookup
        probe = fit_linear_probe(lookup(torch.from_numpy(train_t)), train_y)
        pred = probe.predict(lookup(torch.from_numpy(val_t)))
    return ProbeResult(
        train_residues=len(train_t),
        val_residues=len(val_t),
        accuracy=accuracy(pred, val_y),
        macro_f1=macro_f1(pred, val_y),
        majority=majority_accuracy(train_y, val_y),
        mi_bits=mutual_information_bits(val_t, val_y),
        sse_entropy_bits=entropy_bits(val_y),
        codes_used=len(np.unique(val_t)),
    )


# -- tables ------------------------------------------------------------------------------------
COLUMNS = (  # (ProbeResult attribute, header, format)
    ("accuracy", "probe accuracy", "{:.3f}"),
    ("macro_f1", "probe macro-F1", "{:.3f}"),
    ("majority", "majority floor", "{:.3f}"),
    ("mi_bits", "MI (bits)", "{:.3f}"),
    ("mi_fraction", "MI / H(SSE)", "{:.3f}"),
    ("codes_used", "codes used (val)", "{:.0f}"),
)


def _residues(results: list[ProbeResult]) -> str:
    counts = sorted({(r.train_residues, r.val_residues) for r in results})
    return ", ".join(f"{t} / {v}" for t, v in counts)


def tables(results: dict[str, list[tuple[Path, ProbeResult]]]) -> str:
    """Markdown: one row per NAME (mean ± sd over its runs), then one row per run."""
    head = " | ".join(h for _, h, _ in COLUMNS)
    rule = "|---" * (len(COLUMNS) + 2) + "|"
    groups = []
    for name, runs in results.items():
        rs = [r for _, r in runs]
        label = name if len(rs) == 1 else f"{name} ({len(rs)} runs)"
        metrics = [{key: float(getattr(r, key)) for key, _, _ in COLUMNS} for r in rs]
        groups.append(Group((label, _residues(rs)), metrics))
    lines = [mean_sd_table(("run", "residues (train / val)"), groups, COLUMNS)]
    lines += ["", f"| run | directory | residues (train / val) | {head} |", "|---" + rule]
    for name, runs in results.items():
        for run_dir, r in runs:
            cells = [fmt.format(float(getattr(r, key))) for key, _, fmt in COLUMNS]
            lines.append(f"| {name} | {run_dir} | {_residues([r])} | " + " | ".join(cells) + " |")
    entropy = sorted({f"{r.sse_entropy_bits:.3f}" for rs in results.values() for _, r in rs})
    lines += ["", "Secondary structure: P-SEA (biotite annotate_sse) helix/strand/coil. Linear "
              "probe on each residue's codebook vector, trained on the train split, scored on "
              "the validation split; majority floor: the most frequent training label. MI: "
              f"plug-in I(token; SSE) on the validation split, H(SSE) = {', '.join(entropy)} "
              "bits."]
    return "\n".join(lines)


def _probe(argv: list[str] | None) -> None:
    from rich.console import Console
    from rich.progress import Progress

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR[,RUN_DIR...] (several: seeds)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    runs = parse_runs(args.runs, made_by="make protein-sample")
    for dirs in runs.values():  # every path checked before minutes of tokenizing
        for run_dir in dirs:
            check_run_dir(run_dir)
    results: dict[str, list[tuple[Path, ProbeResult]]] = {}
    with Progress(console=Console(stderr=True), transient=True) as progress:
        overall = progress.add_task("runs", total=sum(map(len, runs.values())))
        for name, dirs in runs.items():
            for run_dir in dirs:
                results.setdefault(name, []).append((run_dir, probe_run(run_dir, progress)))
                progress.advance(overall)
    text = tables(results)
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, _probe, argv)


if __name__ == "__main__":
    main()
