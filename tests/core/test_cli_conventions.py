"""provq-fit as LightningCLI users expect it: --version, --help, the --curriculum.* argument
group, --optimizer / --lr_scheduler, and ``provq-fit predict`` writing the files
``provq-tokenize`` writes, for the TopoDisc, image and protein tokenizers."""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.tools.fit import ProvqCLI
from provq_lightning.tools.tokenize_cli import tokenize_main
from tests.helpers import cli_in_process, effective_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "topodisc_provq.yaml")


def provq_fit(*args: str) -> None:
    """``provq-fit`` in this process; a failure (non-zero exit) fails the test."""
    from provq_lightning.tools.fit import main

    argv = sys.argv
    try:
        main(list(args))
    except SystemExit as exit_:
        assert not exit_.code, f"provq-fit {' '.join(args)} exited with {exit_.code}"
    finally:
        sys.argv = argv


def fit_yaml(cfg: dict, out: Path) -> Path:
    cfg["trainer"].update(enable_progress_bar=False, enable_model_summary=False)
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def predict_then_compare_with_tokenize(run: Path, tmp: Path, fmt: str = "npy") -> dict:
    """``provq-fit predict`` on a run's config and last.ckpt; its files must be byte-identical
    to ``provq-tokenize``'s of the same checkpoint. Returns the tokenize output's files."""
    ckpt = str(run / "checkpoints" / "last.ckpt")
    config = str(run / "config.yaml")
    tokens = tmp / "tokens"
    tokenize_main(["--ckpt", ckpt, "--config", config, "--out", str(tokens), "--format", fmt,
                   "--device", "cpu"])
    args = ["predict", "--config", config, "--ckpt_path", ckpt]
    if fmt == "npy":
        predictions = None  # the default: <run dir>/predictions of the predict run
    else:  # a writer in the config (or on the command line) replaces the default one
        predictions = tmp / "configured"
        writer = "provq_lightning.callbacks.prediction_writer.CodePredictionWriter"
        args += [f"--trainer.callbacks+={writer}",
                 "--trainer.callbacks.output_dir", str(predictions),
                 "--trainer.callbacks.format", fmt]
    provq_fit(*args)
    if fmt != "npy":
        assert not list(run.rglob("predictions"))  # the configured writer only
    else:  # an evaluation's run directory: <fit run>/eval/predict-<time>
        (predictions,) = run.glob("eval/predict-*/predictions")
    expected = tree(tokens)
    assert "meta.json" in expected and tree(predictions) == expected
    return expected


# -- --version, --help ---------------------------------------------------------------------
def test_version_names_provq_torch_and_lightning(capsys):
    code, out, err = cli_in_process(capsys, "--version")
    assert code == 0, err
    assert out.startswith("provq-fit ")
    assert importlib.metadata.version("provq") in out
    assert torch.__version__ in out and lightning.__version__ in out


def test_help_describes_provq(capsys):
    code, out, _ = cli_in_process(capsys, "--help")
    text = " ".join(out.split())  # argparse wraps lines
    assert code == 0 and "Progressive Quantization (ProVQ)" in text and "predict" in text
    assert "Lightning Trainer command line tool" not in text  # LightningCLI's default
    code, out, _ = cli_in_process(capsys, "fit", "--help")
    assert code == 0 and "--curriculum.warmup_steps" in out


# -- the curriculum argument group ------------------------------------------------------
def printed(capsys, *args: str) -> dict:
    code, out, err = cli_in_process(capsys, *args, "--print_config")
    assert code == 0, err[-2000:]
    return yaml.safe_load(out)


def curriculum_of(config: Path, *args: str) -> CurriculumCallback | None:
    """The CurriculumCallback of the trainer ``provq-fit --config config ARGS`` builds."""
    argv = sys.argv
    try:
        sys.argv = ["provq-fit"]
        cli = ProvqCLI(args=["--config", str(config), *args], run=False)
    finally:
        sys.argv = argv
    found = [c for c in cli.trainer.callbacks if isinstance(c, CurriculumCallback)]
    assert len(found) <= 1
    return found[0] if found else None


