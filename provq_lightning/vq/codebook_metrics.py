"""Codebook health metrics shared by every modality.

Usage statistics are accumulated as one code histogram over the whole evaluation set (summed
across DDP ranks by torchmetrics), never averaged per batch: a per-batch average of utilisation
understates how many codes a set actually uses.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

# Every codebook metric a modality logs per evaluation split, as ``<split>/<name>``: the usage
# statistics below plus the codebook geometry ``VQTokenizer.codebook_metrics`` adds.
CODEBOOK_METRIC_NAMES = (
    "utilization",
    "perplexity",
    "normalized_perplexity",
    "dead_codes",
    "codebook_distance",
    "codebook_distance_used",
)

# (metric key, column title, format) of the codebook metrics in every results table.
CODEBOOK_REPORT_COLUMNS = (
    ("val/utilization", "utilization", "{:.1%}"),
    ("val/normalized_perplexity", "norm. perplexity", "{:.3f}"),
    ("val/perplexity", "perplexity", "{:.1f}"),
    ("val/dead_codes", "dead codes", "{:.0f}"),
    ("val/codebook_distance_used", "mean dist. used codes", "{:.3f}"),
)


def usage_statistics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Utilisation, perplexity exp(H) (natural log), exp(H)/K and dead codes of a histogram."""
    counts = counts.double()
    k = counts.numel()
    total = counts.sum()
    used = (counts > 0).sum()
    if total > 0:
        p = counts / total
        nz = p[p > 0]
        entropy = -(nz * nz.log()).sum()
    else:
        entropy = counts.new_zeros(())
    perplexity = entropy.exp() if total > 0 else counts.new_zeros(())
    return {
        "utilization": (used.double() / k).float(),
        "perplexity": perplexity.float(),
        "normalized_perplexity": (perplexity / k).float(),
        "dead_codes": (k - used).float(),
    }


@torch.no_grad()
def mean_pairwise_distance(
    codebook: torch.Tensor, used_mask: torch.Tensor | None = None, chunk_rows: int = 1024
) -> torch.Tensor:
    """Mean Euclidean distance over all unordered pairs of distinct codes.

    Computed in row chunks so K = 16384 never materialises the full K x K matrix.
    ``used_mask`` restricts it to a subset (e.g. codes used on the validation set).
    """
    codes = codebook.detach().float()
    if used_mask is not None:
        codes = codes[used_mask.to(codes.device)]
    k = codes.shape[0]
    if k < 2:
        return codes.new_zeros(())
    total = codes.new_zeros((), dtype=torch.float64)
    for start in range(0, k, chunk_rows):
        block = torch.cdist(
            codes[start : start + chunk_rows], codes, compute_mode="donot_use_mm_for_euclid_dist"
        )
        total += block.double().sum()
    # Each unordered pair is counted twice; the diagonal contributes zeros.
    return (total / (k * (k - 1))).float()


class CodebookUsage(Metric):
    """Histogram of code ids over an evaluation set, reduced across ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_codes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_codes = num_codes
        self.add_state(
            "counts", default=torch.zeros(num_codes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        ids = indices if mask is None else indices[mask.bool()]
        ids = ids.reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(
                f"code ids must lie in [0, {self.num_codes}); got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        self.counts += torch.bincount(ids, minlength=self.num_codes)

    def compute(self) -> dict[str, torch.Tensor]:
        """Usage statistics plus ``histogram``, the reduced counts themselves."""
        return {**usage_statistics(self.counts), "histogram": self.counts.clone()}
