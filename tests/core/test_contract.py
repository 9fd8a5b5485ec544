"""Every shipped modality implements the whole ``VQTokenizer`` contract, and the tools that read a
run back name what a model lacks."""

from __future__ import annotations

import pytest
import torch
import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.image.tokenizer import ImageTokenizer
from provq_lightning.protein.tokenizer import ProteinTokenizer
from provq_lightning.runs.loading import load_run
from provq_lightning.runs.migrations import upgrade_checkpoint
from provq_lightning.tokenizer import CONTRACT, VQTokenizer, missing_contract
from provq_lightning.topodisc import TopoDiscTokenizer

MODALITIES = (TopoDiscTokenizer, ImageTokenizer, ProteinTokenizer)


@pytest.mark.parametrize("cls", MODALITIES, ids=lambda c: c.__name__)
def test_every_shipped_modality_implements_the_contract(cls):
    assert issubclass(cls, VQTokenizer)
    assert missing_contract(cls) == []


def test_the_contract_check_names_what_a_class_lacks():
    class Half(VQTokenizer):
        def training_step(self, batch, batch_idx):
            return None

    assert set(missing_contract(Half)) == set(CONTRACT) - {"training_step"}
    with pytest.raises(NotImplementedError, match="Half must implement tokenize_batch"):
        Half.tokenize_batch(object.__new__(Half), {})


def test_load_run_names_the_contract_members_a_model_lacks(tmp_path):
    model = {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    lacks = r"BoringModel .*does not implement encode_codes\(\)"
    with pytest.raises(ProvqError, match=lacks) as err:
        load_run(tmp_path / "checkpoints" / "last.ckpt", None, None, "cpu")
    assert "\n" not in str(err.value)


def test_old_checkpoints_without_quantization_start_load():
    model = TopoDiscTokenizer()
    state = model.state_dict()
    state.pop("quantization_start")
    model.load_state_dict(upgrade_checkpoint({"state_dict": state})["state_dict"], strict=True)
    assert int(model.quantization_start) == -1
