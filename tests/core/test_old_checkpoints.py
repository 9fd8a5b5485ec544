"""Checkpoints of older provq still load through ``provq_lightning.runs.migrations``.

``tests/data/topodisc_format0.ckpt`` was written at step 6 of ``topodisc_format0.yaml`` by a
provq without a checkpoint format (``tests/data/make_old_checkpoints.py``), which also recorded
the codes it gave. Today's ``provq-tokenize`` must give the same codes, and ``provq-fit
--ckpt_path`` must continue that run to the uninterrupted run's step-12 codebook and codes. A
checkpoint of a format newer than this provq is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from provq_lightning.errors import ProvqError
from provq_lightning.runs.migrations import CHECKPOINT_FORMAT, FORMAT_KEY, upgrade_checkpoint
from provq_lightning.tools.tokenize_cli import tokenize_main
from tests.distributed import launch

DATA = Path(__file__).resolve().parents[1] / "data"
CONFIG = DATA / "topodisc_format0.yaml"
OLD = DATA / "topodisc_format0.ckpt"
EXPECTED = json.loads((DATA / "topodisc_format0.json").read_text())


def tokenize(ckpt: Path, out: Path) -> dict[str, list[int]]:
    """``provq-tokenize`` of the training points: key -> code ids."""
    tokenize_main(["--ckpt", str(ckpt), "--config", str(CONFIG), "--out", str(out),
                   "--format", "fasta", "--device", "cpu"])
    lines = (out / "codes.fasta").read_text().splitlines()
    pairs = zip(lines[::2], lines[1::2], strict=True)
    return {key[1:]: [int(c) for c in ids.split()] for key, ids in pairs}


@pytest.fixture()
def old_checkpoint(tmp_path: Path) -> Path:
    copy = tmp_path / "old" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copyfile(OLD, copy)
    return copy


def test_the_stored_checkpoint_is_of_the_format_before_versions():
    payload = torch.load(OLD, map_location="cpu", weights_only=True)
    assert FORMAT_KEY not in payload and OLD.stat().st_size < 100_000


def test_an_old_checkpoint_tokenizes_to_the_codes_it_gave_before(old_checkpoint, tmp_path):
    assert tokenize(old_checkpoint, tmp_path / "tokens") == EXPECTED["codes_at_6"]


def test_an_old_checkpoint_resumes_to_the_uninterrupted_run(old_checkpoint, tmp_path):
    log = tmp_path / "fit.log"
    argv = ["fit", "--config", str(CONFIG), "--trainer.max_steps", "12",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path",
            str(old_checkpoint)]
    assert launch.fit(argv, log) == 0, log.read_text()[-3000:]
    (last,) = tmp_path.glob("topodisc_format0/*/checkpoints/last.ckpt")
    payload = torch.load(last, map_location="cpu", weights_only=True)
    assert payload["global_step"] == 12 and payload[FORMAT_KEY] == CHECKPOINT_FORMAT
    codebook = payload["state_dict"]["quantizer.embedding.weight"]
    assert torch.equal(codebook, torch.tensor(EXPECTED["codebook_at_12"]))
    assert tokenize(last, tmp_path / "tokens") == EXPECTED["codes_at_12"]


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(old_checkpoint, tmp_path, capsys):
    payload = torch.load(old_checkpoint, map_location="cpu", weights_only=True)
    payload[FORMAT_KEY] = CHECKPOINT_FORMAT + 1
    torch.save(payload, old_checkpoint)
    with pytest.raises(SystemExit):
        tokenize(old_checkpoint, tmp_path / "tokens")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"provq-tokenize: error: checkpoint {old_checkpoint} has checkpoint "
                           f"format {CHECKPOINT_FORMAT + 1}")
    assert line.endswith("upgrade provq (pip install -U provq) to load it")
    log = tmp_path / "fit.log"
    argv = ["fit", "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.max_steps", "12", "--ckpt_path", str(old_checkpoint)]
    assert launch.fit(argv, log) != 0
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"provq-fit: error: checkpoint {old_checkpoint} has checkpoint "
                           f"format {CHECKPOINT_FORMAT + 1}"), last


def test_format_0_steps_rename_and_fill_in_what_older_provq_wrote():
    old = {
        "state_dict": {"curriculum_phase": torch.tensor(3), "discriminator.net.0.weight": 1},
        "callbacks": {"CurriculumCallback": {"seeded": False}, "Other": {"seed": 3}},
    }
    renamed = {"state_dict": {}, "callbacks": {"CurriculumCallback": {"settings": {"seed": 7}}}}
    upgrade_checkpoint(old)
    upgrade_checkpoint(renamed)
    assert set(old["state_dict"]) == {
        "curriculum_phase", "quantization_start", "loss.discriminator.net.0.weight"
    }
    assert int(old["state_dict"]["quantization_start"]) == -1
    assert old["callbacks"] == {"CurriculumCallback": {"seeded": False, "settings": {}},
                                "Other": {"seed": 3}}
    assert renamed["callbacks"]["CurriculumCallback"]["settings"] == {"kmeans_seed": 7}
    assert old[FORMAT_KEY] == renamed[FORMAT_KEY] == CHECKPOINT_FORMAT
    with pytest.raises(ProvqError, match="^checkpoint x.ckpt has checkpoint format"):
        upgrade_checkpoint({FORMAT_KEY: CHECKPOINT_FORMAT + 1}, "x.ckpt")
