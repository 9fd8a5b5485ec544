"""provq-tokenize on a full disk: one line, and no token folder that looks whole (the codes are
written into a hidden sibling folder and renamed into place only after meta.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import short_topodisc_run


@pytest.fixture(scope="module")
def topodisc_run(tmp_path_factory) -> Path:
    return short_topodisc_run(tmp_path_factory.mktemp("tok"), steps=4)


def tokenize(capsys, run: Path, out: Path) -> tuple[int, str]:
    from provq_lightning.tools.tokenize_cli import tokenize_main

    capsys.readouterr()
    try:
        tokenize_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out),
                       "--device", "cpu"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def test_full_disk_during_tokenize_is_one_line_and_leaves_no_token_folder(
    tmpfs, topodisc_run, capsys
):
    disk = tmpfs("1m")  # 675 code files of a page each do not fit
    out = disk / "tokens"
    code, err = tokenize(capsys, topodisc_run, out)
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and str(out) in lines[0], err
    assert list(disk.iterdir()) == []  # neither tokens/ nor a partial folder


def test_a_second_tokenize_replaces_a_token_folder_and_refuses_a_foreign_one(
    topodisc_run, tmp_path, capsys
):
    out = tmp_path / "tokens"
    assert tokenize(capsys, topodisc_run, out)[0] == 0
    assert (out / "meta.json").is_file() and len(list((out / "codes").iterdir())) == 675
    (out / "codes" / "stale.npy").write_bytes(b"old")
    assert tokenize(capsys, topodisc_run, out)[0] == 0  # replaced whole
    assert not (out / "codes" / "stale.npy").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tokens"]  # no partial or old folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, err = tokenize(capsys, topodisc_run, foreign)
    assert code != 0 and "not a provq token folder" in err and "\n" not in err
    assert (foreign / "notes.txt").read_text() == "keep me"
