"""Run ``provq-fit`` in child processes, alone or as a 2-process gloo DDP job.

Children are forked from a ``multiprocessing`` fork server that has already imported torch,
Lightning and provq, so a run costs its training time rather than ~5 s of imports; each child
then runs exactly what the ``provq-fit`` entry point runs (``provq_lightning.tools.fit.main``). A
child may SIGKILL itself (``tests.core.helpers.KillAtStep``); its exit code is then
``-SIGKILL``.

DDP ranks are launched externally, the way a cluster scheduler would, with the environment
Lightning's ``LightningEnvironment`` reads: ``MASTER_ADDR``/``MASTER_PORT``, ``WORLD_SIZE``,
``NODE_RANK`` and ``LOCAL_RANK`` (its presence tells Lightning not to spawn processes itself).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRELOAD = [
    "torch",
    "lightning.pytorch",
    "provq_lightning.tools.fit",
    "provq_lightning.topodisc",
    "provq_lightning.datamodules.topodisc",
    "provq_lightning.callbacks.curriculum",
    "tests.core.helpers",
    "tests.distributed.models",
    "tests.distributed.collectives",
]
# The two ways of getting 2 gloo processes: 2 devices on one node, or 2 nodes of 1 device each
# (the multi-node path, NODE_RANK set, on one machine).
LAUNCH_MODES = ("devices2", "nodes2")

_context: mp.context.ForkServerContext | None = None


def forkserver() -> mp.context.ForkServerContext:
    """The fork-server context, its server preloading torch, Lightning and provq."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        # Only takes effect if the fork server is not running yet; otherwise children just
        # import these themselves.
        _context.set_forkserver_preload(PRELOAD)
    return _context


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # A run inside a SLURM job or torchrun must still use the environment given here:
    # Lightning would otherwise detect the outer cluster and take its ranks from it.
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        del os.environ[key]
    os.environ.update(env)
    os.chdir(REPO)
    import torch

    torch.set_num_threads(1)  # 2 shared cores; also what OMP_NUM_THREADS=1 would give
    from provq_lightning.tools.fit import main

    main(argv)


def _start(argv: list[str], env: dict[str, str], log: Path) -> mp.Process:
    proc = forkserver().Process(target=_child, args=(argv, env, str(log)), daemon=False)
    proc.start()
    return proc


def join(procs: Sequence[mp.Process], timeout: float) -> list[int]:
    """Exit codes of ``procs``; kills them all and raises if one outlives ``timeout``."""
    codes = []
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():  # a hung collective: do not leave it behind, fail instead
            for other in procs:
                if other.is_alive():
                    other.kill()
                    other.join()
            raise TimeoutError(f"a child process did not finish within {timeout}s")
        codes.append(proc.exitcode)
    return codes


def fit(argv: list[str], log: Path, timeout: float = 240) -> int:
    """``provq-fit`` with ``argv`` in one process; returns its exit code."""
    return join([_start(argv, {"OMP_NUM_THREADS": "1"}, log)], timeout)[0]


def ddp_fit(
    argv: list[str],
    logs: Sequence[Path],
    mode: str = "devices2",
    timeout: float = 240,
    strategy: str = "ddp_find_unused_parameters_true",
) -> list[int]:
    """``provq-fit`` with ``argv`` as 2 gloo DDP processes (``mode`` in ``LAUNCH_MODES``).

    Returns the exit codes of rank 0 and rank 1; ``logs`` gets each rank's output.
    """
    if mode not in LAUNCH_MODES:
        raise ValueError(f"mode must be one of {LAUNCH_MODES}, got {mode!r}")
    devices, nodes = (2, 1) if mode == "devices2" else (1, 2)
    argv = [
        *argv,
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        f"--trainer.num_nodes={nodes}",
        f"--trainer.strategy={strategy}",
    ]
    port = free_port()
    procs = []
    for rank, log in enumerate(logs):
        env = {
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": str(rank if mode == "nodes2" else 0),
            "LOCAL_RANK": str(rank if mode == "devices2" else 0),
        }
        procs.append(_start(argv, env, log))
    return join(procs, timeout)
