"""The fused CPU search kernel's build on a full disk: one warning, the torch search, and no
half-written file or build folder left in the cache."""

from __future__ import annotations

import logging

import torch

from provq_lightning.vq import cpu_kernel
from provq_lightning.vq.search import nearest_code


def test_kernel_build_on_a_full_disk_falls_back_and_leaves_nothing(
    tmpfs, monkeypatch, caplog
):
    cache = tmpfs("64k")  # too small for the object file the compiler writes
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(cache))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is None
    (warning,) = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert "No space left on device" in warning  # the compiler's error, not its command line
    # No build folder and no partial module; at most the note of the failure and the (empty,
    # unheld) build lock.
    name = cpu_kernel.module_name()
    assert {p.name for p in cache.iterdir()} <= {f"{name}.failed", f"{name}.lock"}
    # The search still answers, exactly.
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    expected = torch.cdist(z.double(), codes.double()).argmin(dim=1)
    assert torch.equal(nearest_code(z, codes), expected)
