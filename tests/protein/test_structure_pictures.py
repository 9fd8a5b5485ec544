"""Structure pictures: the drawing functions, and their logging at every validation."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

import provq_lightning.protein.tokenizer as tokenizer_module
from provq_lightning.protein.geometry import random_rotation
from provq_lightning.protein.plots import PANEL_TITLES, chain_figure, structure_figure
from provq_lightning.protein.tokenizer import ProteinTokenizer
from provq_lightning.reporting.plots import close_figure
from tests.protein.helpers import TINY, cath_datamodule


def random_backbone(length: int, seed: int) -> torch.Tensor:
    """A chain-like (L, 3, 3) N/CA/C backbone: a random walk of 3.8 A CA steps."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(length, 3, generator=gen, dtype=torch.float64)
    ca = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=0)
    offsets = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    return torch.stack([ca + offsets[0], ca, ca + offsets[1]], dim=1)


def panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_structure_figure_draws_traces_maps_and_error_for_a_random_chain():
    rng = np.random.default_rng(0)
    true_ca = rng.normal(scale=5.0, size=(12, 3))
    pred_ca = true_ca + rng.normal(scale=1.0, size=(12, 3))
    fig = structure_figure(true_ca, pred_ca, title="chain X")
    try:
        by_title = panels(fig)
        assert set(by_title) == set(PANEL_TITLES)
        assert len(fig.axes) == len(PANEL_TITLES) + 1  # and the distance maps' colour bar
        assert fig._suptitle.get_text() == "chain X"
        # Both traces in each projection; the x-z panel plots z.
        lines = by_title["CA trace, x-z"].get_lines()
        assert len(lines) == 2
        np.testing.assert_allclose(lines[0].get_ydata(), true_ca[:, 2])
        error = by_title["per-residue error"].get_lines()[0].get_ydata()
        np.testing.assert_allclose(error, np.linalg.norm(pred_ca - true_ca, axis=-1))
        maps = [by_title[t].get_images()[0].get_array() for t in PANEL_TITLES[3:]]
        assert all(m.shape == (12, 12) for m in maps)
        assert maps[0][0, 1] == pytest.approx(np.linalg.norm(true_ca[0] - true_ca[1]))
    finally:
        close_figure(fig)


def test_structure_figure_refuses_mismatched_chains():
    with pytest.raises(ValueError, match="must both be"):
        structure_figure(np.zeros((5, 3)), np.zeros((4, 3)))


def test_chain_figure_superposes_before_measuring_error():
    true = random_backbone(20, seed=1)
    rot = random_rotation(torch.Generator().manual_seed(2))
    moved = true @ rot.T + torch.tensor([30.0, -12.0, 7.0], dtype=torch.float64)
    fig = chain_figure("1abc_A", moved, true)
    try:
        title = fig._suptitle.get_text()
        assert title.startswith("1abc_A:")
        assert "RMSD 0.00" in title and "lDDT 1.000" in title and "TM-score 1.000" in title
        error = panels(fig)["per-residue error"].get_lines()[0].get_ydata()
        assert np.abs(error).max() < 1e-6
    finally:
        close_figure(fig)


@pytest.fixture(scope="module")
def cath_data(tmp_path_factory, proteins_dir):
    return cath_datamodule(tmp_path_factory.mktemp("cath") / "cache", val_fraction=0.3)


def test_every_validation_logs_pictures_of_the_same_chains_to_tensorboard_and_png(
    cath_data, tmp_path, monkeypatch
):
    drawn: list[str] = []
    draw = tokenizer_module.chain_figure

    def recording(name, pred, true):
        drawn.append(name)
        return draw(name, pred, true)

    monkeypatch.setattr(tokenizer_module, "chain_figure", recording)
    pl.seed_everything(0, verbose=False)
    model = ProteinTokenizer(num_log_structures=2, **TINY)
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=1,  # the sanity check draws nothing
        logger=[tensorboard, csv],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, cath_data)

    first_val = next(iter(cath_data.val_dataloader()))["ids"][:2]
    assert drawn == list(first_val) * 2  # validations at steps 1 and 2, the same two chains

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = {"val/structure_0", "val/structure_1"}
    assert tags <= set(events.Tags()["images"])
    for tag in tags:
        assert [e.step for e in events.Images(tag)] == [1, 2]

    for tag in sorted(tags):
        for step in (1, 2):
            png = tmp_path / "csv" / "version_0" / "images" / tag / f"{step}.png"
            assert png.is_file(), png
            width, height = Image.open(png).size
            assert width > 300 and height > 200
