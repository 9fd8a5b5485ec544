import pytest
import torch

from provq_lightning.kmeans import kmeans, kmeans_plus_plus


def blobs(k=8, per=200, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, d, generator=g)
    x = centres.repeat_interleave(per, 0) + 0.1 * torch.randn(k * per, d, generator=g)
    return x, centres


def test_recovers_separated_clusters():
    x, centres = blobs()
    result = kmeans(x, 8, seed=0)
    # Every true centre has a found centre next to it.
    assert torch.cdist(centres, result.centers).min(dim=1).values.max() < 0.1
    assert result.inertia == pytest.approx(float((0.1**2) * x.numel()), rel=0.2)


def test_deterministic_for_a_seed():
    x, _ = blobs(seed=1)
    a, b = kmeans(x, 12, seed=3), kmeans(x, 12, seed=3)
    assert torch.equal(a.centers, b.centers)


def test_kmeans_plus_plus_picks_distinct_points():
    x, _ = blobs(k=5, per=50)
    c = kmeans_plus_plus(x, 5, torch.Generator().manual_seed(0), batch=1)
    # With D^2 sampling and far-apart blobs, one centre lands in each blob.
    assert torch.cdist(c, c).add(torch.eye(5) * 1e9).min() > 5


def test_empty_clusters_are_reseeded():
    x, _ = blobs(k=4, per=50)
    init = x[[0, 50, 100]].clone()
    init = torch.cat([init, torch.full((1, 3), 1e4)])  # a centre no point is near: empty
    result = kmeans(x, 4, init=init)
    assert result.reseeded >= 1
    # After re-seeding, the fourth blob gets its own centre: inertia is noise-level only.
    assert result.inertia == pytest.approx(float((0.1**2) * x.numel()), rel=0.3)


def test_too_few_vectors_is_an_actionable_error():
    with pytest.raises(ValueError, match="at least as many vectors as codes.*kmeans_samples"):
        kmeans(torch.randn(5, 2), 8)
