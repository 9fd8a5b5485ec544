"""The fused CPU nearest-code kernel (``csrc/nearest_two.cpp``), compiled once per machine.

provq's exact search on CPU tensors otherwise runs an sgemm that writes every score block and a
second pass that reads it back; the fused kernel keeps the best and runner-up scores in
registers instead, about 2x faster (benchmarks/README.md). It is compiled with the C++ compiler
torch's extension builder finds (about 30 s; minutes on a busy machine) by ``make install``
(``python -m provq_lightning.vq.cpu_kernel --build``), or else by the first search that needs
it, then loaded from a cache: ``$PROVQ_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/provq/kernels``
(``~/.cache/provq/kernels``).

When it is used: only for searches of at least ``MIN_PAIRS`` rows x codes. Below that it saves
at most about 0.4 ms a call (``python benchmarks/bench_quantizer.py --small``), so a 30 s build
would take some 80,000 calls to pay back; such problems (TopoDisc: 675 x 32) keep the torch
search and never trigger a build.

Reliability rules:
* the cached file's name hashes the source, the compile flags, torch's and Python's versions
  and the CPU's instruction-set flags: ``-march=native`` code built on one node type is never
  loaded on another (a shared home directory on a mixed cluster would otherwise crash with
  SIGILL);
* one build per machine: the builder holds ``<name>.lock`` (``flock``) in the cache. A process
  that finds the lock held does not wait: it keeps the torch search and looks again every
  ``BUSY_RECHECK_SECONDS``, loading the kernel once the build is done (the search is exact
  either way, so nothing but speed changes). Only the builder announces the build, in one
  line. The lock dies with its process, so a killed build never blocks the next one;
* the builder compiles in its own temporary folder and moves the result into the cache
  atomically, so no process ever sees a half-written file (a killed build's folder is removed
  by a later build, an hour later or more);
* the build records the file's size and sha256 beside it (``<name>.sha256``); a cached file
  that does not match (cut short by a copy or sync of the home directory, replaced, or from
  before the record existed) is rebuilt instead of loaded: loading a truncated shared object
  kills the process with SIGBUS, which no ``except`` can catch;
* after loading, the kernel must agree with an fp64 argmin on a small problem with ties;
* any failure (no compiler, a failed build or self-check) logs one warning and provq keeps its
  torch search; torch's builder's own messages (banners, compiler checks) are kept off the
  console. A failure is noted next to the cache entry (``<name>.failed``), so other processes
  do not repeat a failing build for a day; a build interrupted by a signal (Ctrl-C,
  ``scancel``) is not a failure and is simply retried by the next process. No C++ compiler is
  one line saying how to point at one. ``PROVQ_CPU_KERNEL=0`` turns the kernel off.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import io
import logging
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "nearest_two.cpp"
ENV_SWITCH = "PROVQ_CPU_KERNEL"
ENV_CACHE = "PROVQ_KERNEL_CACHE"
LANES = 16  # codes per vector step in the kernel: K is padded to a multiple of this
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
STALE_BUILD_SECONDS = 3600
RETRY_FAILED_BUILD_SECONDS = 24 * 3600
CACHE_LAYOUT = "recorded-1"  # a cached file comes with <name>.sha256 (size and sha256)
# Rows x codes of the smallest search that uses the kernel (`bench_quantizer.py --small`).
# Below it the kernel saves at most about 0.4 ms a call (8k-33k pairs), so a 30 s build pays
# back only after some 80,000 calls, more than runs of that size make (TopoDisc, 675 x 32 every
# step: 0.2 ms a call, about 0.6 s in 3000 steps). At 2^16 pairs it saves about 1 ms a call,
# from 2^17 pairs 0.6 ms to 10 ms.
MIN_PAIRS = 2**16
# How often a process that found another one building looks again for the finished kernel.
BUSY_RECHECK_SECONDS = 10.0
ANNOUNCE = (
    "provq: compiling the CPU search kernel once for this machine (~30 s) into {dir}; "
    "set {switch}=0 to skip"
)

_state: dict[str, Any] = {}


def enabled() -> bool:
    """False when ``PROVQ_CPU_KERNEL`` is ``0``/``false``/``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def pays_off(rows: int, codes: int) -> bool:
    """Whether a search of ``rows`` x ``codes`` is large enough to use (and build) the kernel."""
    return rows * codes >= MIN_PAIRS


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "provq" / "kernels"


