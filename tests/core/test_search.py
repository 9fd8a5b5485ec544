import pytest
import torch

from provq_lightning.vq import cpu_kernel
from provq_lightning.vq.search import nearest_code, rows_per_chunk


@pytest.fixture(autouse=True, params=["fused_cpu_kernel", "torch_blocks"])
def search_path(request, monkeypatch):
    """Every test runs on both CPU paths: the compiled kernel and the blocked torch search."""
    if request.param == "torch_blocks":
        monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    elif cpu_kernel.kernel() is None:
        pytest.skip("the fused CPU kernel could not be built here (see the warning above)")
    else:
        monkeypatch.setattr(cpu_kernel, "MIN_PAIRS", 0)  # the kernel at every size here
    return request.param


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


def near_ties(n=1500, offset=8.0, radius=0.05, seed=0):
    """Every row has two codes at the same fp64 radius along different directions: once the codes
    are rounded to fp32 their distances differ by about one fp32 ulp of the distance, which
    only an exact computation can order."""
    g = torch.Generator().manual_seed(seed)
    z = (offset + torch.randn(n, 8, generator=g, dtype=torch.float64)).float()
    directions = torch.nn.functional.normalize(torch.randn(2, n, 8, generator=g).double(), dim=-1)
    pair = (z.double() + radius * directions).float()  # (2, n, 8): rounding decides the winner
    far = (offset + 3 * torch.randn(500, 8, generator=g)).float()
    codes = torch.cat([pair[0], pair[1], far])
    exact = (z.double()[:, None] - codes.double()[None]).pow(2).sum(-1)
    top2 = exact.topk(2, dim=1, largest=False).values
    decided = top2[:, 1] > top2[:, 0]  # rows that are not exact ties in fp64
    return z, codes, exact.argmin(dim=1), decided


def test_adversarial_near_ties_are_decided_by_fp64():
    z, codes, exact, decided = near_ties()
    assert decided.float().mean() > 0.95
    # fp32 arithmetic alone gets a good share of these rows wrong ...
    naive = torch.cdist(z, codes).argmin(dim=1)
    assert (naive != exact)[decided].float().mean() > 0.05
    # ... while the bound sends them to the fp64 re-score, which orders them like fp64 does.
    got = nearest_code(z, codes)
    assert torch.equal(got[decided], exact[decided])
    assert torch.equal(got[decided], fp64_reference(z, codes)[decided])


def test_duplicate_codes_resolve_to_the_lowest_index():
    z, codes = off_centre(n=400, k=50, offset=2.0)
    codes = torch.cat([codes, codes.flip(0)])  # code j and code 99 - j are identical
    got = nearest_code(z, codes)
    assert bool((got < 50).all())
    assert torch.equal(got, fp64_reference(z, codes))
    same = nearest_code(z, torch.ones(64, 8))  # a collapsed codebook: every row is a tie
    assert bool((same == 0).all())


def test_fp64_inputs_match_fp64_reference():
    z, codes = off_centre(n=2000, k=700, offset=30.0)
    z = z.double() + 1e-9 * torch.randn(z.shape, dtype=torch.float64)  # not fp32-representable
    assert torch.equal(nearest_code(z, codes.double()), fp64_reference(z, codes))


@pytest.mark.parametrize("budget", [4096, 2**16, 2**20])
def test_small_memory_budgets_give_the_same_answer(budget):
    z, codes = off_centre(n=3000, k=1500, offset=5.0)
    assert torch.equal(nearest_code(z, codes, max_chunk_bytes=budget), fp64_reference(z, codes))
