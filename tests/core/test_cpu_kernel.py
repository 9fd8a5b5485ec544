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


@pytest.fixture
def every_size(monkeypatch):
    """The kernel for searches of any size (normally only from ``MIN_PAIRS`` rows x codes)."""
    monkeypatch.setattr(cpu_kernel, "MIN_PAIRS", 0)


def both_paths(a: torch.Tensor, prepared: PreparedCodes, monkeypatch):
    fused = blocked_argmin(a, prepared, rows=64, want_second=True)
    with monkeypatch.context() as m:
        m.setenv(cpu_kernel.ENV_SWITCH, "0")
        plain = blocked_argmin(a, prepared, rows=64, want_second=True)
    return fused, plain


@needs_kernel
@pytest.mark.usefixtures("every_size")
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
@pytest.mark.usefixtures("every_size")
def test_kernel_handles_nan_rows_and_exact_ties():
    codes = torch.randn(40, 8)
    codes[33] = codes[5]
    prepared = prepare_codes(codes)
    a = torch.stack([codes[5], torch.full((8,), float("nan"))]) - prepared.shift
    index, best, second = blocked_argmin(a, prepared, rows=64, want_second=True)
    assert int(index[0]) == 5 and float(second[0]) == float(best[0])  # a tie, lowest index
    assert 0 <= int(index[1]) < 40  # NaN: a valid index (the quantizer reports NaN elsewhere)


@needs_kernel
@pytest.mark.usefixtures("every_size")
def test_codes_do_not_depend_on_the_thread_count():
    # The kernel runs its row blocks on torch's threads; each row's answer is its own.
    g = torch.Generator().manual_seed(7)
    codes = torch.randn(700, 8, generator=g)
    codes[300] = codes[12]  # an exact tie: the lower index at every thread count
    prepared = prepare_codes(codes)
    a = torch.cat([torch.randn(6000, 8, generator=g), codes[12:13]]) - prepared.shift
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(blocked_argmin(a, prepared, rows=4096, want_second=True))
    finally:
        torch.set_num_threads(threads)
    (i1, b1, s1), (i2, b2, s2) = results
    assert torch.equal(i1, i2) and torch.equal(b1, b2) and torch.equal(s1, s2)
    assert int(i1[-1]) == 12


def test_cache_name_depends_on_the_compile_flags(monkeypatch):
    serial = cpu_kernel.module_name()
    monkeypatch.setattr(cpu_kernel, "openmp_flags", lambda: ["-fopenmp", "-DSOMETHING"])
    assert cpu_kernel.module_name() != serial


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
    # The temporary build folder is gone; only the note of the failure (and the empty, unheld
    # build lock) stays.
    (marker,) = [p for p in fresh_state.iterdir() if p.suffix != ".lock"]
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


@pytest.fixture(scope="module")
def built_kernel():
    """The real kernel (built or loaded from the default cache) and its cached file."""
    module = cpu_kernel.kernel()
    if module is None:
        pytest.skip("the fused CPU kernel could not be built here")
    target = cpu_kernel.cache_dir() / f"{cpu_kernel.module_name()}{cpu_kernel.EXTENSION_SUFFIX}"
    return module, target.read_bytes()


def _copying_build(built_kernel, builds):
    """A stand-in for the compiler: writes the real kernel's bytes as a build would."""
    module, data = built_kernel

    def build(name, target):
        builds.append(target)
        staged = target.with_name("staged.so")
        staged.write_bytes(data)
        cpu_kernel.record_path(target).write_text(cpu_kernel._fingerprint(staged) + "\n")
        staged.replace(target)
        return module
    return build