def _cpu_signature() -> str:
    """The instruction-set flags of this CPU (Linux), else the machine and processor names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def openmp_flags() -> list[str]:
    """``-fopenmp`` when torch itself runs its CPU threads on GNU OpenMP (Linux wheels): the
    kernel's ``at::parallel_for`` is then parallel, on the libgomp torch already loaded, and
    ``torch.set_num_threads`` governs it. Elsewhere the kernel stays on one thread (without
    ``_OPENMP`` ATen's inline ``parallel_for`` calls its body serially)."""
    info = torch.__config__.parallel_info()
    gnu = platform.system() == "Linux" and "ATen parallel backend: OpenMP" in info
    return ["-fopenmp"] if gnu else []


def compile_flags() -> tuple[list[str], list[str]]:
    """The compiler and linker flags of the build (part of the cache name)."""
    omp = openmp_flags()
    return ["-O3", "-march=native", *omp], omp


def module_name() -> str:
    digest = hashlib.sha256()
    cflags, ldflags = compile_flags()
    digest.update(" ".join([*cflags, "|", *ldflags]).encode())  # a flag change is a new build
    # CACHE_LAYOUT: entries of provq versions that wrote no build record are never shared.
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                 CACHE_LAYOUT.encode()):
        digest.update(part)
    digest.update(_cpu_signature().encode())
    return f"provq_nearest_two_{digest.hexdigest()[:16]}"


def cached_path() -> Path:
    """Where this machine's kernel is cached."""
    return cache_dir() / f"{module_name()}{EXTENSION_SUFFIX}"


