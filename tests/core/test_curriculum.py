import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback

from provq_lightning.callbacks.curriculum import CurriculumCallback, CurriculumError
from provq_lightning.datamodules.topodisc import TopoDiscDataModule
from provq_lightning.errors import ProvqError
from provq_lightning.schedules import Phase, alpha_at, omega
from provq_lightning.topodisc import TopoDiscTokenizer


class Probe(Callback):
    """Records what the module sees at each step (after the curriculum callback ran)."""

    def __init__(self):
        self.rows = []
        self.codebooks = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(
            (
                trainer.global_step,
                float(pl_module.curriculum_alpha),
                float(pl_module.curriculum_omega),
                pl_module.phase,
            )
        )
        self.codebooks[trainer.global_step] = pl_module.quantizer.codebook().detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1] = (*self.rows[-1], float(trainer.callback_metrics.get("train/vq", -1)))


def fit(callback, steps=40, num_codes=16):
    pl.seed_everything(0, verbose=False)
    probe = Probe()
    model = TopoDiscTokenizer(num_codes=num_codes)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, probe],
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10**6,
    )
    trainer.fit(model, TopoDiscDataModule(steps_per_epoch=10))
    return model, probe, trainer


def test_alpha_omega_phase_follow_the_schedule_every_step():
    cb = CurriculumCallback(warmup_steps=10, transition_steps=20, schedule="cosine", lam=0.3)
    _, probe, _ = fit(cb)
    for step, alpha, w, phase, _ in probe.rows:
        assert alpha == pytest.approx(alpha_at(step, 10, 20, "cosine"))
        assert w == pytest.approx(omega(alpha, 0.3))
        assert phase is (
            Phase.WARMUP if step < 10 else Phase.TRANSITION if step < 30 else Phase.DISCRETE
        )


def test_warmup_bypasses_quantizer_and_kmeans_seeds_once_at_the_boundary():
    cb = CurriculumCallback(warmup_steps=10, transition_steps=10, kmeans_collect_batches=3)
    model, probe, _ = fit(cb, steps=25)
    vq_losses = {row[0]: row[4] for row in probe.rows}
    assert all(vq_losses[s] == 0.0 for s in range(10))  # no VQ loss while warming up
    assert all(vq_losses[s] > 0.0 for s in range(10, 25))
    # Codebook untouched through warmup, replaced by k-means exactly at the boundary.
    assert torch.equal(probe.codebooks[0], probe.codebooks[9])
    assert not torch.allclose(probe.codebooks[9], probe.codebooks[10])
    assert cb.seed_count == 1 and cb.seeded_at_step == 10 and cb.reservoir is None


def test_seeded_codes_cover_the_encoder_outputs():
    cb = CurriculumCallback(warmup_steps=10, transition_steps=10, kmeans_collect_batches=3)
    model, probe, trainer = fit(cb, steps=11)  # stop right after seeding
    x = trainer.datamodule.train_set.tensors[0]
    with torch.no_grad():
        z = model.encoder(x)

    def quantization_error(codebook):
        return torch.cdist(z, codebook).min(dim=1).values.pow(2).mean()

    # k-means centres of the warmup latents fit them far better than the random init does.
    seeded, random_init = (
        quantization_error(probe.codebooks[10]),
        quantization_error(probe.codebooks[9]),
    )
    assert seeded < 0.2 * random_init


def test_validation_quantizes_hard_even_during_warmup():
    model = TopoDiscTokenizer(num_codes=8)
    model.set_curriculum(1.0, 0.5, Phase.WARMUP)
    x = torch.randn(50, 2)
    model.train()
    assert model.quantize(model.encoder(x)).indices is None
    model.eval()
    q = model.quantize(model.encoder(x))
    assert q.indices is not None
    torch.testing.assert_close(q.z_tilde, model.quantizer.codebook()[q.indices])


def test_variants_are_configurations():
    with pytest.raises(ValueError, match="kmeans_init: false"):
        CurriculumCallback(warmup_steps=0, transition_steps=10, kmeans_init=True)
    soft = CurriculumCallback(warmup_steps=0, transition_steps=10, kmeans_init=False)
    assert soft.values_at(0)[0] == 1.0 and soft.values_at(0)[2] is Phase.TRANSITION
    vanilla = CurriculumCallback(kmeans_init=False)
    assert vanilla.values_at(0) == (0.0, 1.0, Phase.DISCRETE)
    deferred = CurriculumCallback(warmup_steps=5)
    assert deferred.values_at(4)[2] is Phase.WARMUP and deferred.values_at(5) == (
        0.0,
        1.0,
        Phase.DISCRETE,
    )