def test_curriculum_group_overrides_the_configured_callback(capsys):
    cfg = printed(capsys, "--config", CONFIG, "--curriculum.warmup_steps", "5000",
                  "--curriculum.schedule", "linear")
    (checkpoint,) = cfg["trainer"]["callbacks"]
    args = cfg["curriculum"]
    assert (args["warmup_steps"], args["schedule"]) == (5000, "linear")
    assert (args["transition_steps"], args["lam"]) == (1000, 0.5)  # the config's, untouched
    assert checkpoint["init_args"]["every_n_train_steps"] == 250  # the list is not restated
    # Effective values live in one place: the section; no CurriculumCallback among the callbacks.
    assert not any("Curriculum" in c["class_path"] for c in cfg["trainer"]["callbacks"])


def test_curriculum_group_adds_a_callback_to_a_config_without_one(tmp_path, capsys):
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "provq_lightning.topodisc.TopoDiscTokenizer"},
        "data": {"class_path": "provq_lightning.datamodules.topodisc.TopoDiscDataModule"},
        "curriculum": {"warmup_steps": 7, "kmeans_init": False},  # a config file section works
    }))
    cfg = printed(capsys, "--config", str(config))
    assert not cfg["trainer"]["callbacks"]
    callback = curriculum_of(config)
    assert isinstance(callback, CurriculumCallback)
    assert cfg["curriculum"]["warmup_steps"] == callback.warmup_steps == 7
    assert cfg["curriculum"]["kmeans_init"] is callback.kmeans_init is False
    assert cfg["curriculum"]["schedule"] == callback.schedule == "cosine"  # the default


@pytest.mark.parametrize(("key", "value"), [("schedule", "cosin"), ("lam", "1.5")])
def test_bad_curriculum_group_value_is_one_line_before_training(tmp_path, capsys, key, value):
    code, out, err = cli_in_process(capsys, "--config", CONFIG, f"--curriculum.{key}", value,
                                    "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert code == 1 and "Epoch" not in out
    (line,) = err.strip().splitlines()
    assert line.startswith(f"provq-fit: error: CurriculumCallback {key}: ") and value in line
    assert not list(tmp_path.iterdir())  # nothing written


def test_config_without_a_curriculum_trains_without_the_callback(tmp_path, capsys):
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "provq_lightning.topodisc.TopoDiscTokenizer"},
        "data": {"class_path": "provq_lightning.datamodules.topodisc.TopoDiscDataModule"},
    }))
    assert curriculum_of(config) is None  # plain hard VQ: VQTokenizer's own defaults
    shipped = REPO / "experiments" / "imagenet_sample_64px_vanilla.yaml"
    assert printed(capsys, "--config", str(shipped))["curriculum"]["warmup_steps"] == 0


CURRICULUM_PATH = "provq_lightning.callbacks.curriculum.CurriculumCallback"


def old_layout(config: dict) -> dict:
    """``config`` as provq wrote a run's config.yaml before the ``curriculum:`` section: the
    curriculum first in ``trainer.callbacks``, and an emptied (all null) ``curriculum`` group."""
    settings = config.pop("curriculum")
    entry = {"class_path": CURRICULUM_PATH, "init_args": settings}
    config["trainer"]["callbacks"] = [entry, *config["trainer"]["callbacks"]]
    config["curriculum"] = dict.fromkeys(settings)
    return config