def _import_file(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` wheel provq depends on lives in
    this interpreter's scripts folder, which is not on PATH when a venv is not activated."""
    scripts = sysconfig.get_path("scripts")
    previous = os.environ.get("PATH", "")
    if shutil.which("ninja") is None and scripts:
        os.environ["PATH"] = scripts + os.pathsep + previous
    try:
        yield
    finally:
        os.environ["PATH"] = previous


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _quiet_torch_builder() -> Iterator[None]:
    """Keeps torch's extension builder off the console: its import banner ("No CUDA runtime is
    found ..."), compiler checks and warnings go to this module's debug log instead. What
    matters when a build fails is in the exception, which the caller reports in one line."""
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    collect = _Collect()
    propagate = builder_log.propagate
    builder_log.addHandler(collect)
    builder_log.propagate = False
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            warnings.simplefilter("always")
            yield
    finally:
        builder_log.removeHandler(collect)
        builder_log.propagate = propagate
        for line in [*collect.lines, *(str(w.message) for w in caught), printed.getvalue()]:
            if line.strip():
                log.debug("torch extension builder: %s", line.strip())


def _remove_stale_builds(folder: Path) -> None:
    """Build folders of processes killed mid-build: older than any build takes, so no other
    process is still using them."""
    cutoff = time.time() - STALE_BUILD_SECONDS
    for path in folder.glob("provq_nearest_two_*-*"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


class BuildInterrupted(RuntimeError):
    """The compiler was stopped by a signal: not a property of this machine, retry later."""


def record_path(target: Path) -> Path:
    """Where the size and sha256 of the cached file ``target`` are recorded."""
    return target.with_name(target.name.split(".")[0] + ".sha256")


def lock_path(target: Path) -> Path:
    """The file whose ``flock`` the builder of ``target`` holds."""
    return target.with_name(target.name.split(".")[0] + ".lock")


def _fingerprint(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def cached_file_is_whole(target: Path) -> bool:
    """True when ``target`` is exactly the file its build recorded (size and sha256)."""
    try:
        return record_path(target).read_text().strip() == _fingerprint(target)
    except OSError:
        return False


def _compiler() -> str:
    """The C++ compiler torch's builder will run; one line naming the fix when there is none."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"no C++ compiler found ({compiler!r} is not on PATH); install one (e.g. "
            "`apt-get install g++`) or set CXX=/path/to/g++"
        )
    return compiler


def _interrupted(err: BaseException) -> bool:
    """A build stopped by a signal (the compiler or ninja killed), not one that failed."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = getattr(err, "returncode", None)
        if isinstance(code, int) and (code < 0 or code in (130, 137, 143)):
            return True
        if "interrupted by user" in str(err):  # ninja's words when it gets SIGINT/SIGTERM
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def _build_lock(target: Path, wait: bool) -> Iterator[bool]:
    """Holds the build lock of ``target`` inside the block and yields True; yields False at
    once when another process holds it (unless ``wait``). Where ``flock`` is unavailable (no
    ``fcntl``, or a file system without locks) it yields True unlocked: the atomic move still
    keeps every reader safe, at worst two processes build."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(lock_path(target), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as err:
            log.debug("no build lock on %s (%s); building unlocked", target.parent, err)
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(name: str, build: Path) -> tuple[ModuleType, Path]:
    """torch's builder on ``SOURCE`` in the folder ``build``: the module it built and loaded,
    and the file it built (not ``module.__file__``, which names the first file loaded under
    this name in the process)."""
    with _quiet_torch_builder(), _ninja_on_path():
        from torch.utils.cpp_extension import LIB_EXT, load

        cflags, ldflags = compile_flags()
        module = load(
            name,
            [str(SOURCE)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build),
            verbose=False,
        )
    return module, build / f"{name}{LIB_EXT}"


def _build(name: str, target: Path) -> ModuleType:
    """Compiles the kernel into ``target`` (call holding the build lock)."""
    _compiler()
    _remove_stale_builds(target.parent)
    build = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=target.parent))
    try:
        # Straight to stderr, not through logging: a handler anywhere up the logger tree
        # (a user's file log) would otherwise take the one line that says why a run stalls.
        print(ANNOUNCE.format(dir=target.parent, switch=ENV_SWITCH), file=sys.stderr, flush=True)
        try:
            module, built = _compile(name, build)
        except Exception as err:  # Ctrl-C itself (KeyboardInterrupt) still stops the program
            if _interrupted(err):
                reason = failure_reason(err)
                raise BuildInterrupted(f"the build was interrupted ({reason})") from err
            raise
        # The record first, then the file: a reader sees no file, or a whole one it can verify.
        record = build / "record.tmp"
        record.write_text(_fingerprint(built) + "\n")
        os.replace(record, record_path(target))
        os.replace(built, target)  # atomic: readers see no file or a whole one
        return module
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _self_check(module: ModuleType) -> None:
    """The kernel against a plain fp64 argmin, with exact ties and K not a multiple of 16."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(37, 5, generator=g)
    codes[20] = codes[3]  # an exact tie: the lower index must win
    a = torch.cat([torch.randn(29, 5, generator=g), codes[3:4], codes[36:37]])
    codes_t, half_sq = pad_codes(codes, 0.5 * (codes * codes).sum(dim=1))
    index, best, second = module.nearest_two(a.contiguous(), codes_t, half_sq)
    scores = (0.5 * codes.double().pow(2).sum(1)) - a.double() @ codes.double().t()
    expected = scores.argmin(dim=1)
    top2 = scores.topk(2, dim=1, largest=False).values
    close = (best.double() - top2[:, 0]).abs().max() < 1e-4
    close = close and (second.double() - top2[:, 1]).abs().max() < 1e-4
    if not (torch.equal(index, expected) and close):
        raise RuntimeError("self-check: kernel results differ from the fp64 reference")


def pad_codes(codes: torch.Tensor, half_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` (K x D, fp32, already shifted) and their ``half_sq`` ``|c|^2 / 2`` (K) as the
    kernel's ``codes_t`` (D x K_pad) and ``half_sq`` (K_pad) with ``+inf`` on the padding, so
    padding never wins."""
    k, d = codes.shape
    padded = -(-max(k, 1) // LANES) * LANES
    codes_t = torch.zeros(d, padded, dtype=torch.float32)
    codes_t[:, :k] = codes.t()
    padded_half_sq = torch.full((padded,), float("inf"), dtype=torch.float32)
    padded_half_sq[:k] = half_sq
    return codes_t, padded_half_sq


def failure_reason(err: BaseException) -> str:
    """The line of a failure that says what went wrong: for a failed build the compiler's
    first error (full disk, missing header, ...), not the long command line torch puts first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if "error" in line.lower() and not line.startswith(("Error building extension", "["))
    ]
    text = errors[0] if errors else (lines[-1] if lines else "")
    return text[:240] or type(err).__name__


