"""rFID as the paper measures it: ADM sample batches, the FID Inception against pytorch-fid,
and ``provq-rfid`` end to end on a tiny model (random weights everywhere, nothing downloaded)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from provq_lightning.image import pretrained as pt
from provq_lightning.image import rfid
from provq_lightning.image.tokenizer import ImageTokenizer
from tests.image.helpers import TINY, write_untrained_run


# -- .npz sample batches ----------------------------------------------------------------
def test_npz_batch_round_trip_in_the_adm_evaluator_format(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    writer = rfid.NpzBatchWriter(tmp_path / "b.npz", 5, 12, 10)
    writer.add(images[:3])
    writer.add(images[3:])
    path = writer.close()
    with np.load(path) as loaded:
        assert list(loaded.keys()) == ["arr_0"]
        assert loaded["arr_0"].dtype == np.uint8 and loaded["arr_0"].shape == (5, 12, 10, 3)
        assert np.array_equal(loaded["arr_0"], images)
    # What the ADM evaluator streams: an uncompressed arr_0.npy with a version 1.0 header.
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        assert archive.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
        assert np.lib.format.read_magic(member) == (1, 0)
    chunks = list(rfid.iter_npz_batches(path, 2))
    assert [len(c) for c in chunks] == [2, 2, 1] and np.array_equal(np.concatenate(chunks), images)
    # np.savez's own file reads the same way.
    np.savez(tmp_path / "np.npz", arr_0=images)
    assert np.array_equal(np.concatenate(list(rfid.iter_npz_batches(tmp_path / "np.npz", 4))),
                          images)


def test_npz_writer_refuses_a_short_batch_and_leaves_no_file(tmp_path):
    writer = rfid.NpzBatchWriter(tmp_path / "short.npz", 3, 4, 4)
    writer.add(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(rfid.ProvqError, match="got 2 images but 3"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="expected uint8"):
        rfid.NpzBatchWriter(tmp_path / "f.npz", 1, 4, 4).add(np.zeros((1, 4, 4, 3), np.float32))
    np.savez(tmp_path / "wrong.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(rfid.ProvqError, match="has no arr_0"):
        rfid.npz_shape(tmp_path / "wrong.npz")


# -- the ADM centre crop ---------------------------------------------------------------------
def test_adm_center_crop_halves_resizes_and_cuts_the_centre():
    # A middle band 1/6 wider than the final window, on black: a window off the centre (or a
    # wrong scale) would take in black pixels.
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, 30:90] = (200, 30, 90)
    crop = rfid.adm_center_crop(Image.fromarray(pixels), 16)  # 120x40 -> 60x20 -> 48x16
    assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - (200, 30, 90)).max() <= 2
    same = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(rfid.adm_center_crop(Image.fromarray(same), 16), same)


def test_llamagen_rounding():
    values = [-1.5, -1.0, -0.999, 0.0, 0.996, 0.997, 1.0, 2.0]
    recon = torch.tensor(values).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = rfid.to_uint8_llamagen(recon)[0, 0, :, 0]  # trunc(127.5 x + 128), clamped
    assert out.tolist() == [0, 0, 0, 128, 254, 255, 255, 255]


# -- FID Inception parity with pytorch-fid ---------------------------------------------------
def random_fid_state(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Random FID Inception weights, with BatchNorm statistics taken on ``images`` so that
    activations neither vanish nor explode over 90 layers (the tolerance then means
    something)."""
    torch.manual_seed(0)
    model = pt.FIDInception()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
                bn.reset_running_stats()
                bn.momentum = None  # a plain average over the calibration pass
        model.train()
        model(images)
    return {**model.net.state_dict(), "fc.weight": torch.randn(1008, 2048),
            "fc.bias": torch.randn(1008)}