def test_old_run_config_with_the_curriculum_in_trainer_callbacks_still_resumes(
    tmp_path, capsys, caplog
):
    cfg = effective_config(CONFIG)
    cfg["trainer"].update(max_steps=8, val_check_interval=8, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), name="run", version="v")
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 4
    cfg["curriculum"].update(warmup_steps=5, transition_steps=5, kmeans_collect_batches=2)
    cfg["model"]["init_args"].update(figure_every_n_steps=0)
    provq_fit("--config", str(fit_yaml(cfg, tmp_path)))
    run = tmp_path / "run" / "v"
    # The run as older provq left it: its config.yaml in the old layout.
    old_text = yaml.safe_dump(old_layout(yaml.safe_load((run / "config.yaml").read_text())))
    (run / "config.yaml").write_text(old_text)
    capsys.readouterr()

    code, _, err = cli_in_process(capsys, "--config", str(run / "config.yaml"),
                                  "--ckpt_path", "last", "--trainer.max_steps", "12")
    assert code == 0, err[-2000:]
    (moved,) = [line for line in caplog.messages if "trainer.callbacks" in line]
    assert "config.yaml" in moved and "curriculum:" in moved
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12
    state = next(v for k, v in ckpt["callbacks"].items() if "CurriculumCallback" in k)
    assert state["seeded_at_step"] == 5 and state["settings"]["warmup_steps"] == 5
    # The resumed run's config.yaml has the new layout; the old one is kept beside it.
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["curriculum"]["warmup_steps"] == 5
    assert not any("Curriculum" in c["class_path"] for c in config["trainer"]["callbacks"])
    assert (run / "config.1.yaml").read_text() == old_text


def test_old_layout_takes_command_line_curriculum_values_as_it_did(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(old_layout(effective_config(CONFIG))))
    cfg = printed(capsys, "--config", str(old), "--curriculum.schedule", "linear")
    assert (cfg["curriculum"]["warmup_steps"], cfg["curriculum"]["schedule"]) == (1000, "linear")
    (checkpoint,) = cfg["trainer"]["callbacks"]
    assert checkpoint["class_path"].endswith("ModelCheckpoint")


def test_two_curricula_are_refused_in_one_line(tmp_path, capsys):
    cfg = old_layout(effective_config(CONFIG))
    cfg["trainer"]["callbacks"].insert(0, cfg["trainer"]["callbacks"][0])
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(cfg))
    code, _, err = cli_in_process(capsys, "--config", str(two))
    (line,) = err.strip().splitlines()
    assert code != 0 and "2 CurriculumCallback entries" in line and two.name in line
    entry = f"--trainer.callbacks+={CURRICULUM_PATH}"
    code, _, err = cli_in_process(capsys, "--config", CONFIG, entry,
                                  "--trainer.callbacks.warmup_steps", "3",
                                  "--trainer.logger.init_args.save_dir", str(tmp_path / "x"))
    (line,) = err.strip().splitlines()
    assert code == 1 and "a run has one curriculum" in line


# -- --optimizer / --lr_scheduler -------------------------------------------------------
def test_optimizer_args_refused_in_one_line_where_they_cannot_work(tmp_path, capsys):
    image = str(REPO / "experiments" / "imagenet_sample_64px.yaml")
    code, _, err = cli_in_process(capsys, "--config", image, "--optimizer", "Adam",
                                  "--trainer.logger.init_args.save_dir", str(tmp_path))
    (line,) = err.strip().splitlines()
    assert code == 1 and "ImageTokenizer" in line and "manual optimization" in line
    assert "--model.init_args.lr" in line
    code, _, err = cli_in_process(capsys, "--config", CONFIG, "--lr_scheduler", "StepLR",
                                  "--lr_scheduler.step_size", "5",
                                  "--trainer.logger.init_args.save_dir", str(tmp_path))
    (line,) = err.strip().splitlines()
    assert code == 1 and "--lr_scheduler needs --optimizer" in line
    assert not list(tmp_path.iterdir())


