"""Loading ESM3 / StructTokenBench checkpoints: what is refused and how, the config route,
continued training under the curriculum, and provq-tokenize / provq-decode on such a model.

The files here are written from a small provq model under the checkpoints' names (parity with
ESM3's own code is ``test_esm3_parity.py``); none of these tests needs ``esm``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.data.paths import REPO_ROOT
from provq_lightning.errors import ProvqError
from provq_lightning.protein import esm3, esm3_convert
from provq_lightning.protein.tokenizer import ProteinTokenizer
from provq_lightning.runs.safe_load import UnsafeFileError
from provq_lightning.tools.tokenize_cli import decode_main, load_run, read_codes, tokenize_main
from tests.helpers import effective_config, provq_fit
from tests.protein.helpers import EDGE, drop_train_sources

SMALL = dict(encoder_type="esm3", encoder_dim=32, encoder_heads=4, encoder_layers=2, code_dim=8,
             num_codes=16, decoder_dim=32, decoder_heads=2, decoder_layers=1, pair_dim=16)


def source_model(variant: str = "vanilla", decoder_head: str = "esm3") -> ProteinTokenizer:
    torch.manual_seed(0)
    model = ProteinTokenizer(variant=variant, decoder_head=decoder_head, **SMALL)
    with torch.no_grad():
        model.quantizer.embedding.weight.normal_()
    return model


def esm3_encoder_file(path: Path, model: ProteinTokenizer) -> dict[str, torch.Tensor]:
    """``model``'s encoder and codebook under ESM3's names, with ESM3's EMA buffers."""
    names = esm3.expected_names(model, "esm3", with_decoder=False)
    state = {names[k]: v.clone() for k, v in model.state_dict().items() if k in names}
    state["codebook.N"] = torch.ones(SMALL["num_codes"])
    state["codebook.z_avg"] = state["codebook.embeddings"].clone()
    torch.save(state, path)
    return state


def structtokenbench_folder(root: Path, model: ProteinTokenizer) -> Path:
    """``model`` as a StructTokenBench DeepSpeed checkpoint folder, with the heads provq drops."""
    names = esm3.expected_names(model, "structtokenbench", with_decoder=True)
    module = {names[k]: v.clone() for k, v in model.state_dict().items() if k in names}
    module["model.decoder.plddt_head.output.weight"] = torch.zeros(50, SMALL["decoder_dim"])
    module["model.inverse_folding_head.output.weight"] = torch.zeros(33, SMALL["decoder_dim"])
    folder = root / "stb.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    torch.save({"module": module}, folder / "checkpoint" / esm3.DEEPSPEED_FILE)
    return folder


@pytest.fixture()
def encoder_file(tmp_path) -> Path:
    esm3_encoder_file(tmp_path / "encoder.pth", source_model())
    return tmp_path / "encoder.pth"


def test_esm3_keys_map_one_to_one_and_the_model_round_trips(encoder_file):
    source = source_model()
    model = ProteinTokenizer.from_esm3(encoder_file, decoder_heads=2)
    assert not model.training and model.codebook_loaded
    assert model.hparams.decoder_head == "esm3"  # a fresh decoder that trains with the encoder
    for key, value in source.state_dict().items():
        if key.startswith(("encoder.", "quantizer.")):
            assert torch.equal(model.state_dict()[key], value), key
    names = esm3.expected_names(model, "esm3", with_decoder=False)
    assert names["encoder.blocks.1.attn.out.bias"] == "transformer.blocks.1.geom_attn.out_proj.bias"
    assert names["encoder.blocks.0.mlp.3.weight"] == "transformer.blocks.0.ffn.3.weight"
    assert names["encoder.proj.weight"] == "pre_vq_proj.weight"
    assert names["quantizer.embedding.weight"] == "codebook.embeddings"


def _edit(state: dict, how: str) -> str:
    """Break ``state`` one way; return the key the refusal must name."""
    if how == "missing":
        del state["transformer.blocks.1.ffn.3.bias"]
        return "transformer.blocks.1.ffn.3.bias"
    if how == "unknown":
        state["transformer.blocks.0.geom_attn.extra_gate"] = torch.zeros(3)
        return "transformer.blocks.0.geom_attn.extra_gate"
    state["transformer.blocks.0.ffn.1.weight"] = state["transformer.blocks.0.ffn.1.weight"][:-2]
    return "transformer.blocks.0.ffn.1.weight"


