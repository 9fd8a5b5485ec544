import pytest
import torch

from provq_lightning.search import nearest_code, rows_per_chunk


def off_centre(n=6000, k=512, d=8, offset=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = offset + 0.5 * torch.randn(n, d, generator=g)
    codes = z[torch.randperm(n, generator=g)[:k]] + 0.01 * torch.randn(k, d, generator=g)
    return z, codes


def fp64_reference(z, codes):
    return torch.cdist(z.double(), codes.double()).argmin(dim=1)


@pytest.fixture
def medium_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(previous)


def test_bf16_autocast_and_medium_precision_match_fp64(medium_precision):
    z, codes = off_centre()
    ref = fp64_reference(z, codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The naive expansion under autocast really does go wrong on this data ...
        naive = (-2 * z @ codes.t() + (codes * codes).sum(1)).argmin(dim=1)
        assert (naive != ref).float().mean() > 0.1
        got = nearest_code(z, codes)
    # ... while provq's search agrees with fp64 on every vector.
    assert torch.equal(got, ref)
    assert torch.get_float32_matmul_precision() == "medium"  # restored


def test_bf16_inputs_are_searched_in_fp32():
    z, codes = off_centre(offset=3.0)
    got = nearest_code(z.bfloat16(), codes)
    assert torch.equal(got, fp64_reference(z.bfloat16().float(), codes))


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000, 6000])
def test_chunked_equals_unchunked(chunk_rows):
    z, codes = off_centre(n=3000, k=300, offset=5.0)
    whole = nearest_code(z, codes, chunk_rows=10**9)
    assert torch.equal(nearest_code(z, codes, chunk_rows=chunk_rows), whole)
    assert torch.equal(whole, fp64_reference(z, codes))


def test_chunk_budget_bounds_the_distance_block():
    budget = 64 * 2**20
    rows = rows_per_chunk(16384, budget)
    assert rows * 16384 * 4 <= budget
    assert rows_per_chunk(10**9, budget) == 1  # never zero rows


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match=r"z \(N, D\) and codebook \(K, D\)"):
        nearest_code(torch.zeros(4, 3), torch.zeros(5, 2))
