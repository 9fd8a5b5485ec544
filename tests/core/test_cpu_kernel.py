"""The fused CPU search kernel: same answers as the torch path, and every way it can fail
to build or load falls back to the torch search with one warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from provq_lightning.vq import cpu_kernel
from provq_lightning.vq.search import PreparedCodes, blocked_argmin, prepare_codes

needs_kernel = pytest.mark.skipif(
    cpu_kernel.kernel() is None, reason="the fused CPU kernel could not be built here"
)


def both_paths(a: torch.Tensor, prepared: PreparedCodes, monkeypatch):
    fused = blocked_argmin(a, prepared, rows=64, want_second=True)
    with monkeypatch.context() as m:
        m.setenv(cpu_kernel.ENV_SWITCH, "0")
        plain = blocked_argmin(a, prepared, rows=64, want_second=True)
    return fused, plain


@needs_kernel
@pytest.mark.parametrize(("n", "k", "d"), [(1, 1, 1), (13, 37, 3), (1001, 300, 8), (77, 513, 32)])
def test_kernel_scores_equal_the_torch_blocks(n, k, d, monkeypatch):
    # Odd N (rows left over from the 8-row steps) and K (padding inside the last 16 codes).
    g = torch.Generator().manual_seed(n + k + d)
    codes = torch.randn(k, d, generator=g)
    prepared = prepare_codes(codes)
    a = torch.randn(n, d, generator=g) - prepared.shift
    (fi, fb, fs), (pi, pb, ps) = both_paths(a, prepared, monkeypatch)
    torch.testing.assert_close(fb, pb, rtol=0, atol=1e-5)
    torch.testing.assert_close(fs, ps, rtol=0, atol=1e-5)
    far = (ps - pb) > 1e-4  # rows whose winner fp32 rounding cannot flip
    assert torch.equal(fi[far], pi[far])
    assert bool((fi < k).all())
    if k == 1:
        assert bool(torch.isinf(fs).all())  # no runner-up


@needs_kernel
def test_kernel_handles_nan_rows_and_exact_ties():
    codes = torch.randn(40, 8)
    codes[33] = codes[5]
    prepared = prepare_codes(codes)
    a = torch.stack([codes[5], torch.full((8,), float("nan"))]) - prepared.shift
    index, best, second = blocked_argmin(a, prepared, rows=64, want_second=True)
    assert int(index[0]) == 5 and float(second[0]) == float(best[0])  # a tie, lowest index
    assert 0 <= int(index[1]) < 40  # NaN: a valid index (the quantizer reports NaN elsewhere)


def test_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert cpu_kernel.kernel() is None
    assert cpu_kernel.nearest_two(torch.zeros(1, 2), torch.zeros(2, 16), torch.zeros(16)) is None


def test_cache_name_depends_on_the_cpu(monkeypatch):
    # -march=native code built on one node type must never load on another.
    monkeypatch.setattr(cpu_kernel, "_cpu_signature", lambda: "fpu sse2 avx2")
    avx2 = cpu_kernel.module_name()
    monkeypatch.setattr(cpu_kernel, "_cpu_signature", lambda: "fpu sse2 avx2 avx512f")
    assert cpu_kernel.module_name() != avx2


@pytest.fixture
def fresh_state(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    return tmp_path


def test_failed_build_falls_back_with_one_warning_and_leaves_no_files(
    fresh_state, monkeypatch, caplog
):
    import torch.utils.cpp_extension as ext

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(ext, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is None
        assert cpu_kernel.kernel() is None  # decided once per process
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1
    assert "command not found" in unavailable[0].getMessage()
    assert "PROVQ_CPU_KERNEL=0" in unavailable[0].getMessage()
    # The temporary build folder is gone; only the note of the failure stays.
    (marker,) = fresh_state.iterdir()
    assert marker.name == f"{cpu_kernel.module_name()}.failed"
    assert "command not found" in marker.read_text()
    # The search itself still answers, on the torch path.
    codes = torch.randn(20, 4)
    prepared = prepare_codes(codes)
    index, _, _ = blocked_argmin(codes[:3] - prepared.shift, prepared, 64, want_second=True)
    assert index.tolist() == [0, 1, 2]


def test_other_processes_do_not_repeat_a_failed_build(fresh_state, monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    builds = []

    def failing_build(*args, **kwargs):
        builds.append(1)
        raise RuntimeError("c++: error: unrecognized command-line option '-march=native'")

    monkeypatch.setattr(ext, "load", failing_build)
    assert cpu_kernel.kernel() is None
    monkeypatch.setattr(cpu_kernel, "_state", {})  # a new process
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is None
    assert len(builds) == 1
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "-march=native" in warning and "an earlier build" in warning and ".failed" in warning


def test_build_folders_of_killed_builds_are_removed_later(fresh_state, monkeypatch):
    import os
    import time

    import torch.utils.cpp_extension as ext

    old = fresh_state / "provq_nearest_two_0123-abcd"  # a build killed two hours ago
    recent = fresh_state / "provq_nearest_two_0123-efgh"  # another process building now
    for path in (old, recent):
        path.mkdir()
        (path / "nearest_two.o").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    def failing_build(*args, **kwargs):
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(ext, "load", failing_build)
    assert cpu_kernel.kernel() is None
    assert not old.exists()
    assert recent.exists()


def test_a_kernel_that_fails_its_self_check_is_not_used(fresh_state, monkeypatch):
    def wrong(a, codes_t, half_sq):
        n = a.shape[0]
        return torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n)

    fake = SimpleNamespace(nearest_two=wrong)
    monkeypatch.setattr(cpu_kernel, "_build", lambda name, target: fake)
    assert cpu_kernel.kernel() is None


def test_a_corrupt_cached_file_falls_back(fresh_state, monkeypatch):
    target = fresh_state / f"{cpu_kernel.module_name()}{cpu_kernel.EXTENSION_SUFFIX}"
    target.write_bytes(b"not a shared object")
    assert cpu_kernel.kernel() is None
