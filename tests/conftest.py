import pytest


@pytest.fixture(scope="session", autouse=True)
def cpu_search_kernel_built():
    """Build (or load) the fused CPU search kernel once, before any test starts a subprocess:
    otherwise the first training subprocess would compile it and print its one-time notice."""
    from provq_lightning.vq import cpu_kernel

    cpu_kernel.kernel()
