import math

import pytest
import torch

from provq_lightning.vq.codebook_metrics import (
    CodebookUsage,
    mean_pairwise_distance,
    usage_statistics,
)


def test_usage_statistics_of_a_known_histogram():
    stats = usage_statistics(torch.tensor([2, 2, 0, 0]))
    assert float(stats["utilization"]) == 0.5
    assert float(stats["perplexity"]) == pytest.approx(2.0)  # exp(ln 2)
    assert float(stats["normalized_perplexity"]) == pytest.approx(0.5)
    assert float(stats["dead_codes"]) == 2
    skewed = usage_statistics(torch.tensor([3, 1]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(skewed["perplexity"]) == pytest.approx(math.exp(h), rel=1e-6)


def test_histogram_accumulates_over_the_whole_set_not_per_batch():
    metric = CodebookUsage(8)
    metric.update(torch.tensor([0, 1]))
    metric.update(torch.tensor([2, 3]))
    # Per-batch averaging would report 2/8; the set uses 4 codes.
    assert float(metric.compute()["utilization"]) == 0.5
    metric.update(torch.tensor([[4, 5], [6, 7]]), mask=torch.tensor([[True, True], [False, False]]))
    assert float(metric.compute()["utilization"]) == 0.75  # masked ids are padding


def test_out_of_range_ids_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        CodebookUsage(4).update(torch.tensor([4]))


def test_mean_pairwise_distance_matches_brute_force():
    codes = torch.randn(37, 5)
    d = torch.cdist(codes.double(), codes.double())
    brute = d.sum() / (37 * 36)
    assert float(mean_pairwise_distance(codes, chunk_rows=8)) == pytest.approx(
        float(brute), rel=1e-5
    )
    used = torch.zeros(37, dtype=torch.bool)
    used[[0, 5, 9]] = True
    sub = d[used][:, used].sum() / 6
    assert float(mean_pairwise_distance(codes, used)) == pytest.approx(float(sub), rel=1e-5)
    assert float(mean_pairwise_distance(codes[:1])) == 0.0