def test_kmeans_samples_below_num_codes_is_refused_at_setup_naming_kmeans_samples():
    cb = CurriculumCallback(
        warmup_steps=3, transition_steps=3, kmeans_collect_batches=1, kmeans_samples=4
    )
    with pytest.raises(CurriculumError, match=r"kmeans_samples: 4 .*>= 16") as err:
        fit(cb, steps=6, num_codes=16)
    assert "kmeans_collect_batches" not in str(err.value)  # the advice names the real cause


def test_reservoir_that_cannot_fill_is_refused_on_the_first_warmup_batch():
    # TopoDisc batches hold 675 latents; 2 batches cannot seed 2048 codes.
    cb = CurriculumCallback(warmup_steps=50, transition_steps=3, kmeans_collect_batches=2)
    with pytest.raises(CurriculumError, match=r"step 0: .*kmeans_collect_batches to >= 4"):
        fit(cb, steps=60, num_codes=2048)


def test_more_codes_than_distinct_latents_warns_at_seeding():
    cb = CurriculumCallback(warmup_steps=4, transition_steps=4, kmeans_collect_batches=2)
    model = TopoDiscTokenizer(num_codes=64)
    cb.reservoir = torch.randn(40, 2).repeat(4, 1)  # 160 vectors, 40 distinct
    with pytest.warns(UserWarning, match="only 40 distinct encoder outputs for num_codes=64"):
        cb._seed_codebook(None, model, 4)
    assert cb.seeded


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("lam", 1.5, r"\[0, 1\]"),
        ("schedule", "cosin", "cosine, linear, exponential, hard"),
        ("kmeans_samples", 0, "positive count"),
        ("kmeans_samples", -3, "positive count"),
        ("warmup_steps", -1, ">= 0"),
        ("kmeans_collect_batches", 0, ">= 1"),
        ("kmeans_iters", 0, ">= 1"),
    ],
)
def test_bad_curriculum_value_is_one_line_naming_key_value_and_range(key, value, allowed):
    kwargs = {"warmup_steps": 10, "transition_steps": 10, key: value}
    with pytest.raises(CurriculumError, match=rf"^CurriculumCallback {key}: .*{allowed}") as err:
        CurriculumCallback(**kwargs)
    assert "\n" not in str(err.value) and repr(value) in str(err.value)


def test_resume_with_changed_curriculum_settings_is_refused_naming_the_change():
    saved = CurriculumCallback(warmup_steps=10, transition_steps=10).state_dict()
    CurriculumCallback(warmup_steps=10, transition_steps=10).load_state_dict(saved)
    for changed in ({"warmup_steps": 5}, {"warmup_steps": 20}, {"schedule": "linear"}):
        cb = CurriculumCallback(**{"warmup_steps": 10, "transition_steps": 10, **changed})
        key, value = next(iter(changed.items()))
        with pytest.raises(CurriculumError, match=rf"{key} .* -> {value!r}.*start a new run"):
            cb.load_state_dict(saved)


def test_nonfinite_reservoir_is_never_used_for_seeding():
    cb = CurriculumCallback(warmup_steps=4, transition_steps=4, kmeans_collect_batches=2)
    model = TopoDiscTokenizer(num_codes=8)
    cb.reservoir = torch.randn(100, 2)
    cb.reservoir[7, 1] = float("nan")
    with pytest.raises(ProvqError, match="1 of 100 .*NaN"):
        cb._seed_codebook(None, model, 4)
    assert not cb.seeded


class OwnQuantize(TopoDiscTokenizer):
    """A tokenizer with its own ``quantize``: its warmup bypass may leave the codebook idle."""

    def quantize(self, z, mask=None):
        return super().quantize(z, mask)


@pytest.mark.parametrize(
    ("strategy", "model", "warmup_steps", "refused"),
    [
        ("ddp", TopoDiscTokenizer, 10, False),  # the bypass touches the codebook (zero weight)
        ("ddp", OwnQuantize, 10, True),
        ("ddp_find_unused_parameters_true", OwnQuantize, 10, False),
        ("ddp", OwnQuantize, 0, False),  # no bypass, every parameter gets a gradient
    ],
)
def test_warmup_under_plain_ddp_is_refused_only_for_an_own_quantize(
    strategy, model, warmup_steps, refused
):
    callback = CurriculumCallback(
        warmup_steps=warmup_steps, transition_steps=10, kmeans_init=warmup_steps > 0
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False
    )
    if refused:
        with pytest.raises(ValueError, match="OwnQuantize.*ddp_find_unused_parameters_true") as e:
            callback.setup(trainer, model(num_codes=8), "fit")
        assert "\n" not in str(e.value)
    else:
        callback.setup(trainer, model(num_codes=8), "fit")
