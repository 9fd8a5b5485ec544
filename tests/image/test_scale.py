"""The image tokenizer at scale: gradient accumulation and ``torch.compile`` (issue 14)."""

from __future__ import annotations

import lightning as L
import torch

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.schedules import Phase
from tests.image.helpers import TINY, Batches, Module

STEPS, WARMUP, TRANSITION = 6, 2, 2


class SGDModule(Module):
    """SGD instead of AdamW: Adam divides by |gradient|, which turns rounding in a near-zero
    gradient into a difference of up to a whole step, and would hide what is compared here."""

    def configure_optimizers(self):
        opt_g, opt_d = super().configure_optimizers()
        return [torch.optim.SGD(group["params"], lr=0.1) for group in
                (opt_g.param_groups[0], opt_d.param_groups[0])]


class Phases(L.Callback):
    """(optimizer step, phase, alpha) as each batch starts, after the curriculum has set them,
    and the generator's gradients at the first optimizer step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, Phase, float]] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, pl_module.phase, float(pl_module.curriculum_alpha)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.first_grads is None:
            self.first_grads = {name: p.grad.clone() for name, p in pl_module.named_parameters()
                                if p.grad is not None}


def fit(batch_size: int, accumulate: int) -> tuple[SGDModule, Phases, L.Trainer]:
    torch.manual_seed(0)
    model = SGDModule(**{**TINY, "disc_weight": 0.0, "accumulate_grad_batches": accumulate,
                         "ema_decay": 0.5})
    phases = Phases()
    curriculum = CurriculumCallback(warmup_steps=WARMUP, transition_steps=TRANSITION,
                                    kmeans_collect_batches=1, kmeans_samples=4096)
    # The same 96 images in the same order: 6 batches of 16, or 24 batches of 4.
    loader = torch.utils.data.DataLoader(Batches(STEPS * 16), batch_size=batch_size)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False,
                        enable_checkpointing=False, callbacks=[curriculum, phases],
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, loader)
    return model, phases, trainer


def test_four_batches_of_4_accumulated_equal_one_batch_of_16():
    whole, whole_phases, whole_trainer = fit(16, 1)
    split, split_phases, split_trainer = fit(4, 4)
    # max_steps and global_step count optimizer steps: 24 batches made 6 steps.
    assert whole_trainer.global_step == split_trainer.global_step == STEPS
    assert len(split_phases.rows) == 4 * len(whole_phases.rows) == 4 * STEPS
    # The curriculum is a function of the optimizer step: each step's 4 batches see what the
    # single batch of that step saw, so k-means seeding and the transition fall on the same step.
    assert split_phases.rows == [row for row in whole_phases.rows for _ in range(4)]
    assert [row[1] for row in whole_phases.rows] == (
        [Phase.WARMUP] * 2 + [Phase.TRANSITION] * 2 + [Phase.DISCRETE] * 2
    )
    assert int(whole.quantization_start) == int(split.quantization_start) == WARMUP
    # The accumulated gradient of 4 x 4 images is the gradient of the 16 (GroupNorm is
    # per-sample, the losses are means), up to float rounding.
    grads_whole, grads_split = whole_phases.first_grads, split_phases.first_grads
    assert grads_whole.keys() == grads_split.keys() and len(grads_whole) > 10
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # And so do the weights (and their EMA) six steps later, through k-means and transition.
    a, b = whole.state_dict(), split.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


def test_zero_weight_warmup_terms_leave_the_optimizer_untouched():
    # The bypassed codebook and the idle discriminator get zero-weight terms for plain DDP;
    # the optimizers must still skip them (no Adam step count, no weight decay).
    torch.manual_seed(0)
    model = Module(**{**TINY, "disc_start": 100, "weight_decay": 0.5})
    codebook = model.quantizer.embedding.weight.detach().clone()
    curriculum = CurriculumCallback(warmup_steps=10, transition_steps=0, kmeans_init=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=[curriculum], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(Batches(8), batch_size=4))
    opt_g, opt_d = trainer.optimizers
    assert model.phase is Phase.WARMUP and trainer.global_step == 2
    assert model.quantizer.embedding.weight not in opt_g.state
    assert model.encoder.conv_in.weight in opt_g.state  # the generator did step
    assert torch.equal(model.quantizer.embedding.weight, codebook)
    assert not opt_d.state and all(p.grad is None for p in model.loss.discriminator.parameters())

def test_compiled_encoder_and_decoder_match_eager_outputs_and_gradients():
    # aot_eager: TorchDynamo captures the real modules and AOTAutograd builds forward and
    # backward graphs, without inductor's C++ build (a minute or more on 2 shared CPU cores);
    # `make gpu-check` measures inductor on a GPU.
    torch.manual_seed(0)
    eager = Module(**TINY)
    compiled = Module(**TINY, compile="aot_eager")
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    outputs = []
    for model in (eager, compiled):
        z = model.encode(x)
        y = model.decode(z)
        y.square().mean().backward()
        grads = (model.encoder.conv_in.weight.grad, model.decoder.conv_out.weight.grad)
        outputs.append((z, y, *grads))
    for got, want in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled.encoder._compiled_call_impl is not None  # really compiled