@pytest.mark.parametrize("damage", ["random bytes", "cut short", "no record"])
def test_a_damaged_cached_file_is_rebuilt_not_loaded(
    built_kernel, fresh_state, monkeypatch, caplog, damage
):
    _, data = built_kernel
    target = fresh_state / f"{cpu_kernel.module_name()}{cpu_kernel.EXTENSION_SUFFIX}"
    target.write_bytes(data)
    cpu_kernel.record_path(target).write_text(cpu_kernel._fingerprint(target) + "\n")
    if damage == "random bytes":
        target.write_bytes(b"not a shared object")
    elif damage == "cut short":  # loading this one would kill the process with SIGBUS
        target.write_bytes(data[: len(data) // 2])
    else:  # a cache entry from before the record existed
        cpu_kernel.record_path(target).unlink()
    builds = []
    monkeypatch.setattr(cpu_kernel, "_build", _copying_build(built_kernel, builds))
    imported = []
    monkeypatch.setattr(cpu_kernel, "_import_file", lambda *a: imported.append(a))
    with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is not None
    assert builds == [target] and not imported  # the damaged file was never loaded
    assert "rebuilding" in caplog.text and str(target) in caplog.text
    assert target.read_bytes() == data and cpu_kernel.cached_file_is_whole(target)


def test_a_whole_cached_file_is_loaded_without_a_build(built_kernel, fresh_state, monkeypatch):
    _, data = built_kernel
    target = fresh_state / f"{cpu_kernel.module_name()}{cpu_kernel.EXTENSION_SUFFIX}"
    target.write_bytes(data)
    cpu_kernel.record_path(target).write_text(cpu_kernel._fingerprint(target) + "\n")
    monkeypatch.setattr(cpu_kernel, "_build", lambda *a: pytest.fail("rebuilt a whole file"))
    assert cpu_kernel.kernel() is not None


def test_an_interrupted_build_is_not_recorded_as_a_failure(fresh_state, monkeypatch, caplog):
    import subprocess

    import torch.utils.cpp_extension as ext

    def killed(*args, **kwargs):  # what torch raises when ninja dies of SIGTERM
        try:
            raise subprocess.CalledProcessError(-15, ["ninja", "-v"])
        except subprocess.CalledProcessError as err:
            raise RuntimeError("Error building extension 'provq_nearest_two'") from err

    monkeypatch.setattr(ext, "load", killed)
    with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is None
    assert "interrupted" in caplog.text
    assert not list(fresh_state.glob("*.failed"))  # the next process simply builds again


def test_no_compiler_is_one_line_saying_how_to_point_at_one(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "no C++ compiler found" in warning and "CXX=" in warning and "\n" not in warning


TRUNCATED_RUN = """
import sys, torch
from provq_lightning.vq import cpu_kernel
from provq_lightning.vq.search import blocked_argmin, prepare_codes
real = open(sys.argv[1], 'rb').read()
def build(name, target):  # the compiler's stand-in: the real kernel's bytes, then load them
    staged = target.with_name('staged.so'); staged.write_bytes(real)
    cpu_kernel.record_path(target).write_text(cpu_kernel._fingerprint(staged) + '\\n')
    staged.replace(target)
    print('rebuilt')
    return cpu_kernel._import_file(name, target)
cpu_kernel._build = build
g = torch.Generator().manual_seed(0)
codes = torch.randn(300, 8, generator=g); prepared = prepare_codes(codes)
a = torch.randn(2000, 8, generator=g) - prepared.shift
print(','.join(map(str, blocked_argmin(a, prepared, rows=64)[0].tolist())))
"""


def test_a_truncated_cached_kernel_does_not_kill_the_run(built_kernel, tmp_path):
    # Loaded, a truncated .so kills the process with SIGBUS (exit 135) and no message.
    import os
    import subprocess
    import sys

    _, data = built_kernel
    real = tmp_path / "real.so"
    real.write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / f"{cpu_kernel.module_name()}{cpu_kernel.EXTENSION_SUFFIX}"
    target.write_bytes(data[: len(data) // 3])
    cpu_kernel.record_path(target).write_text(f"{len(data)} recorded-at-build\n")

    def run(**env):
        return subprocess.run([sys.executable, "-c", TRUNCATED_RUN, str(real)],
                              env={**os.environ, cpu_kernel.ENV_CACHE: str(cache), **env},
                              capture_output=True, text=True, timeout=300)

    fused = run()
    assert fused.returncode == 0, fused.stderr[-2000:]
    lines = fused.stdout.split()
    assert lines[0] == "rebuilt" and target.read_bytes() == data
    plain = run(**{cpu_kernel.ENV_SWITCH: "0"})
    assert plain.returncode == 0 and plain.stdout.split() == lines[1:]


def _stand_in_compiler(data: bytes, builds: list):
    """Replaces only the compiler: writes the real kernel's bytes where torch's builder would
    and loads them, so the lock, the announcement, the record and the move are the real ones."""
    def compile_(name, build):
        builds.append(name)
        path = build / f"{name}{cpu_kernel.EXTENSION_SUFFIX}"
        path.write_bytes(data)
        return cpu_kernel._import_file(name, path), path
    return compile_


def _announcements(text: str) -> int:
    return text.count("provq: compiling the CPU search kernel once for this machine")


def test_topodisc_sized_searches_never_build_the_kernel(fresh_state, monkeypatch):
    from provq_lightning.datamodules.topodisc import make_topodisc
    from provq_lightning.vq.kmeans import kmeans
    from provq_lightning.vq.search import nearest_code

    builds = []
    monkeypatch.setattr(cpu_kernel, "_build", lambda name, target: builds.append(name))
    points, _ = make_topodisc()  # TopoDisc's whole training batch (2-D latents, 32 codes)
    codes = points[:32] + 0.01
    expected = torch.cdist(points.double(), codes.double()).argmin(dim=1)
    assert torch.equal(nearest_code(points, codes), expected)
    kmeans(points[: 16 * 32], 32, iters=3, seed=0)  # its k-means seeding: 16 x K vectors
    assert builds == [] and not any(fresh_state.iterdir())  # the cache was never touched
    # The first search of MIN_PAIRS rows x codes asks for the kernel.
    big = torch.randn(cpu_kernel.MIN_PAIRS // 32, 2)
    nearest_code(big, codes)
    assert len(builds) == 1


def test_a_build_is_announced_once_and_later_processes_load_it(
    built_kernel, fresh_state, monkeypatch, caplog, capsys
):
    _, data = built_kernel
    builds = []
    monkeypatch.setattr(cpu_kernel, "_compile", _stand_in_compiler(data, builds))
    # A handler up the logger tree (a user's file log) does not take the console line.
    monkeypatch.setattr(logging.getLogger("provq_lightning"), "handlers", [logging.NullHandler()])
    with caplog.at_level(logging.INFO, logger="provq_lightning.vq.cpu_kernel"):
        assert cpu_kernel.kernel() is not None
        monkeypatch.setattr(cpu_kernel, "_state", {})  # a new process
        assert cpu_kernel.kernel() is not None
    assert len(builds) == 1 and caplog.records == []
    console = capsys.readouterr()
    assert console.out == ""
    (announce,) = console.err.splitlines()
    assert _announcements(announce) == 1 and str(fresh_state) in announce
    assert "PROVQ_CPU_KERNEL=0" in announce
    assert cpu_kernel.cached_file_is_whole(cpu_kernel.cached_path())
    # No temporary build folder is left; the lock file stays, unheld.
    assert not [p for p in fresh_state.iterdir() if p.is_dir()]


def test_while_another_process_builds_the_torch_search_is_used_then_the_kernel(
    built_kernel, fresh_state, monkeypatch, caplog, capsys
):
    import fcntl

    _, data = built_kernel
    builds = []
    monkeypatch.setattr(cpu_kernel, "_compile", _stand_in_compiler(data, builds))
    monkeypatch.setattr(cpu_kernel, "BUSY_RECHECK_SECONDS", 0.0)
    target = cpu_kernel.cached_path()
    with open(cpu_kernel.lock_path(target), "a") as other_builder:  # holds the build lock
        fcntl.flock(other_builder, fcntl.LOCK_EX)
        with caplog.at_level(logging.WARNING, logger="provq_lightning.vq.cpu_kernel"):
            assert cpu_kernel.kernel() is None
            assert cpu_kernel.kernel() is None  # looked again: still building
        # No second build and nothing on the console (an info line in the log).
        assert caplog.records == [] and builds == [] and capsys.readouterr().err == ""
        # The other process finishes: the record, then the whole file; the lock is released.
        cpu_kernel.record_path(target).write_text(f"{len(data)} not yet the file's\n")
        assert cpu_kernel.kernel() is None  # a record without its file is never loaded
        staged = target.with_name("staged.so")
        staged.write_bytes(data)
        cpu_kernel.record_path(target).write_text(cpu_kernel._fingerprint(staged) + "\n")
        staged.replace(target)
    assert cpu_kernel.kernel() is not None and builds == []


def test_the_build_command_builds_once_and_reports(built_kernel, fresh_state, monkeypatch,
                                                   capsys):
    _, data = built_kernel
    builds = []
    monkeypatch.setattr(cpu_kernel, "_compile", _stand_in_compiler(data, builds))
    assert cpu_kernel.main(["--build"]) == 0
    monkeypatch.setattr(cpu_kernel, "_state", {})
    assert cpu_kernel.main(["--build"]) == 0  # already built: verified and loaded
    assert len(builds) == 1
    out = capsys.readouterr().out
    assert out.count(f"CPU search kernel ready ({cpu_kernel.cached_path()})") == 2
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert cpu_kernel.main(["--build"]) == 0
    assert "switched off" in capsys.readouterr().out


def test_the_build_command_fails_with_the_reason(fresh_state, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert cpu_kernel.main(["--build"]) == 1


PARALLEL_RUN = """
import logging, os, sys, time
from pathlib import Path
from provq_lightning.vq import cpu_kernel
real, meeting = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
saw_busy = meeting / 'busy'

class NoteBusy(logging.Handler):  # the waiting process says so in its (info) log
    def emit(self, record):
        if 'another process is compiling' in record.getMessage():
            saw_busy.touch()

logger = logging.getLogger('provq_lightning.vq.cpu_kernel')
logger.setLevel(logging.INFO)
logger.addHandler(NoteBusy())

def compile_(name, build):  # the compiler's stand-in: waits until the other process found it busy
    with open(meeting / 'builds', 'a') as fh:
        fh.write(f'{os.getpid()}\\n')
    deadline = time.monotonic() + 60
    while not saw_busy.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    path = build / f'{name}{cpu_kernel.EXTENSION_SUFFIX}'
    path.write_bytes(real)
    return cpu_kernel._import_file(name, path), path

cpu_kernel._compile = compile_
cpu_kernel.BUSY_RECHECK_SECONDS = 0.05
(meeting / f'ready-{os.getpid()}').touch()
while len(list(meeting.glob('ready-*'))) < 2:  # both start searching together
    time.sleep(0.01)
first = cpu_kernel.kernel() is not None
deadline = time.monotonic() + 120
while cpu_kernel.kernel() is None and time.monotonic() < deadline:
    time.sleep(0.02)
print('first', first, 'then', cpu_kernel.kernel() is not None)
"""


def test_two_processes_on_an_empty_cache_build_once(built_kernel, tmp_path):
    import os
    import subprocess
    import sys

    _, data = built_kernel
    real = tmp_path / "real.so"
    real.write_bytes(data)
    cache, meeting = tmp_path / "cache", tmp_path / "meeting"
    meeting.mkdir()
    env = {**os.environ, cpu_kernel.ENV_CACHE: str(cache)}
    env.pop(cpu_kernel.ENV_SWITCH, None)
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL_RUN, str(real), str(meeting)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    outs = sorted(out.split() for out, _ in results)
    # One built and used the kernel at once; the other searched with torch meanwhile, then
    # picked up the finished kernel without building it.
    assert outs == [["first", "False", "then", "True"], ["first", "True", "then", "True"]]
    assert len((meeting / "builds").read_text().split()) == 1
    assert (meeting / "busy").exists()
    assert _announcements("".join(err for _, err in results)) == 1
    assert cpu_kernel.cached_file_is_whole(cache / cpu_kernel.cached_path().name)


BANNER_RUN = """
from provq_lightning.vq import cpu_kernel
print('kernel', cpu_kernel.kernel())
"""


def test_a_failing_compiler_is_one_line_without_torchs_banners(tmp_path):
    # torch's builder logs "No CUDA runtime is found" on import where CUDA_HOME is set and no
    # GPU is present, and a traceback when the compiler's version check fails.
    import os
    import subprocess
    import sys

    env = {**os.environ, cpu_kernel.ENV_CACHE: str(tmp_path / "cache"), "CXX": "false",
           "CUDA_HOME": str(tmp_path)}
    env.pop(cpu_kernel.ENV_SWITCH, None)
    run = subprocess.run([sys.executable, "-c", BANNER_RUN], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["kernel", "None"]
    lines = run.stderr.splitlines()
    assert len(lines) == 2, run.stderr
    assert _announcements(lines[0]) == 1
    assert "fused CPU search kernel unavailable" in lines[1]
