"""provq as a library: the wheel holds only ``provq_lightning`` (callbacks, datamodules and the
experiment configs inside it), and installed into a fresh venv outside the checkout it trains a
shipped config by name, next to foreign top-level ``callbacks`` / ``datamodules`` packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# What a build needs; the copy keeps build/ and *.egg-info out of the checkout.
# Folders of the checkout's top level that a build never reads (runs/ is the output folder, not
# the provq_lightning/runs package), and caches anywhere.
NOT_BUILT = (".git", ".venv", ".venv-lowest", "runs", "build", "tests", "docs", ".pytest_cache",
             ".ruff_cache", "lightning_logs")
CACHES = shutil.ignore_patterns("*.egg-info", "__pycache__")


def _not_built(folder: str, names: list[str]) -> set[str]:
    top = {n for n in names if n in NOT_BUILT} if Path(folder) == REPO else set()
    return top | set(CACHES(folder, names))


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args[:4]}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_not_built)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(tmp / "dist"), str(src)])
    (built,) = (tmp / "dist").glob("provq-*.whl")
    return built


def test_wheel_holds_only_provq_lightning_with_callbacks_datamodules_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert "provq_lightning" in tops
    assert not [t for t in tops if t != "provq_lightning" and not t.endswith(".dist-info")], tops
    for path in ("provq_lightning/callbacks/curriculum.py",
                 "provq_lightning/datamodules/topodisc.py",
                 "provq_lightning/experiments/topodisc_provq.yaml",
                 "provq_lightning/experiments/in1k_16x16.yaml",
                 "provq_lightning/experiments/in100/provq.yaml",
                 "provq_lightning/experiments/in100/classes.txt",
                 "provq_lightning/vq/csrc/nearest_two.cpp"):
        assert path in names, path
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "experiments").rglob("*")
               if p.is_file()}
    assert {f"provq_lightning/{p}" for p in shipped} <= names


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv with only provq's wheel; torch and the other dependencies come from this venv as
    a plain path entry (so its editable provq finder is never activated)."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--no-deps", "--no-index", str(wheel)])
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "provq_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    # Foreign top-level packages of the same names (PyPI's `callbacks`, a user's `datamodules`):
    # importing them at all fails the run.
    for name in ("callbacks", "datamodules"):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"raise ImportError('not provq: {name}')\n")
    return venv


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="venv layout: bin/ (POSIX)")
def test_installed_wheel_fits_a_shipped_config_by_name_outside_the_checkout(wheel, tmp_path):
    venv = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"  # the user's project: their own callbacks.py beside the run
    work.mkdir()
    (work / "callbacks.py").write_text("raise ImportError('the user callbacks.py')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    # `python -c` puts the cwd (with the user's callbacks.py) first on sys.path.
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import provq_lightning.tools.fit, provq_lightning.callbacks.curriculum as c; "
                  "print(provq_lightning.tools.fit.__file__); print(c.__file__)"],
                 cwd=work, env=env).stdout.split()
    assert all(Path(f).is_relative_to(venv) for f in where), where

    done = subprocess.run(
        [str(venv / "bin" / "provq-fit"), "--config", "topodisc_provq",
         "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false"],
        cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    last = work / "runs" / "topodisc_provq" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 20
