"""VQGAN shapes, GAN losses, and ImageTokenizer training under the ProVQ curriculum."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.errors import ProvqError
from provq_lightning.image.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from provq_lightning.image.pretrained import MissingWeights
from provq_lightning.image.tokenizer import ImageTokenizer
from provq_lightning.image.vqgan import Decoder, Encoder
from provq_lightning.runs.migrations import upgrade_checkpoint
from provq_lightning.schedules import Phase
from tests.image.helpers import TINY, Batches, Module

REPO = Path(__file__).resolve().parents[2]


def test_llamagen_layout_downsamples_16x_and_decodes_back():
    enc = Encoder(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, norm_groups=4)
    dec = Decoder(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, norm_groups=4)
    z = enc(torch.randn(2, 3, 64, 64))
    assert z.shape == (2, 16, 4, 4)
    assert dec(z).shape == (2, 3, 64, 64)
    # Attention sits at the lowest resolution only (encoder: after each block of the last level).
    assert [len(level.attn) for level in enc.levels] == [0, 0, 0, 0, 2]
    assert [len(level.attn) for level in dec.levels] == [3, 0, 0, 0, 0]


def test_patchgan_and_hinge_losses():
    d = PatchDiscriminator(3, ndf=8, n_layers=3)
    logits = d(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake) == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake) == pytest.approx(1.0)


def test_missing_lpips_weights_fail_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = ImageTokenizer(**{**TINY, "lpips_weight": 1.0})
    with pytest.raises(MissingWeights, match=str(tmp_path / "hub" / "checkpoints")):
        model.setup("fit")


class Record(L.Callback):
    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, pl_module.phase, float(pl_module.curriculum_alpha),
                          pl_module.disc_active(trainer.global_step - 1)))


def test_curriculum_drives_the_tokenizer_and_global_step_counts_batches(tmp_path):
    torch.manual_seed(0)
    model = Module(**{**TINY, "disc_start": 2, "disc_start_from": "quantization",
                      "ema_decay": 0.9})
    curriculum = CurriculumCallback(warmup_steps=4, transition_steps=3, kmeans_samples=256,
                                    kmeans_collect_batches=2)
    record = Record()
    loader = torch.utils.data.DataLoader(Batches(64), batch_size=8)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=[curriculum, record], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=2, val_check_interval=10,
                        check_val_every_n_epoch=None)
    trainer.fit(model, loader, loader)
    assert trainer.global_step == 10  # one per batch although two optimizers step
    phases = [row[1] for row in record.rows]
    assert phases[:4] == [Phase.WARMUP] * 4 and phases[4:7] == [Phase.TRANSITION] * 3
    assert phases[7:] == [Phase.DISCRETE] * 3
    assert curriculum.seed_count == 1 and int(model.quantization_start) == 4
    # The GAN starts disc_start steps after quantization began (step 4 + 2).
    assert [row[3] for row in record.rows] == [False] * 6 + [True] * 4
    metrics = trainer.callback_metrics
    for key in ("val/psnr", "val/ssim", "val/utilization", "val/perplexity"):
        assert math.isfinite(float(metrics[key])), key
    assert 0 < float(metrics["val/ssim"]) < 1


def test_validation_quantizes_hard_during_warmup():
    torch.manual_seed(0)
    model = Module(**TINY).eval()
    model.set_curriculum(1.0, 0.0, Phase.WARMUP)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    q = model.quantize(model.encode(x))
    assert q.indices is not None
    assert torch.allclose(q.z_tilde, model.quantizer.lookup(q.indices), atol=1e-6)


def test_the_model_alone_maps_uint8_batches_to_its_range():
    torch.manual_seed(0)
    model = ImageTokenizer(**TINY).eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x = model.model_input({"image": images})
    assert torch.equal(x, images.float() / 127.5 - 1)
    # reconstruct takes the uint8 pixels or images already in [-1, 1] (LlamaGen's convention).
    assert torch.equal(model.reconstruct(images), model.reconstruct(x))
    with pytest.raises(ProvqError, match="float32, not uint8") as err:
        model.model_input({"image": x})  # converted twice would be silently wrong
    assert "\n" not in str(err.value)


def test_checkpoints_with_the_discriminator_at_the_top_level_still_load():
    """Checkpoints from before ``VQGANLoss`` held the PatchGAN at ``discriminator.*``."""
    torch.manual_seed(0)
    saved = ImageTokenizer(**TINY).state_dict()
    old = {k.replace("loss.discriminator.", "discriminator.", 1): v for k, v in saved.items()}
    assert any(k.startswith("discriminator.") for k in old)
    torch.manual_seed(1)
    model = ImageTokenizer(**TINY)
    model.load_state_dict(upgrade_checkpoint({"state_dict": old})["state_dict"], strict=True)
    assert model.state_dict().keys() == saved.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize(
    "name",
    ["imagenet_sample_64px", "imagenet_sample_64px_vanilla", "in1k_16x16", "in1k_24x24",
     "in100/vanilla", "in100/soft_only", "in100/warmup_only", "in100/provq", "in100/simvq",
     "in100/simvq_soft", "in100/provq_hard_schedule"],
)
def test_configs_resolve(name, capsys):
    from provq_lightning.tools.fit import main

    configs = [REPO / "experiments" / f"{name}.yaml"]
    if name.startswith("in100/"):  # the ablations share a base
        configs.insert(0, REPO / "experiments" / "in100" / "base.yaml")
    args = [a for c in configs for a in ("--config", str(c))]
    argv = sys.argv
    try:
        main([*args, "--print_config"])
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err[-2000:]
    finally:
        sys.argv = argv
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"].endswith("ImageTokenizer")
    if name.startswith("in100/"):
        assert out["data"]["init_args"]["class_list"] == "experiments/in100/classes.txt"
        assert out["model"]["init_args"]["disc_start_from"] == "quantization"
        simvq = name.startswith("in100/simvq")
        assert out["model"]["init_args"]["linear_codebook"] is simvq
