"""provq-tokenize then provq-decode reproduces the model's own reconstructions exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from provq_lightning.tools.tokenize_cli import decode_main, load_run, read_codes, tokenize_main
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(flat_folder, tmp_path_factory) -> Path:
    """A 3-step provq-fit of a tiny model on the synthetic folder (the sample config's layout)."""
    from provq_lightning.tools.fit import main

    root, _ = flat_folder
    out = tmp_path_factory.mktemp("runs")
    cfg = effective_config(REPO / "experiments" / "imagenet_sample_64px.yaml")
    cfg["trainer"].update(max_steps=3, val_check_interval=3, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(out), version="t")
    cfg["curriculum"].update(
        warmup_steps=1, transition_steps=1, kmeans_samples=64, kmeans_collect_batches=1)
    cfg["model"]["init_args"].update(ch=16, ch_mult=[1, 2, 2, 4], z_channels=16, num_codes=32)
    cfg["data"]["init_args"].update(root=str(root), image_size=32, batch_size=8, num_workers=0,
                                    val_fraction=0.2)
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(config)]
    argv = sys.argv
    try:
        main(args)
    finally:
        sys.argv = argv
    run = out / "imagenet_sample_64px_provq" / "t"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.json").is_file()
    return run


@pytest.mark.parametrize("fmt", ["npy", "fasta", "wds"])
def test_tokenize_then_decode_reproduces_reconstructions(trained_run, tmp_path, fmt, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    tokens = tmp_path / "tokens"
    tokenize_main(["--ckpt", str(ckpt), "--out", str(tokens), "--format", fmt, "--device", "cpu"])
    meta = json.loads((tokens / "meta.json").read_text())
    assert meta["count"] == 37 and meta["code_shape"] == [4, 4] and meta["num_codes"] == 32
    codes = dict(read_codes(tokens))
    assert len(codes) == 37 and all(c.shape == (4, 4) for c in codes.values())
    keys = sorted(codes)[:3]
    decode_main(["--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(tmp_path / "png"),
                 "--keys", *keys, "--device", "cpu"])
    assert "decoded 3 items" in capsys.readouterr().out
    # The model's own reconstruction of the same centre crops, image by image.
    model, cfg = load_run(ckpt, None, None, "cpu")
    from provq_lightning.tools.tokenize_cli import dataloader

    loader, _ = dataloader(cfg, "predict")
    batch = next(iter(loader))
    for key in keys:
        i = batch["key"].index(key)
        assert torch.equal(model.encode_codes(batch["image"][i : i + 1].float() / 127.5 - 1)[0],
                           codes[key])
        recon = model.reconstruct(batch["image"][i : i + 1])[0]
        expected = ((recon.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        png = np.asarray(Image.open(tmp_path / "png" / f"{key}.png"))
        assert np.array_equal(png, expected.permute(1, 2, 0).numpy())


def test_fasta_format_is_key_then_ids(trained_run, tmp_path):
    tokens = tmp_path / "t"
    tokenize_main(["--ckpt", str(trained_run / "checkpoints" / "last.ckpt"), "--out",
                   str(tokens), "--format", "fasta", "--limit", "2", "--device", "cpu"])
    lines = (tokens / "codes.fasta").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith(">n0100000")
    assert len(lines[1].split()) == 16 and all(0 <= int(t) < 32 for t in lines[1].split())


def test_missing_config_is_named(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "x.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit):  # one line on stderr, not a FileNotFoundError traceback
        tokenize_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert "config.yaml" in err and len(err.splitlines()) == 1


def test_report_table_and_reconstruction_grid(trained_run, tmp_path, capsys):
    from provq_lightning.image import report

    grid = tmp_path / "grid.png"
    report.main([f"ProVQ={trained_run}", f"again={trained_run}", "--grid", str(grid),
                 "--images", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | steps | utilization") and "PSNR (dB)" in lines[0]
    assert lines[2].startswith("| ProVQ | 3 |") and "wall time" in lines[0]
    # A label margin plus 3 images of 32px, 2 px apart; original row + one row per run.
    assert Image.open(grid).size == (report.LABEL_WIDTH + 3 * 34, 3 * 34)


def test_report_over_seeds_gives_mean_and_spread_and_a_learning_curve(trained_run, tmp_path,
                                                                       capsys):
    from provq_lightning.image import report
    from provq_lightning.reporting.run_report import scalar_series

    curve, md = tmp_path / "curve.png", tmp_path / "table.md"
    report.main([f"ProVQ={trained_run},{trained_run}", "--curve", str(curve),
                 "--markdown", str(md)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| ProVQ (2 seeds) |"))
    psnr = report.read_run(trained_run)["val/psnr"]
    assert f"{psnr:.2f} ± 0.00" in row  # the same run twice: no spread
    assert md.read_text().strip() in out
    assert Image.open(curve).size[0] > 600  # two panels
    steps, values = scalar_series(trained_run, "val/psnr")
    assert steps and values[-1] == pytest.approx(psnr, abs=1e-4)
