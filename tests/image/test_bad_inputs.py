"""Bad input to provq-make-shards, provq-tokenize and provq-decode: one line naming the file or
record and the fix, and a non-zero exit, never a traceback or a silently wrong output."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.image.make_shards import main as make_shards
from provq_lightning.runs.checkpoint_check import check_checkpoint_file, load_checkpoint
from provq_lightning.tools.tokenize_cli import CodeWriter, decode_main, load_run, tokenize_main
from tests.image.helpers import TINY, write_untrained_run

NUM_CODES = TINY["num_codes"]


def one_line_error(main, argv: list[str], capsys, prog: str) -> str:
    """Run an entry point that must fail: exit status 1 and exactly one ``prog: error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err


# -- provq-make-shards ----------------------------------------------------------------------
def tar_members(out: Path, suffix: str) -> int:
    count = 0
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            count += sum(1 for name in tar.getnames() if name.endswith(suffix))
    return count


def test_make_shards_refuses_a_non_empty_out_dir(flat_folder, tmp_path, capsys):
    root, _ = flat_folder
    out = tmp_path / "shards"
    make_shards([str(root), str(out), "--shard-size", "10"])
    before = sorted(p.name for p in out.iterdir())
    err = one_line_error(make_shards, [str(root), str(out), "--shard-size", "20"], capsys,
                         "provq-make-shards")
    assert str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or removed


def test_make_shards_overwrite_removes_the_stale_shards(flat_folder, tmp_path, capsys):
    root, keys = flat_folder
    out = tmp_path / "shards"
    make_shards([str(root), str(out), "--shard-size", "10"])  # 4 shards
    (out / "shard-000009.tar.tmp").write_bytes(b"left by a killed run")
    (out / "README").write_text("not ours")
    make_shards([str(root), str(out), "--shard-size", "20", "--overwrite"])
    assert "removed 6 old shard/index files" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "README", "index.json", "shard-000000.tar", "shard-000001.tar"]
    # Every image on disk is in the index, once.
    assert tar_members(out, ".jpeg") == json.loads((out / "index.json").read_text())["total"]
    assert tar_members(out, ".jpeg") == len(keys)


def test_make_shards_missing_source_is_one_line(tmp_path, capsys):
    err = one_line_error(make_shards, [str(tmp_path / "nope"), str(tmp_path / "out")], capsys,
                         "provq-make-shards")
    assert str(tmp_path / "nope") in err


