"""``train_sources`` add chains to training only: the validation split is unchanged, the held-out
share is never trained on, and ``test_on_holdout`` evaluates exactly that share."""

from __future__ import annotations

import pytest

from provq_lightning.datamodules.proteins import ProteinStructureDataModule
from tests.protein.helpers import EDGE, need_shared_data


def _ids(dataset) -> list[str]:
    return [dataset[i]["id"] for i in range(len(dataset))]


def _datamodule(tmp_path, **kwargs) -> ProteinStructureDataModule:
    dm = ProteinStructureDataModule(
        sources=str(need_shared_data() / "cath_domains"),
        cache_dir=str(tmp_path / "cache"),
        crop_length=48,
        val_fraction=0.3,
        **kwargs,
    )
    dm.setup("fit")
    return dm


def test_train_sources_add_to_training_and_leave_validation_as_it_was(tmp_path):
    plain = _datamodule(tmp_path)
    extra = _datamodule(tmp_path, train_sources=str(EDGE), train_holdout=0.3)
    assert _ids(extra.val_set) == _ids(plain.val_set) and len(plain.val_set) > 0
    plain_train, extra_train = _ids(plain.train_set), _ids(extra.train_set)
    assert extra_train[: len(plain_train)] == plain_train
    added = set(extra_train[len(plain_train):])
    held_out = set(_ids(extra.holdout_set))
    assert added and held_out and not added & held_out
    # Every chain of the extra folder is either trained on or held out, none validated on.
    entries = {name.split("_")[0] for name in added | held_out}
    assert entries == {"1aki.pdb", "1aki.cif", "1dix.pdb", "1dix.cif", "1l2y.pdb", "1l2y.cif",
                       "1o1z.pdb", "1o1z.cif", "3o5r.pdb", "3o5r.cif", "1k6p.pdb", "1k6p.cif"}
    # An item read through the training sampler's (index, crop seed) pairs is deterministic.
    last = len(extra.train_set) - 1
    assert extra.train_set[(last, 7)]["coords"].equal(extra.train_set[(last, 7)]["coords"])


def test_test_on_holdout_evaluates_the_held_out_chains(tmp_path):
    dm = _datamodule(tmp_path, train_sources=str(EDGE), train_holdout=0.3,
                     test_on_holdout=True)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch["ids"]) <= set(_ids(dm.holdout_set))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_holdout": 1.0, "train_sources": "x"}, "train_holdout must lie in"),
        ({"test_on_holdout": True}, "test_on_holdout needs train_sources"),
    ],
)
def test_bad_holdout_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProteinStructureDataModule(sources="x", **kwargs)
