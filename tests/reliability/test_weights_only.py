"""No entry point runs code embedded in a file: a real run's checkpoint with one extra object
whose unpickling would create a marker file is refused, in one line naming the file, by every
command that reads a checkpoint or a weight file."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import short_topodisc_run

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "provq_lightning"


class RunsCode:
    """Unpickling this object opens (creates) ``path``: what a hostile file would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-step TopoDisc run whose ``checkpoints/hostile.ckpt`` is its ``last.ckpt`` plus a
    ``RunsCode`` object; returns (run directory, marker path)."""
    out = tmp_path_factory.mktemp("hostile")
    run = short_topodisc_run(out)
    marker = out / "MARKER"
    payload = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    payload["extra"] = RunsCode(marker)
    torch.save(payload, run / "checkpoints" / "hostile.ckpt")
    return run, marker


def _exit(main: Callable[[list[str]], None], argv: list[str]) -> int:
    saved = sys.argv
    try:
        main(argv)
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved


def _fit(sub: str) -> Callable[[Path, Path], tuple[Callable, list[str]]]:
    def build(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
        from provq_lightning.tools.fit import main

        extra = ["--trainer.max_steps", "8"] if sub == "fit" else []
        return main, [sub, "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), *extra]
    return build


def _tokenize(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
    from provq_lightning.tools.tokenize_cli import tokenize_main

    return tokenize_main, ["--ckpt", str(ckpt), "--out", str(run / "tok"), "--device", "cpu"]


def _decode(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
    from provq_lightning.tools.tokenize_cli import decode_main, tokenize_main

    tokens = run / "tokens_for_decode"
    if not tokens.exists():
        tokenize_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(tokens),
                       "--device", "cpu", "--limit", "4"])
    return decode_main, ["--ckpt", str(ckpt), "--tokens", str(tokens), "--out",
                         str(run / "dec"), "--device", "cpu"]


def _rfid(flag: str) -> Callable[[Path, Path], tuple[Callable, list[str]]]:
    def build(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
        from provq_lightning.image.rfid import main

        images = run / "images"
        images.mkdir(exist_ok=True)
        if flag == "--inception":  # the FID weights are read before any model is built
            return main, ["--ref-npz", str(ckpt), "--sample-npz", str(ckpt), "--inception",
                          str(ckpt), "--out", str(run / "rfid")]
        return main, [flag, str(ckpt), "--data", str(images), "--out", str(run / "rfid"),
                      "--no-fid", "--device", "cpu"]
    return build


def _probe(run: Path, ckpt: Path) -> tuple[Callable, list[str], Path]:
    from provq_lightning.protein.probe import main

    copy = run.parent / "probe_run"
    if not copy.exists():
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tok*", "dec", "eval"))
    shutil.copy(ckpt, copy / "checkpoints" / "last.ckpt")
    return main, [f"run={copy}"], copy / "checkpoints" / "last.ckpt"


def _from_llamagen(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
    from provq_lightning.image.tokenizer import ImageTokenizer

    return (lambda argv: ImageTokenizer.from_llamagen(ckpt)), []


def _init_from(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
    from provq_lightning.image.tokenizer import ImageTokenizer

    return (lambda argv: ImageTokenizer(init_from=f"llamagen:{ckpt}")), []


def _protein(how: str) -> Callable[[Path, Path], tuple[Callable, list[str]]]:
    def build(run: Path, ckpt: Path) -> tuple[Callable, list[str]]:
        from provq_lightning.protein import esm3_convert
        from provq_lightning.protein.tokenizer import ProteinTokenizer

        return {
            "from_esm3": (lambda argv: ProteinTokenizer.from_esm3(ckpt)),
            "from_structtokenbench": (lambda argv: ProteinTokenizer.from_structtokenbench(ckpt)),
            "esm3": (lambda argv: ProteinTokenizer(init_from=f"esm3:{ckpt}")),
            "structtokenbench": (
                lambda argv: ProteinTokenizer(init_from=f"structtokenbench:{ckpt}")
            ),
            "convert": esm3_convert.main,
        }[how], ["--structtokenbench", str(ckpt), "--out", str(run / "converted")]
    return build


ENTRY_POINTS = {
    "provq-fit fit": _fit("fit"),
    "provq-fit validate": _fit("validate"),
    "provq-fit test": _fit("test"),
    "provq-fit predict": _fit("predict"),
    "provq-tokenize": _tokenize,
    "provq-decode": _decode,
    "provq-rfid --ckpt": _rfid("--ckpt"),
    "provq-rfid --llamagen": _rfid("--llamagen"),
    "provq-rfid --inception": _rfid("--inception"),
    "provq-probe": _probe,
    "ImageTokenizer.from_llamagen": _from_llamagen,
    "init_from: llamagen:PATH": _init_from,
    "ProteinTokenizer.from_esm3": _protein("from_esm3"),
    "ProteinTokenizer.from_structtokenbench": _protein("from_structtokenbench"),
    "init_from: esm3:PATH": _protein("esm3"),
    "init_from: structtokenbench:PATH": _protein("structtokenbench"),
    "esm3_convert --structtokenbench": _protein("convert"),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_checkpoint_that_runs_code_is_refused_in_one_line(hostile_run, entry, capsys):
    from provq_lightning.errors import ProvqError

    run, marker = hostile_run
    ckpt = run / "checkpoints" / "hostile.ckpt"
    main, argv, *named = ENTRY_POINTS[entry](run, ckpt)
    named = named[0] if named else ckpt  # the file the command read
    capsys.readouterr()
    try:
        code = _exit(main, argv)
        message = capsys.readouterr().err.strip()
    except ProvqError as err:  # the library calls raise; the commands print
        code, message = 1, f"error: {err}"
    assert not marker.exists(), f"{entry} ran the code embedded in {ckpt}"
    assert code != 0, f"{entry} accepted a file that needs unpickling"
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1, f"{entry}: expected one line, got:\n{message}"
    assert str(named) in lines[0] and "refused" in lines[0] and "io.open" in lines[0], lines


def test_no_module_of_the_package_unpickles() -> None:
    # Every torch file goes through safe_load.load_weights_only; no one may switch it off. The
    # mapped callbacks/ and datamodules/ are part of the package; tests and benchmarks read
    # checkpoints weights-only too.
    folders = [PACKAGE, *(REPO / name for name in ("callbacks", "datamodules", "tests",
                                                    "benchmarks"))]
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted(p for folder in folders for p in folder.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.loads?\(", line)
    ]
    assert not offenders, offenders


def test_a_weight_file_refusal_names_the_global(tmp_path) -> None:
    from provq_lightning.runs.safe_load import UnsafeFileError, load_weights_only

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1), "x": RunsCode(tmp_path / "M")}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_weights_only(path, "pretrained weights file")
    assert "io.open" in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "M").exists()


def test_a_checkpoint_without_its_config_is_one_line(hostile_run, tmp_path, capsys):
    from provq_lightning.tools.tokenize_cli import tokenize_main

    run, _ = hostile_run
    lone = tmp_path / "last.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    code = _exit(tokenize_main, ["--ckpt", str(lone), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "no config.yaml next to" in err and "--config" in err
    assert len(err.splitlines()) == 1, err


def test_a_class_one_format_admits_is_admitted_for_that_load_only(tmp_path) -> None:
    import argparse

    from provq_lightning.runs.safe_load import UnsafeFileError, load_weights_only

    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.5 has only the process-wide allowlist")
    path = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(a=1)}, path)
    assert load_weights_only(path, allowed_globals=[argparse.Namespace])["args"].a == 1
    # LlamaGen's Namespace admitted above is not admitted for the next file of another kind.
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        load_weights_only(path, "ESM3 encoder checkpoint")