class _Busy(Exception):
    """Another process holds the build lock: use the torch search for now."""


def _load_or_build(name: str, target: Path, wait: bool) -> ModuleType:
    """The cached kernel when it is whole, else built here (holding the lock); ``_Busy`` when
    another process is building it and ``wait`` is False."""
    if cached_file_is_whole(target):
        return _import_file(name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target, wait) as held:
        if not held:
            raise _Busy
        # Looked at again under the lock: the build that held it may just have finished.
        if cached_file_is_whole(target):
            return _import_file(name, target)
        if target.exists():
            log.warning(
                "provq: the cached CPU search kernel %s does not match its build record (cut "
                "short or replaced); rebuilding it", target
            )
            target.unlink(missing_ok=True)
        return _build(name, target)


def _resolve(wait: bool) -> ModuleType | None:
    """The working kernel or None (failed: one warning); ``_Busy`` passes through."""
    name = module_name()
    target = cache_dir() / f"{name}{EXTENSION_SUFFIX}"
    failed = target.with_name(f"{name}.failed")
    try:
        if _recent_failure(failed) and not target.exists():
            # Every new process would otherwise pay for the same failing build again.
            raise RuntimeError(
                f"{failed.read_text().strip()} (an earlier build; retried a day later, or "
                f"delete {failed} to retry now)"
            )
        module = _load_or_build(name, target, wait)
        _self_check(module)
        return module
    except _Busy:
        raise
    except Exception as err:  # noqa: BLE001 (any failure: fall back, say why once)
        reason = failure_reason(err)
        log.warning(
            "provq: fused CPU search kernel unavailable (%s: %s); using the torch search "
            "(exact too, about 2x slower; %s=0 hides this)",
            type(err).__name__, reason, ENV_SWITCH,
        )
        if not isinstance(err, BuildInterrupted) and not _recent_failure(failed):
            with contextlib.suppress(OSError):
                failed.write_text(reason + "\n")
        return None


def kernel() -> ModuleType | None:
    """The compiled kernel module, or None (switched off, being built by another process, or
    it could not be built/loaded). Decided once per process, except while another process
    builds it: then None, and a look again every ``BUSY_RECHECK_SECONDS``."""
    if not enabled():
        return None
    if "module" in _state:
        return _state["module"]
    if time.monotonic() < _state.get("recheck_at", float("-inf")):
        return None
    try:
        module = _resolve(wait=False)
    except _Busy:
        if "recheck_at" not in _state:
            log.info(
                "provq: another process is compiling the CPU search kernel; using the torch "
                "search until it is ready"
            )
        _state["recheck_at"] = time.monotonic() + BUSY_RECHECK_SECONDS
        return None
    _state["module"] = module
    return module


def _recent_failure(marker: Path) -> bool:
    try:
        return time.time() - marker.stat().st_mtime < RETRY_FAILED_BUILD_SECONDS
    except OSError:
        return False


def nearest_two(
    a: torch.Tensor, codes_t: torch.Tensor, half_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Best index, best score and runner-up score of every row of ``a`` (N x D, fp32 CPU),
    scores ``half_sq[j] - a . codes_t[:, j]``; None when the kernel is unavailable."""
    module = kernel()
    if module is None:
        return None
    index, best, second = module.nearest_two(a.contiguous(), codes_t, half_sq)
    return index, best, second


def main(argv: list[str] | None = None) -> int:
    """``--build``: build (or verify) this machine's kernel now, waiting for a build another
    process is running; ``make install`` runs it so that no training run pays for the build."""
    parser = argparse.ArgumentParser(
        prog="python -m provq_lightning.vq.cpu_kernel",
        description="Build provq's fused CPU search kernel for this machine (once; cached).",
    )
    parser.add_argument("--build", action="store_true", help="build it now unless cached")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    if not enabled():
        print(f"provq: {ENV_SWITCH}=0: the CPU search kernel is switched off; not building it")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = _resolve(wait=True)
    if module is None:  # the reason is the warning just printed
        return 1
    _state["module"] = module
    print(f"provq: CPU search kernel ready ({cached_path()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
