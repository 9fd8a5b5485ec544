"""``provq-fit predict`` with ``CodePredictionWriter(format="llamagen")``: the files
``provq-tokenize --format llamagen`` writes, byte for byte, in one process and as 2 gloo DDP
processes (each rank writes its share, rank 0 numbers them into one folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provq_lightning.tools.tokenize_cli import tokenize_main
from tests.distributed import launch
from tests.helpers import cli_in_process, effective_config, provq_fit
from tests.image.helpers import TINY, write_flat_folder

REPO = Path(__file__).resolve().parents[2]
WRITER = "provq_lightning.callbacks.prediction_writer.CodePredictionWriter"
SIZE = 16


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A 2-step image run on 13 labelled photos (an odd count: the ranks' shares differ)."""
    tmp = tmp_path_factory.mktemp("llamagen_predict")
    write_flat_folder(tmp / "photos", 13)
    cfg = effective_config(REPO / "experiments" / "imagenet_sample_64px.yaml")
    cfg["trainer"].update(max_steps=2, val_check_interval=2, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp), name="img", version="v")
    cfg["curriculum"].update(
        warmup_steps=1, transition_steps=0, kmeans_samples=16, kmeans_collect_batches=1)
    cfg["model"]["init_args"].update({**TINY, "disc_weight": 0.0, "num_codes": 16})
    cfg["data"]["init_args"].update(root=str(tmp / "photos"), image_size=SIZE, batch_size=4,
                                    num_workers=0, val_fraction=0.25)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    provq_fit("--config", str(path))
    return tmp / "img" / "v"


def tokenize(run: Path, out: Path, *extra: str) -> dict[str, bytes]:
    tokenize_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--config",
                   str(run / "config.yaml"), "--out", str(out), "--format", "llamagen",
                   "--device", "cpu", *extra])
    return tree(out)


def predict_args(run: Path, out: Path, *writer_args: str) -> list[str]:
    return ["predict", "--config", str(run / "config.yaml"), "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar", "false",
            f"--trainer.callbacks+={WRITER}", "--trainer.callbacks.output_dir", str(out),
            "--trainer.callbacks.format", "llamagen", *writer_args]


@pytest.mark.parametrize("ten_crop", [False, True], ids=["flip", "ten_crop"])
def test_predict_writes_the_llamagen_files_of_provq_tokenize(image_run, tmp_path, ten_crop):
    extra = ["--ten-crop"] if ten_crop else []
    expected = tokenize(image_run, tmp_path / "tokens_flip", *extra)
    writer = ["--trainer.callbacks.ten_crop", "true", "--trainer.callbacks.image_size",
              str(SIZE), "--data.init_args.image_size", str(int(SIZE * 1.1))] if ten_crop else []
    out = tmp_path / "predicted_flip"
    provq_fit(*predict_args(image_run, out, *writer))
    assert len([n for n in expected if n.startswith(f"imagenet{SIZE}_codes/")]) == 13
    assert tree(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predicted_flip", "tokens_flip"]


def test_two_rank_predict_numbers_the_images_as_one_process_does(image_run, tmp_path):
    expected = tokenize(image_run, tmp_path / "tokens_flip")
    out = tmp_path / "ddp_flip"
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    codes = launch.ddp_fit(predict_args(image_run, out), logs, strategy="ddp", timeout=240)
    assert codes == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    assert tree(out) == expected  # codes, labels, index.jsonl and meta.json
    assert "wrote LlamaGen codes of 13 images" in logs[0].read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == [
        "ddp_flip", "tokens_flip"]  # no staging folder or rank share left


def test_a_rank_without_images_is_refused_instead_of_waited_for(image_run, tmp_path):
    (tmp_path / "one").mkdir()
    photo = next((image_run.parents[1] / "photos").iterdir())
    (tmp_path / "one" / photo.name).write_bytes(photo.read_bytes())
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    args = predict_args(image_run, tmp_path / "one_flip", "--data.init_args.root",
                        str(tmp_path / "one"))
    codes = launch.ddp_fit(args, logs, strategy="ddp", timeout=120)
    assert codes == [1, 1]
    for log in logs:
        (line,) = [x for x in log.read_text().splitlines() if x.startswith("provq-fit: error")]
        assert "rank(s) [1] of 2 get no images" in line
    assert not list(tmp_path.glob("*one_flip*"))  # nothing staged


def test_llamagen_writer_refusals_are_one_line(image_run, tmp_path, capsys):
    foreign = tmp_path / "mine_flip"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = [
        (foreign, ["--trainer.callbacks.ten_crop", "true"], "ten_crop needs image_size"),
        (foreign, ["--trainer.callbacks.image_size", "32"], "--data.init_args.image_size 32"),
        (foreign, [], "not a provq token folder"),
    ]
    for out, extra, named in cases:
        code, _, err = cli_in_process(capsys, *predict_args(image_run, out, *extra))
        lines = [line for line in err.splitlines() if line.startswith("provq-fit: error")]
        assert code != 0 and len(lines) == 1 and named in lines[0], err[-2000:]
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine_flip"]