@pytest.mark.parametrize("how", ["missing", "unknown", "misshapen"])
def test_a_missing_unknown_or_misshapen_key_is_refused_in_one_line_naming_it(
    tmp_path, encoder_file, how
):
    state = torch.load(encoder_file, weights_only=True)
    key = _edit(state, how)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ProvqError) as err:
        ProteinTokenizer.from_esm3(tmp_path / "broken.pth")
    message = str(err.value)
    assert key in message and str(tmp_path / "broken.pth") in message and "\n" not in message
    assert how.replace("misshapen", "shape") in message


class CallsLen:
    """Unpickling this calls ``len``: a global no weights-only allowlist holds."""

    def __reduce__(self):
        return (len, ((),))


def test_files_that_are_not_state_dicts_or_would_run_code_are_refused(tmp_path):
    with pytest.raises(ProvqError, match="not found"):
        ProteinTokenizer.from_esm3(tmp_path / "absent.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ProvqError, match="not a state dict"):
        ProteinTokenizer.from_esm3(tmp_path / "list.pth")
    # Not argparse.Namespace: Lightning allowlists it for weights-only loads once imported.
    torch.save({"weights": CallsLen()}, tmp_path / "pickle.pth")
    with pytest.raises(UnsafeFileError, match="the global len"):
        ProteinTokenizer.from_esm3(tmp_path / "pickle.pth")
    with pytest.raises(ProvqError, match="mp_rank_00_model_states.pt"):
        ProteinTokenizer.from_structtokenbench(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    torch.save({"optimizer": {}}, tmp_path / "checkpoint" / esm3.DEEPSPEED_FILE)
    with pytest.raises(ProvqError, match="no 'module' state dict"):
        ProteinTokenizer.from_structtokenbench(tmp_path)


def test_init_from_checks_the_spec_and_the_configs_shape(encoder_file):
    with pytest.raises(ProvqError, match="esm3:PATH"):
        ProteinTokenizer(**SMALL, init_from=f"esm:{encoder_file}")
    with pytest.raises(ProvqError, match="encoder_dim is 64 but .* needs 32; set encoder_dim: 32"):
        ProteinTokenizer(**{**SMALL, "encoder_dim": 64}, init_from=f"esm3:{encoder_file}")
    with pytest.raises(ProvqError, match="encoder_type is 'geometric' but .* needs 'esm3'"):
        ProteinTokenizer(**{**SMALL, "encoder_type": "geometric"},
                         init_from=f"esm3:{encoder_file}")
    model = ProteinTokenizer(**SMALL, init_from=f"esm3:{encoder_file}")
    assert model.codebook_loaded
    assert torch.equal(model.quantizer.embedding.weight, source_model().quantizer.embedding.weight)


def test_structtokenbench_decoder_needs_the_esm3_decoder_head(tmp_path):
    folder = structtokenbench_folder(tmp_path, source_model("aminoaseed"))
    args = {**SMALL, "variant": "aminoaseed"}
    with pytest.raises(ProvqError, match="decoder_head is 'frames' but .* needs 'esm3'"):
        ProteinTokenizer(**args, decoder_head="frames", init_from=f"structtokenbench:{folder}")
    model = ProteinTokenizer.from_structtokenbench(folder / "checkpoint" / esm3.DEEPSPEED_FILE)
    assert model.hparams.variant == "aminoaseed" and model.hparams.decoder_heads == 1


def test_esm3s_token_decoder_decodes_but_refuses_to_train(encoder_file, tmp_path):
    source = source_model(decoder_head="esm3_tokens")
    names = esm3.expected_names(source, "esm3-decoder", with_decoder=True)
    decoder = {names[k]: v for k, v in source.state_dict().items() if k in names}
    decoder["plddt_head.output.weight"] = torch.zeros(50, SMALL["decoder_dim"])  # dropped
    torch.save(decoder, tmp_path / "decoder.pth")
    model = ProteinTokenizer.from_esm3(encoder_file, tmp_path / "decoder.pth", decoder_heads=2)
    codes = torch.tensor([3, 1, -1, 7, 7])
    backbone = model.decode_codes(codes)
    assert backbone.shape == (5, 4, 3) and torch.isfinite(backbone).all()
    with pytest.raises(ProvqError, match="esm3_tokens .* does not train"):
        model.setup("fit")


def test_a_loaded_codebook_turns_the_curriculums_kmeans_seeding_off(encoder_file):
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    for init_from, seeds in ((None, True), (f"esm3:{encoder_file}", False)):
        curriculum = CurriculumCallback(warmup_steps=2, transition_steps=2, kmeans_init=True)
        model = ProteinTokenizer(**SMALL, init_from=init_from)
        curriculum.setup(trainer, model, "fit")
        assert curriculum._seeding is seeds
        # The setting itself (saved in checkpoints, compared on resume) is left as configured.
        assert curriculum.settings()["kmeans_init"] is True


def test_provq_fit_continues_a_structtokenbench_model_keeping_its_codebook(tmp_path):
    """A short ProVQ run from an AminoAseed checkpoint: warmup, no k-means over the loaded
    (frozen) base codebook, the soft transition and hard VQ; its codebook is the file's."""
    source = source_model("aminoaseed")
    folder = structtokenbench_folder(tmp_path, source)
    cfg = effective_config(REPO_ROOT / "experiments" / "proteins_sample.yaml")
    cfg["trainer"].update(max_steps=4, val_check_interval=4, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), version="t")
    cfg["curriculum"].update(warmup_steps=1, transition_steps=1, kmeans_collect_batches=1)
    assert cfg["curriculum"]["kmeans_init"]
    cfg["model"]["init_args"] = {**SMALL, "variant": "aminoaseed", "decoder_head": "esm3",
                                 "decoder_heads": 1,
                                 "init_from": f"structtokenbench:{folder}"}
    src = tmp_path / "src"
    src.mkdir()
    for name in ("1aki.pdb", "1k6p.pdb", "3o5r.cif"):
        shutil.copy(EDGE / name, src / name)
    cfg["data"]["init_args"].update(sources=str(src), cache_dir=str(tmp_path / "cache"),
                                    crop_length=48, val_fraction=0.3, batch_size=2)
    drop_train_sources(cfg)
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    provq_fit("--config", str(config))
    ckpt = torch.load(tmp_path / "proteins_sample_provq" / "t" / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    state = ckpt["state_dict"]
    assert torch.equal(state["quantizer.embedding.weight"], source.quantizer.embedding.weight)
    moved = state["encoder.proj.weight"] - source.state_dict()["encoder.proj.weight"]
    assert moved.abs().max() > 0  # it trained


def test_a_converted_model_tokenizes_and_decodes_with_the_cli(tmp_path, capsys):
    folder = structtokenbench_folder(tmp_path, source_model())
    esm3_convert.main(["--structtokenbench", str(folder), "--decoder-heads", "2",
               "--out", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / "checkpoints" / esm3_convert.CHECKPOINT_NAME
    assert f"wrote {ckpt}" in capsys.readouterr().out
    data = {"data": {"class_path": "provq_lightning.datamodules.proteins."
                     "ProteinStructureDataModule",
                     "init_args": {"sources": str(EDGE / "1aki.pdb"), "val_fraction": 0.0,
                                   "cache_dir": str(tmp_path / "cache"), "batch_size": 1}}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    tokens = tmp_path / "tokens"
    tokenize_main(["--ckpt", str(ckpt), "--data-config", str(tmp_path / "data.yaml"),
                   "--out", str(tokens), "--format", "npy", "--device", "cpu"])
    codes = dict(read_codes(tokens))
    assert list(codes) == ["1aki_A"] and len(codes["1aki_A"]) == 129
    model, _ = load_run(ckpt, None, tmp_path / "data.yaml", "cpu")
    direct = ProteinTokenizer.from_structtokenbench(folder, decoder_heads=2)
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    decode_main(["--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(tmp_path / "pdb"),
                 "--device", "cpu"])
    assert (tmp_path / "pdb" / "1aki_A.pdb").is_file()


def test_the_converter_names_a_bad_source_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        esm3_convert.main(["--esm3", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "run")])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent.pth not found" in err
