"""Evaluating a trained image tokenizer on any folder of pictures: ``provq-fit test --config
<run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt --data.init_args.test_root DIR``
(any file names, sub-folders, no classes) writes into ``<run>/eval/...`` and leaves every file
of the training run byte-identical."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from provq_lightning.data.paths import REPO_ROOT
from tests.helpers import effective_config, provq_fit, run_files
from tests.image.helpers import TINY, jpeg_bytes, write_flat_folder


def write_pictures(root: Path) -> int:
    """Pictures as a user has them: no wnids, mixed formats, a sub-folder, a non-picture."""
    (root / "holiday").mkdir(parents=True)
    (root / "IMG_0001.jpg").write_bytes(jpeg_bytes(1))
    (root / "my cat.JPEG").write_bytes(jpeg_bytes(2, (30, 60)))
    (root / "holiday" / "beach.jpg").write_bytes(jpeg_bytes(3, (64, 64), "L"))
    buffer = io.BytesIO()
    pixels = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    (root / "holiday" / "drawing.png").write_bytes(buffer.getvalue())
    (root / "notes.txt").write_text("not a picture")
    return 4


def test_test_on_a_folder_of_pictures_writes_its_own_dir_and_leaves_the_run_untouched(tmp_path):
    write_flat_folder(tmp_path / "photos", 12)
    cfg = effective_config(REPO_ROOT / "experiments" / "imagenet_sample_64px.yaml")
    cfg["trainer"].update(
        max_steps=2, val_check_interval=2, enable_progress_bar=False, enable_model_summary=False
    )
    # No pinned version: the run's own config.yaml makes Lightning pick a fresh version_N, so
    # the evaluation finds its run from the checkpoint's path.
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), name="img")
    cfg["curriculum"].update(
        warmup_steps=1, transition_steps=0, kmeans_samples=16, kmeans_collect_batches=1
    )
    cfg["model"]["init_args"].update({**TINY, "disc_weight": 0.0, "num_codes": 16})
    cfg["data"]["init_args"].update(
        root=str(tmp_path / "photos"), image_size=16, batch_size=4, num_workers=0, val_fraction=0.25
    )
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    provq_fit("--config", str(config))
    run = tmp_path / "img" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    before = run_files(run)
    fit_metrics = json.loads((run / "metrics.json").read_text())

    pictures = tmp_path / "pictures"
    count = write_pictures(pictures)
    # The training folder is gone: a test on test_root must not need it.
    provq_fit(
        "test",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(ckpt),
        "--data.init_args.test_root",
        str(pictures),
        "--data.init_args.root",
        str(tmp_path / "gone"),
    )
    assert run_files(run) == before
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["version_0"]
    (evaluation,) = (run / "eval").iterdir()
    assert evaluation.name.startswith("test-")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["global_step"] == fit_metrics["global_step"] == 2.0
    assert metrics["checkpoint"] == str(ckpt.resolve())
    assert any(k.startswith("test/") for k in metrics) and not any(
        k.startswith("test/") for k in fit_metrics
    )
    assert (evaluation / "config.yaml").is_file()

    from provq_lightning.datamodules.image_folder import ImageFolderDataModule

    data = ImageFolderDataModule(
        root=str(tmp_path / "gone"), test_root=str(pictures), image_size=16, batch_size=8
    )
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].shape == (count, 3, 16, 16)  # every picture, the .txt ignored
    assert sorted(batch["key"]) == [
        "IMG_0001_jpg",
        "holiday_beach_jpg",
        "holiday_drawing_png",
        "my_cat_JPEG",
    ]