# -- provq-fit predict, TopoDisc ---------------------------------------------------------
@pytest.fixture(scope="module")
def topodisc_run(tmp_path_factory) -> Path:
    """20 TopoDisc steps with the curriculum and the optimizer set on the command line."""
    out = tmp_path_factory.mktemp("topodisc")
    provq_fit("--config", CONFIG, "--trainer.max_steps", "20", "--trainer.val_check_interval",
              "20", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(out),
              "--trainer.logger.init_args.version", "v",
              "--curriculum.warmup_steps", "5", "--curriculum.transition_steps", "5",
              "--curriculum.kmeans_collect_batches", "2",
              "--optimizer", "SGD", "--optimizer.lr", "0.01", "--optimizer.momentum", "0.9",
              "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "10")
    return out / "topodisc_provq" / "v"


def test_command_line_curriculum_and_optimizer_drive_the_fit(topodisc_run):
    config = yaml.safe_load((topodisc_run / "config.yaml").read_text())
    args = config["curriculum"]
    assert (args["warmup_steps"], args["transition_steps"]) == (5, 5)
    ckpt = torch.load(topodisc_run / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "CurriculumCallback" in k)
    assert state["seeded"] and state["seeded_at_step"] == 5  # k-means ran at the new boundary
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert group["momentum"] == 0.9 and "betas" not in group  # SGD, not the model's own Adam
    (scheduler,) = ckpt["lr_schedulers"]
    assert scheduler["step_size"] == 10


def test_predict_writes_topodisc_codes_like_provq_tokenize(topodisc_run, tmp_path):
    files = predict_then_compare_with_tokenize(topodisc_run, tmp_path)
    assert len([name for name in files if name.startswith("codes/")]) == 675  # every point


# -- provq-fit predict, image and protein tokenizers -------------------------------------
def test_predict_writes_image_codes_and_csv_logger_gets_the_reconstruction_grid(tmp_path):
    from tests.image.helpers import TINY, write_flat_folder

    write_flat_folder(tmp_path / "photos", 12)
    cfg = effective_config(REPO / "experiments" / "imagenet_sample_64px.yaml")
    cfg["trainer"].update(max_steps=2, val_check_interval=2)
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path), "name": "img",
                                              "version": "v"}}
    cfg["curriculum"].update(
        warmup_steps=1, transition_steps=0, kmeans_samples=16, kmeans_collect_batches=1)
    cfg["model"]["init_args"].update({**TINY, "disc_weight": 0.0, "num_codes": 16})
    cfg["data"]["init_args"].update(root=str(tmp_path / "photos"), image_size=16, batch_size=4,
                                    num_workers=0, val_fraction=0.25)
    provq_fit("--config", str(fit_yaml(cfg, tmp_path)))
    run = tmp_path / "img" / "v"
    assert (run / "images" / "val" / "input_vs_reconstruction" / "2.png").is_file()
    files = predict_then_compare_with_tokenize(run, tmp_path)
    assert len([name for name in files if name.startswith("codes/")]) == 12


def test_predict_writes_protein_codes_with_a_configured_writer(tmp_path):
    from tests.protein.helpers import EDGE, TINY, need_shared_data

    need_shared_data()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("1aki.pdb", "1k6p.pdb", "3o5r.cif"):  # 4 chains
        shutil.copy(EDGE / name, src / name)
    cfg = effective_config(REPO / "experiments" / "proteins_sample.yaml")
    cfg["trainer"].update(max_steps=2, val_check_interval=2)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), version="v")
    cfg["curriculum"].update(warmup_steps=1, transition_steps=0, kmeans_collect_batches=1)
    cfg["model"]["init_args"].update(TINY)
    cfg["data"]["init_args"].update(sources=str(src), cache_dir=str(tmp_path / "cache"),
                                    crop_length=32, val_fraction=0.3, batch_size=2)
    provq_fit("--config", str(fit_yaml(cfg, tmp_path)))
    run = tmp_path / "proteins_sample_provq" / "v"
    files = predict_then_compare_with_tokenize(run, tmp_path, fmt="fasta")
    records = files["codes.fasta"].decode().splitlines()[0::2]
    assert sorted(records) == [">1aki_A", ">1k6p_A", ">1k6p_B", ">3o5r_A"]