def pytorch_fid_inception(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` (pool3 block) with ``state`` instead of its download."""
    inception = pytest.importorskip("pytorch_fid.inception")
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=state) as fetch:
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    assert fetch.call_count == 1  # its weights came from here, not from the network
    return model.eval()


def test_fid_inception_matches_pytorch_fid(tmp_path):
    g = torch.Generator().manual_seed(3)
    at_299 = torch.rand(2, 3, 299, 299, generator=g)
    at_256 = torch.rand(2, 3, 256, 256, generator=g)  # both resize bilinearly to 299 inside
    upsampled = torch.nn.functional.interpolate(at_256, size=(299, 299), mode="bilinear")
    state = random_fid_state(torch.cat([at_299, upsampled]))
    torch.save(state, tmp_path / pt.FID_INCEPTION_FILE)
    ours = pt.build_fid_inception(str(tmp_path / pt.FID_INCEPTION_FILE))
    theirs = pytorch_fid_inception(state)
    # float64: the comparison is of the two graphs, not of float32 rounding (which random
    # weights amplify to ~1e-5 relative); float32 is checked at 1e-4 of the feature scale.
    for images in (at_299, at_256):
        with torch.no_grad():
            a64 = ours.double()(images.double())
            b64 = theirs.double()(images.double())[0].flatten(1)
            a32 = ours.float()(images)
            b32 = theirs.float()(images)[0].flatten(1)
        assert a64.shape == b64.shape == (2, 2048)
        assert a64.std() > 0.05  # features of a sensible scale, so 1e-5 is a real bound
        assert (a64 - b64).abs().max() < 1e-5
        assert (a32 - b32).abs().max() < 1e-4 * b32.abs().max()
    # The test can fail: pytorch-fid's pooling that ignores padding is what the hooks add.
    torchvision_pooling = pt.FIDInception().double()
    torchvision_pooling.net.load_state_dict(ours.net.state_dict())
    for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
        getattr(torchvision_pooling.net, name).branch_pool._forward_pre_hooks.clear()
    with torch.no_grad():
        off = torchvision_pooling(at_299.double()) - theirs.double()(at_299.double())[0].flatten(1)
    assert off.abs().max() > 1e-3


# -- provq-rfid end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A provq run folder (config.yaml + checkpoint) of an untrained tiny image tokenizer."""
    return write_untrained_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(pt.FIDInception().net.state_dict(), path)
    return path


def run_rfid(tiny_run: Path, data: Path, out: Path, *extra: str) -> dict:
    rfid.main(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--data", str(data),
               "--out", str(out), "--size", "32", "--batch-size", "4", "--workers", "0",
               "--device", "cpu", *extra])
    return json.loads((out / "rfid.json").read_text())


def test_rfid_writes_both_batches_and_scores_them(tiny_run, inception_file, flat_folder,
                                                  tmp_path, capsys):
    folder, _ = flat_folder
    report = run_rfid(tiny_run, folder, tmp_path / "out", "--limit", "4", "--inception",
                      str(inception_file))
    assert report["count"] == 4 and np.isfinite(report["rfid"]) and report["psnr"] > 0
    assert f"rFID {report['rfid']:.4f} over 4 images" in capsys.readouterr().out
    with np.load(tmp_path / "out" / "reference.npz") as ref, \
            np.load(tmp_path / "out" / "reconstructions.npz") as rec:
        ref, rec = ref["arr_0"], rec["arr_0"]
    assert ref.shape == rec.shape == (4, 32, 32, 3) and ref.dtype == rec.dtype == np.uint8
    # The references are the ADM crops of the first four files; the reconstructions are the
    # model's own, rounded as LlamaGen rounds them.
    files = sorted(folder.glob("*.JPEG"))[:4]
    crops = np.stack([rfid.adm_center_crop(Image.open(f).convert("RGB"), 32) for f in files])
    assert np.array_equal(ref, crops)
    model, _, weights = rfid.load_tokenizer(
        rfid.parse_args(["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--data",
                         str(folder), "--out", str(tmp_path)]), torch.device("cpu"))
    assert weights == report["weights"] == "live"  # the tiny run keeps no EMA
    expected = rfid.to_uint8_llamagen(model(torch.from_numpy(crops).permute(0, 3, 1, 2)))
    assert np.abs(rec.astype(int) - expected.numpy().astype(int)).max() <= 1
    # Scoring the written files gives the number measured during the pass.
    again = tmp_path / "again"
    rfid.main(["--ref-npz", str(tmp_path / "out" / "reference.npz"), "--sample-npz",
               str(tmp_path / "out" / "reconstructions.npz"), "--out", str(again),
               "--inception", str(inception_file), "--device", "cpu", "--batch-size", "4"])
    rescored = json.loads((again / "rfid.json").read_text())["rfid"]
    assert rescored == pytest.approx(report["rfid"], rel=1e-6, abs=1e-6)


def test_rfid_without_weights_says_so_in_one_line(tiny_run, flat_folder, tmp_path,
                                                   monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    folder, _ = flat_folder
    with pytest.raises(SystemExit):
        run_rfid(tiny_run, folder, tmp_path / "out", "--limit", "2")
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("provq-rfid: error:")
    assert pt.FID_INCEPTION_FILE in error and "--no-fid" in error
    assert "rFID" not in captured.out and not (tmp_path / "out").exists()
    # --no-fid still writes the batches, and reports no number.
    report = run_rfid(tiny_run, folder, tmp_path / "npz", "--limit", "2", "--no-fid",
                      "--no-reference-npz")
    assert report["rfid"] is None and report["count"] == 2
    assert "rFID not computed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == ["reconstructions.npz",
                                                                     "rfid.json"]


def test_rfid_reads_shards_and_names_an_unreadable_image(tiny_run, flat_folder, tmp_path,
                                                         capsys):
    from provq_lightning.image import shards as sh

    folder, keys = flat_folder
    members = [(k, {"jpg": (folder / f"{k}.JPEG").read_bytes()}) for k in keys[:3]]
    members.append(("broken", {"jpg": b"not a jpeg"}))
    (tmp_path / "s-0.tar").write_bytes(sh.tar_bytes(members))
    sh.write_index(tmp_path / "index.json", [sh.ShardInfo("s-0.tar", 4)])
    report = run_rfid(tiny_run, tmp_path / "index.json", tmp_path / "ok", "--limit", "3",
                      "--no-fid")
    assert report["count"] == 3
    with pytest.raises(SystemExit):
        run_rfid(tiny_run, tmp_path / "index.json", tmp_path / "bad", "--no-fid")
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "s-0.tar:broken" in error
    assert not list((tmp_path / "bad").glob("*.npz*"))


def test_rfid_uses_the_ema_weights_unless_told_otherwise(tmp_path):
    run = tmp_path / "ema_run"
    torch.manual_seed(5)
    model = ImageTokenizer(**TINY, ema_decay=0.9)
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an EMA that differs from the live weights
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    config = {"model": {"class_path": "provq_lightning.image.tokenizer.ImageTokenizer",
                        "init_args": {**init_args, "ema_decay": 0.9}}}
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    live = model.eval().reconstruct(images)
    model.ema.swap(model.generator())
    ema = model.reconstruct(images)
    common = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data", str(tmp_path),
              "--out", str(tmp_path)]
    for choice, expected in (([], ema), (["--weights", "live"], live)):
        reconstruct, _, weights = rfid.load_tokenizer(rfid.parse_args(common + choice),
                                                      torch.device("cpu"))
        assert weights == (choice[-1] if choice else "ema")
        assert torch.allclose(reconstruct(images), expected, atol=1e-6)
    assert not torch.allclose(ema, live, atol=1e-3)
