import pytest
import torch

from provq_lightning.vq.kmeans import kmeans, kmeans_plus_plus, sorted_cluster_sums


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


def plain_lloyd(x, centers, iters):
    """Textbook Lloyd with provq's empty-cluster rule: every row searched every iteration."""
    centers = centers.clone()
    for _ in range(iters):
        index = torch.cdist(x.double(), centers.double()).argmin(dim=1)
        sq = (x - centers[index]).pow(2).sum(dim=1)
        counts = torch.bincount(index, minlength=len(centers))
        sums = torch.zeros_like(centers).index_add_(0, index, x)
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1)
        empty = (~nonempty).nonzero().squeeze(1)
        centers[empty] = x[sq.topk(len(empty)).indices]
    return centers


@pytest.mark.parametrize("fused_kernel", ["1", "0"])
def test_skipping_rows_by_bounds_equals_plain_lloyd(fused_kernel, monkeypatch):
    monkeypatch.setenv("PROVQ_CPU_KERNEL", fused_kernel)  # both CPU search paths
    monkeypatch.setattr("provq_lightning.vq.cpu_kernel.MIN_PAIRS", 0)  # at this small size too
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3000, 4, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    init = x[torch.randperm(3000, generator=g)[:40]].clone()
    result = kmeans(x, 40, iters=12, tol=0.0, init=init)
    assert result.iterations == 12
    torch.testing.assert_close(result.centers, plain_lloyd(x, init, 12), rtol=0, atol=1e-5)


def test_sorted_cluster_sums_equal_index_add():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=g)
    index = torch.randint(0, 300, (5000,), generator=g)
    index[index == 7] = 8  # an empty cluster
    expected = torch.zeros(300, 6).index_add_(0, index, x)
    torch.testing.assert_close(sorted_cluster_sums(x, index, 300), expected, rtol=0, atol=1e-5)


def test_many_centres_are_seeded_in_doubling_rounds_deterministically():
    x, _ = blobs(k=20, per=100, d=4, seed=2)
    a = kmeans_plus_plus(x, 300, torch.Generator().manual_seed(5))
    b = kmeans_plus_plus(x, 300, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # Drawn without replacement from the data: 300 distinct data points.
    assert torch.unique(a, dim=0).shape[0] == 300
    is_row = (a[:, None, :] == x[None, :, :]).all(dim=-1)
    assert bool(is_row.any(dim=1).all())
    # Every blob gets centres, roughly in proportion (D^2 sampling after the first 16).
    per_blob = torch.bincount(is_row.float().argmax(dim=1) // 100, minlength=20)
    assert int(per_blob.min()) >= 3
