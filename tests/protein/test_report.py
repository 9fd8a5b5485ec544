"""The run report: mean ± sd over seeds, per-run rows and learning curves of structure-tokenizer
runs (``provq_lightning.protein.report`` on ``provq_lightning.reporting.run_report``), and
one-line errors for run arguments that name nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from provq_lightning.errors import ProvqError
from provq_lightning.protein import report
from provq_lightning.reporting.mean_sd_table import spread
from provq_lightning.reporting.run_report import parse_runs, per_run_table, seed_table
from tests.protein.helpers import fit_tiny_run

FILES = ("1aki.pdb", "1k6p.pdb", "3o5r.cif")  # 4 chains; the split holds one entry out
COLUMNS = (("val/psnr", "PSNR", "{:.2f}"), ("val/utilization", "utilization", "{:.1%}"),
           ("val/rfid", "rFID", "{:.1f}"))


# -- pure functions on hand-made metrics -------------------------------------------------------
def test_spread_is_mean_and_sample_sd_or_the_one_value():
    assert spread([1.0, 2.0, 3.0], "{:.2f}") == "2.00 ± 1.00"  # sample sd: n - 1
    assert spread([0.5, 0.5], "{:.1%}") == "50.0% ± 0.0%"
    assert spread([7.25], "{:.1f}") == "7.2"


def test_seed_table_rows_cells_and_missing_values():
    runs = {
        "A": [{"global_step": 10, "val/psnr": 20.0, "val/utilization": 0.5},
              {"global_step": 10, "val/psnr": 22.0, "val/utilization": 0.7}],
        "B": [{"global_step": 8, "val/psnr": 19.0}],
    }
    lines = seed_table(runs, COLUMNS).splitlines()
    # rFID is in no run: no column; B lacks utilization: n/a, not a mean of nothing.
    assert lines == ["| run | steps | PSNR | utilization |", "|---|---|---|---|",
                     "| A (2 seeds) | 10 | 21.00 ± 1.41 | 60.0% ± 14.1% |",
                     "| B | 8 | 19.00 | n/a |"]
    # A seed without the metric makes the cell n/a too; differing steps are all listed.
    runs["A"][1] = {"global_step": 12, "val/psnr": 22.0}
    row = seed_table(runs, COLUMNS).splitlines()[2]
    assert row == "| A (2 seeds) | 10/12 | 21.00 ± 1.41 | n/a |"


def test_per_run_table_names_each_directory():
    runs = {"A": [{"val/psnr": 20.0}, {"val/psnr": 22.0, "val/utilization": 0.25}]}
    dirs = {"A": [Path("runs/a/seed_0"), Path("runs/a/seed_1")]}
    assert per_run_table(runs, dirs, COLUMNS[:2]).splitlines() == [
        "| run | directory | PSNR | utilization |", "|---|---|---|---|",
        "| A | a/seed_0 | 20.00 | n/a |", "| A | a/seed_1 | 22.00 | 25.0% |"]


def test_parse_runs_groups_seeds_and_names_a_missing_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert parse_runs([f"X={a},{b}", f"Y={b}"]) == {"X": [a, b], "Y": [b]}
    with pytest.raises(ProvqError, match=f"run directory {tmp_path / 'gone'} .of X. not"):
        parse_runs([f"X={a},{tmp_path / 'gone'}"])
    with pytest.raises(ProvqError, match="is not NAME=RUN_DIR"):
        parse_runs([str(a)])


# -- the CLI on a trained run ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, proteins_dir) -> Path:
    """A 4-step provq-fit of a tiny model with the proteins_sample config, crop 64 residues."""
    return fit_tiny_run(tmp_path_factory.mktemp("protein_report"), FILES)


def test_report_over_two_seeds_gives_mean_sd_markdown_and_curve(trained_run, tmp_path, capsys):
    curve, md = tmp_path / "curve.png", tmp_path / "table.md"
    report.main([f"X={trained_run},{trained_run}", "--markdown", str(md), "--curve", str(curve)])
    out = capsys.readouterr().out
    head, _, row = out.splitlines()[:3]
    assert head.startswith("| run | steps | utilization |")
    for label in ("backbone RMSD (A)", "CA lDDT", "TM-score", "CPU time (min)", "wall time"):
        assert f"| {label} " in head
    metrics = report.read_run(trained_run)
    # The same run twice: mean = its value, no spread.
    assert row.startswith("| X (2 seeds) | 4 |")
    assert f"| {metrics['val/lddt']:.3f} ± 0.000 |" in row
    assert f"| {metrics['val/tm_score']:.3f} ± 0.000 |" in row
    assert f"| {metrics['cpu_min']:.1f} ± 0.0 |" in row
    tables = md.read_text()
    assert out == tables + f"wrote {curve}\n"  # the file holds exactly the printed tables
    assert tables.count(f"| X | {trained_run.parent.name}/{trained_run.name} |") == 2
    assert Image.open(curve).size[0] > 600  # two panels: lDDT and utilization


@pytest.mark.parametrize("spec", ["X={missing}", "{missing}"])
def test_bad_run_argument_is_one_line(spec, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as exit_:
        report.main([spec.format(missing=missing)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"{report.PROG}: error: ") and str(missing) in err


def test_a_validation_curve_includes_the_warmup_points_tensorboard_keeps_apart(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from provq_lightning.reporting.run_report import scalar_series

    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("val_warmup/lddt", 0.2, 500)
        writer.add_scalar("val/lddt", 0.7, 1500)
        writer.add_scalar("val/lddt", 0.75, 3000)
        writer.add_scalar("train/loss", 9.0, 500)
    steps, values = scalar_series(tmp_path, "val/lddt")
    assert steps == [500, 1500, 3000] and values == pytest.approx([0.2, 0.7, 0.75])
    assert scalar_series(tmp_path, "train/loss") == ([500], [9.0])