# -- provq-decode -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder as provq-fit leaves it: config.yaml and checkpoints/last.ckpt (random
    weights: these tests are about the inputs, not the reconstructions)."""
    return write_untrained_run(tmp_path_factory.mktemp("run"))


def write_tokens(out: Path, fmt: str, codes: dict[str, np.ndarray]) -> Path:
    writer = CodeWriter(out, fmt, np.dtype(np.int16))
    for key, array in codes.items():
        writer.add(key, torch.from_numpy(array))
    writer.close({"num_codes": NUM_CODES})
    return out


def good_codes(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"img{i}": rng.integers(0, NUM_CODES, (4, 4)) for i in range(n)}


def decode(tiny_run: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--tokens", str(tokens),
            "--out", str(out), "--device", "cpu", *extra]


def test_decode_of_good_tokens_writes_one_png_each(tiny_run, tmp_path, capsys):
    tokens = write_tokens(tmp_path / "t", "npy", good_codes())
    decode_main(decode(tiny_run, tokens, tmp_path / "png"))
    assert "decoded 3 items" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "img0.png", "img1.png", "img2.png"]


def test_decode_refuses_a_code_map_of_the_wrong_shape(tiny_run, tmp_path, capsys):
    codes = good_codes(2)
    tokens = write_tokens(tmp_path / "t", "npy", codes)
    np.save(tokens / "codes" / "img1.npy", np.zeros((6, 6), np.int16))  # meta says [4, 4]
    err = one_line_error(decode_main, decode(tiny_run, tokens, tmp_path / "png"), capsys,
                         "provq-decode")
    assert "img1.npy" in err and "record 2 'img1'" in err and "[6, 6]" in err
    assert "code_shape [4, 4]" in err
    assert not (tmp_path / "png" / "img1.png").exists()


@pytest.mark.parametrize("fmt", ["npy", "wds"])
def test_decode_refuses_token_ids_outside_the_codebook(tiny_run, tmp_path, capsys, fmt):
    codes = good_codes(2)
    codes["img1"][2, 3] = NUM_CODES
    tokens = write_tokens(tmp_path / "t", fmt, codes)
    err = one_line_error(decode_main, decode(tiny_run, tokens, tmp_path / "png"), capsys,
                         "provq-decode")
    assert str(tokens) in err and "'img1'" in err and f"[0, {NUM_CODES})" in err


def test_decode_names_a_short_fasta_record(tiny_run, tmp_path, capsys):
    tokens = write_tokens(tmp_path / "t", "fasta", good_codes(2))
    lines = (tokens / "codes.fasta").read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:15])  # one id of 16 lost
    (tokens / "codes.fasta").write_text("\n".join(lines) + "\n")
    err = one_line_error(decode_main, decode(tiny_run, tokens, tmp_path / "png"), capsys,
                         "provq-decode")
    assert "codes.fasta (line 3): record 2 'img1' has 15 token ids" in err
    assert "code_shape [4, 4] needs 16" in err


def test_decode_names_a_broken_meta_json(tiny_run, tmp_path, capsys):
    tokens = write_tokens(tmp_path / "t", "npy", good_codes(1))
    meta = tokens / "meta.json"
    meta.write_text(meta.read_text()[:-5])  # cut short
    err = one_line_error(decode_main, decode(tiny_run, tokens, tmp_path / "png"), capsys,
                         "provq-decode")
    assert f"{meta} is not valid JSON (line" in err and "re-run provq-tokenize" in err


def test_decode_refuses_tokens_of_another_codebook_size(tiny_run, tmp_path, capsys):
    tokens = write_tokens(tmp_path / "t", "npy", good_codes(1))
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "num_codes": 1024}))
    err = one_line_error(decode_main, decode(tiny_run, tokens, tmp_path / "png"), capsys,
                         "provq-decode")
    assert "meta.json" in err and "1024" in err and f"has {NUM_CODES}" in err


def test_decode_that_decodes_nothing_exits_non_zero(tiny_run, tmp_path, capsys):
    tokens = write_tokens(tmp_path / "t", "npy", good_codes(1))
    err = one_line_error(decode_main, decode(tiny_run, tokens, tmp_path / "png", "--keys", "x"),
                         capsys, "provq-decode")
    assert "nothing decoded" in err and "'x'" in err and str(tokens) in err


# -- broken checkpoints ---------------------------------------------------------------------
def broken_checkpoint(kind: str, good: Path, folder: Path) -> Path:
    path = folder / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    (folder / "config.yaml").write_bytes((good.parent.parent / "config.yaml").read_bytes())
    if kind == "text":
        path.write_text("epoch: 3\nstate: trained\n")
    elif kind == "lfs pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated old format":  # torch < 1.6 wrote a bare pickle stream
        torch.save(torch.load(good, weights_only=True), path,
                   _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a save killed half-way
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


KINDS = {"text": "not a PyTorch checkpoint", "lfs pointer": "git lfs pull",
         "empty": "empty (0 bytes)", "truncated": "truncated or corrupt",
         "truncated old format": "cannot be read"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prog", ["provq-tokenize", "provq-decode"])
def test_broken_checkpoint_is_one_line_naming_it(tiny_run, tmp_path, capsys, kind, prog):
    ckpt = broken_checkpoint(kind, tiny_run / "checkpoints" / "last.ckpt", tmp_path / "run")
    tokens = write_tokens(tmp_path / "t", "npy", good_codes(1))
    main, extra = ((tokenize_main, []) if prog == "provq-tokenize"
                   else (decode_main, ["--tokens", str(tokens)]))
    err = one_line_error(main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--device",
                                "cpu", *extra], capsys, prog)
    assert f"checkpoint {ckpt} " in err
    assert KINDS[kind] in err


def test_checkpoint_check_passes_a_good_checkpoint_and_names_a_missing_one(tiny_run, tmp_path):
    good = tiny_run / "checkpoints" / "last.ckpt"
    assert check_checkpoint_file(good) == good
    assert "state_dict" in load_checkpoint(good)
    with pytest.raises(ProvqError, match=f"checkpoint {tmp_path / 'x.ckpt'} not found"):
        load_run(tmp_path / "x.ckpt", None, None, "cpu")  # the run-loading code of the reports


def test_checkpoint_of_another_model_is_one_line(tiny_run, tmp_path):
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["model"]["init_args"]["num_codes"] = 32
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    with pytest.raises(ProvqError, match="does not fit the model of") as err:
        load_run(tiny_run / "checkpoints" / "last.ckpt", other, None, "cpu")
    assert "\n" not in str(err.value) and "--config" in str(err.value)


def test_a_truncated_jpeg_in_an_image_folder_is_skipped_and_counted(tmp_path, caplog):
    import logging

    from provq_lightning.datamodules.image_folder import SKIPPED, ImageFolderDataModule
    from tests.image.helpers import write_flat_folder

    keys = write_flat_folder(tmp_path / "photos", 6)
    broken = tmp_path / "photos" / f"{keys[2]}.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])  # cut short, as by a failed copy
    data = ImageFolderDataModule(str(tmp_path / "photos"), val_fraction=0.0, image_size=16,
                                 batch_size=3)
    data.setup("fit")
    seen, left_out = [], []
    with caplog.at_level(logging.WARNING, logger="provq.data"):
        for batch in data.train_dataloader():
            left_out += [path for path, _ in batch[SKIPPED]]
            batch = data.on_before_batch_transfer(batch, 0)
            assert SKIPPED not in batch and batch["image"].shape[1:] == (3, 16, 16)
            seen += batch["key"]
    assert sorted(seen) == sorted(k for k in keys if k != keys[2])  # the others all trained
    assert left_out == [str(broken)] and data.skipped_images == 1
    assert str(broken) in caplog.text and "remove or replace" in caplog.text


@pytest.mark.parametrize("layout", ["folder without index.json", "index.json that is text"])
def test_a_shard_folder_without_its_index_is_one_line(tmp_path, layout):
    from provq_lightning.datamodules.imagenet import shard_infos

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(b"")
    if layout == "index.json that is text":
        (folder / "index.json").write_text("not json")
    with pytest.raises(ProvqError) as err:
        shard_infos(str(folder))
    message = str(err.value)
    assert str(folder) in message and "provq-make-shards" in message and "\n" not in message
