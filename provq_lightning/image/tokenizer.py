"""``ImageTokenizer``: LlamaGen's VQ-16 image tokenizer trained under ProVQ's curriculum.

Encoder -> 1x1 conv to the code dim -> ``VectorQuantizer`` (driven by the
``CurriculumCallback``: bypassed in warmup, mixed in transition, hard afterwards) -> 1x1 conv
back -> decoder. Losses: pixel L2 + LPIPS + the curriculum-weighted VQ loss, and a PatchGAN
with hinge losses from ``disc_start``. Two optimizers under manual optimization.

Step counting: under manual optimization Lightning's ``global_step`` counts the calls of
``LightningOptimizer.step``; the discriminator's optimizer is stepped through the raw torch
optimizer, so ``global_step`` counts generator optimizer steps. With
``accumulate_grad_batches: N`` one optimizer step takes N batches, and ``max_steps``,
checkpoint intervals, the curriculum, ``disc_start`` and the EMA all count optimizer steps (as
LlamaGen counts iterations); Lightning's batch-counted settings (``val_check_interval``,
``log_every_n_steps``, the x-axis of logged scalars) still count batches. (Only bf16-mixed and
fp32 precision are supported: fp16 needs the grad scaler on both optimizers.)

One backward pass per batch covers both nets (the GAN term reaches the generator only, the
discriminator loss sees detached images), and idle parameters (the discriminator before
``disc_start``, the quantizer in warmup) get zero-weight terms, so every backward reaches every
parameter and plain ``strategy: ddp`` works without ``find_unused_parameters``.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from provq_lightning.image.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from provq_lightning.image.metrics import ReconstructionMetrics
from provq_lightning.image.pretrained import build_fid_inception, build_lpips
from provq_lightning.image.transforms import to_model_range, to_uint8_image
from provq_lightning.image.vqgan import Decoder, Encoder
from provq_lightning.image_log import log_figure
from provq_lightning.quantizer import VectorQuantizer
from provq_lightning.schedules import Phase
from provq_lightning.tokenizer import VQTokenizer, zero_weight_term

DISC_START_FROM = ("run", "quantization")


def batch_images(batch: dict[str, Any]) -> int:
    """Images in a batch; the ``batch_size_fn`` of Lightning's ``ThroughputMonitor``."""
    return int(batch["image"].shape[0])


class ImageTokenizer(VQTokenizer):
    """VQGAN image tokenizer. Defaults are LlamaGen's VQ-16 (256px -> 16x16 codes).

    Args:
        ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout: encoder/decoder shape
            (LlamaGen: 128, (1, 1, 2, 2, 4), 2, 256, 32, 0.0).
        num_codes, code_dim: codebook K x D (16384 x 8); ``l2_normalize`` codes and latents
            (LlamaGen's codebook_l2_norm); ``beta`` commitment weight (0.25);
            ``linear_codebook`` / ``freeze_base_codebook`` for SimVQ; ``codebook_init``.
        pixel_weight: weight of the pixel L2 loss (1.0).
        lpips_weight: weight of LPIPS (1.0); 0 turns LPIPS off (no weights needed).
        lpips_vgg_path: torchvision VGG16 checkpoint; default the torch hub cache.
        disc_weight: weight of the adversarial losses (0.5); 0 turns the GAN off.
        disc_start: step at which the discriminator starts (LlamaGen: 20000).
        disc_start_from: ``run`` counts ``disc_start`` from step 0; ``quantization`` from the
            first step that quantizes (the end of warmup), like the authors' two-stage runs.
        adaptive_disc_weight: scale the generator's GAN loss by taming's gradient-norm ratio.
        disc_ndf, disc_layers, disc_norm: PatchGAN width, depth, normalisation.
        lr, betas, weight_decay: AdamW for both nets (1e-4, (0.9, 0.95), 0.05).
        grad_clip: gradient-norm clip of both optimizers (1.0; 0 = off).
        ema_decay: keep an EMA of the generator weights and evaluate with it (None = off).
        eval_lpips, eval_fid: LPIPS / rFID in validation (need local weights).
        fid_inception_path: FID Inception-V3 weights; default the torch hub cache.
        num_log_images: inputs vs reconstructions shown per validation (every logger).
        accumulate_grad_batches: batches per optimizer step (Lightning's own option is refused
            under manual optimization); the loss of each batch is divided by it, as Lightning
            does, and the last batch of an epoch steps even if its window is short.
        compile: ``torch.compile`` the encoder and the decoder (in place: checkpoints keep
            their keys); ``true`` uses the default backend (inductor), a string names another
            ``torch.compile`` backend (``aot_eager``, ``cudagraphs``, ...).
        init_from: start from a LlamaGen VQ checkpoint: ``llamagen:PATH`` (its ``model``
            weights) or ``llamagen-ema:PATH`` (its ``ema`` weights); the shape arguments must
            match it (``from_llamagen`` reads them from the file). See
            ``provq_lightning.image.llamagen``.
    """

    # No FLOP count: tells Lightning's ThroughputMonitor not to warn about it on every run.
    flops_per_batch = None

    def __init__(
        self,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        norm_groups: int = 32,
        dropout: float = 0.0,
        num_codes: int = 16384,
        code_dim: int = 8,
        beta: float = 0.25,
        l2_normalize: bool = True,
        linear_codebook: bool = False,
        freeze_base_codebook: bool = False,
        codebook_init: str = "uniform",
        pixel_weight: float = 1.0,
        lpips_weight: float = 1.0,
        lpips_vgg_path: str | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 20000,
        disc_start_from: str = "run",
        adaptive_disc_weight: bool = False,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "batch",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        grad_clip: float = 1.0,
        ema_decay: float | None = None,
        eval_lpips: bool = True,
        eval_fid: bool = True,
        fid_inception_path: str | None = None,
        num_log_images: int = 8,
        accumulate_grad_batches: int = 1,
        compile: bool | str = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if disc_start_from not in DISC_START_FROM:
            raise ValueError(f"disc_start_from must be one of {DISC_START_FROM}")
        if isinstance(accumulate_grad_batches, bool) or not (
            isinstance(accumulate_grad_batches, int) and accumulate_grad_batches >= 1
        ):
            raise ValueError(
                f"model.init_args.accumulate_grad_batches: {accumulate_grad_batches!r} is not "
                "allowed; use an integer >= 1 (batches per optimizer step)"
            )
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        shape = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                     z_channels=z_channels, norm_groups=norm_groups, dropout=dropout)
        self.encoder = Encoder(**shape)
        self.decoder = Decoder(**shape)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.quantizer = VectorQuantizer(
            num_codes,
            code_dim,
            beta=beta,
            l2_normalize=l2_normalize,
            linear_codebook=linear_codebook,
            freeze_base_codebook=freeze_base_codebook,
            init=codebook_init,
        )
        self.discriminator = (
            PatchDiscriminator(3, disc_ndf, disc_layers, disc_norm) if disc_weight > 0 else None
        )
        # First step that quantized (-1 = not yet); a buffer, so resumed runs keep it.
        self.register_buffer("quantization_start", torch.tensor(-1, dtype=torch.long))
        self.ema: nn.ModuleDict | None = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(self._generator()).requires_grad_(False)
        # Frozen pretrained nets are built in setup() and kept out of state_dict.
        self._frozen: dict[str, Any] = {}
        self._log_batch: dict[str, torch.Tensor] | None = None
        # True between the first batch of an accumulation window and its optimizer step.
        self._grads_pending = False
        if init_from:
            self._init_from_llamagen(init_from)
        if compile:
            # After the EMA copy, which stays eager (it only runs in evaluation swaps).
            options = {"backend": compile} if isinstance(compile, str) else {}
            self.encoder.compile(**options)
            self.decoder.compile(**options)

    @classmethod
    def from_llamagen(
        cls, path: str | Path, weights: str = "model", **overrides: Any
    ) -> ImageTokenizer:
        """An ``ImageTokenizer`` holding a LlamaGen VQ-8 / VQ-16 checkpoint, in eval mode.

        The network's shape comes from the file; ``overrides`` set any other argument (loss
        weights, ``eval_fid``, ...). ``weights``: the checkpoint's ``"model"`` (default, what
        LlamaGen's own scripts load) or ``"ema"``.
        """
        from provq_lightning.image import llamagen

        path = Path(path)
        payload = llamagen.read_checkpoint(path)
        arch = llamagen.infer_architecture(llamagen.select_weights(payload, path, weights), path)
        model = cls(**{**arch, **llamagen.FIXED_ARGS, **overrides})
        llamagen.load_into(model, payload, path, weights)
        return model.eval()

    def _init_from_llamagen(self, spec: str) -> None:
        from provq_lightning.image import llamagen

        path, weights = llamagen.parse_init_from(spec)
        payload = llamagen.read_checkpoint(path)
        llamagen.load_into(self, payload, path, weights, where="model.init_args.")

    def _generator(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "encoder": self.encoder,
                "decoder": self.decoder,
                "quant_conv": self.quant_conv,
                "post_quant_conv": self.post_quant_conv,
                "quantizer": self.quantizer,
            }
        )

    # -- pretrained nets --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        hp = self.hparams
        if "metrics" in self._frozen:
            return  # built by an earlier stage of the same trainer
        if hp.lpips_weight > 0 or hp.eval_lpips:
            hint = "model.init_args.lpips_weight: 0 and eval_lpips: false"
            self._frozen["lpips"] = build_lpips(hp.lpips_vgg_path, hint)
        fid = None
        if hp.eval_fid:
            fid = build_fid_inception(hp.fid_inception_path, "model.init_args.eval_fid: false")
        lpips_eval = self._frozen.get("lpips") if hp.eval_lpips else None
        self._frozen["metrics"] = ReconstructionMetrics(lpips_eval, fid)

    def _frozen_on_device(self, name: str) -> Any:
        net = self._frozen.get(name)
        return net.to(self.device) if net is not None else None

    # -- model ------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (B, h, w, D) channel-last, as the quantizer takes them."""
        return self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from (B, h, w, D) latents."""
        return self.decoder(self.post_quant_conv(z.permute(0, 3, 1, 2)))

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h, w) of model-range images, always hard."""
        return self.quantizer(self.encode(images), alpha=0.0).indices

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from code ids (B, h, w) (exact codebook entries)."""
        codes = torch.as_tensor(codes, device=self.device).long()
        k = self.quantizer.num_codes
        if codes.numel() == 0 or int(codes.min()) < 0 or int(codes.max()) >= k:
            raise ValueError(f"code ids must lie in [0, {k}); got shape {tuple(codes.shape)}")
        return self.decode(self.quantizer.lookup(codes))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own reconstruction: decode(hard codes(images))."""
        return self.decode_codes(self.encode_codes(to_model_range(images)))

    # -- training ---------------------------------------------------------------------------
    def curriculum_step(self) -> int:
        # Generator optimizer steps (the discriminator steps the raw optimizer): one per batch,
        # or one per accumulation window, whose batches all see the same step.
        return self.trainer.global_step

    def disc_active(self, step: int) -> bool:
        hp = self.hparams
        if self.discriminator is None:
            return False
        if hp.disc_start_from == "run":
            return step >= hp.disc_start
        start = int(self.quantization_start)
        return start >= 0 and step >= start + hp.disc_start

    def _perceptual(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.lpips_weight <= 0:
            return recon.new_zeros(())
        return self._frozen_on_device("lpips")(recon, target).mean()

    def _window_ends(self, batch_idx: int) -> bool:
        """Whether this batch closes its accumulation window (Lightning's rule: every N-th
        batch of the epoch, and the epoch's last batch)."""
        accumulate = self.hparams.accumulate_grad_batches
        trainer = self.trainer
        return (
            accumulate == 1
            or (batch_idx + 1) % accumulate == 0
            or batch_idx + 1 == trainer.num_training_batches
            or trainer.is_last_batch
        )

    def _grad_sync(self, sync: bool):
        """DDP's ``no_sync`` for the batches inside a window: gradients are all-reduced once,
        at the window's last backward (DDP reduces the accumulated ``.grad``)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return nullcontext() if sync or block is None else block()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        step = self.curriculum_step()  # optimizer steps: constant across a window
        if self.phase is not Phase.WARMUP and int(self.quantization_start) < 0:
            self.quantization_start.fill_(step)
            if self.ema is not None:  # k-means just replaced the codebook: restart the EMA
                self.ema.load_state_dict(self._generator().state_dict())
        opt_g, opt_d = self.optimizers()
        x = batch["image"]
        q = self.quantize(self.encode(x))
        x_hat = self.decode(q.z_tilde)
        pixel = F.mse_loss(x_hat.float(), x.float())
        perceptual = self._perceptual(x_hat, x)
        nll = hp.pixel_weight * pixel + hp.lpips_weight * perceptual
        loss = nll + self.vq_loss_weight * q.loss
        use_disc = self.disc_active(step)
        gan = weight = d_loss = x.new_zeros(())
        if use_disc:
            self.discriminator.requires_grad_(False)  # the GAN term trains the generator only
            gan = hinge_g_loss(self.discriminator(x_hat))
            weight = x.new_ones(())
            if hp.adaptive_disc_weight:
                weight = adaptive_weight(nll, gan, self.decoder.last_layer_weight)
            loss = loss + hp.disc_weight * weight * gan
            self.discriminator.requires_grad_(True)
            # Detached images: this loss trains the discriminator only.
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(x_hat.detach())
            d_loss = hp.disc_weight * hinge_d_loss(logits_real, logits_fake)
        total = loss + d_loss
        if self.discriminator is not None and not use_disc:
            total = total + zero_weight_term(self.discriminator)
        step_now = self._window_ends(batch_idx)
        with self._grad_sync(step_now):
            self.manual_backward(total / hp.accumulate_grad_batches)
        self._grads_pending = not step_now
        if step_now:
            self._clip(opt_g)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            if self.ema is not None:
                self._update_ema()
            if use_disc:
                self._clip(opt_d)
                opt_d.optimizer.step()  # raw step: global_step keeps counting generator steps
            opt_d.zero_grad(set_to_none=True)
        if self.should_log_step():
            self.log_dict(
                {
                    "train/loss": loss.detach(),
                    "train/pixel_l2": pixel.detach(),
                    "train/lpips": perceptual.detach(),
                    "train/vq": q.loss.detach(),
                    "train/commit": q.commit_loss.detach(),
                    "train/gan_g": gan.detach(),
                    "train/gan_weight": weight.detach(),
                    "train/gan_d": d_loss.detach(),
                },
                on_step=True,
                on_epoch=False,
                batch_size=x.shape[0],
            )
        return loss.detach()

    @property
    def grads_pending(self) -> bool:
        """True inside a gradient-accumulation window: a checkpoint now would lose gradients."""
        return self._grads_pending

    def on_validation_model_zero_grad(self) -> None:
        # Lightning clears gradients before validation; inside a window they are still needed.
        if not self._grads_pending:
            super().on_validation_model_zero_grad()

    def _clip(self, optimizer) -> None:
        if self.hparams.grad_clip > 0:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hparams.ema_decay
        live = self._generator().state_dict()
        for name, value in self.ema.state_dict().items():
            source = live[name]
            if value.dtype.is_floating_point:
                value.lerp_(source, 1.0 - decay)
            else:
                value.copy_(source)

    def configure_optimizers(self):
        hp = self.hparams
        # ``_trainer``: the public property raises when the module is used without a Trainer.
        trainer = self._trainer
        if trainer is not None and "16-mixed" == str(trainer.precision):
            raise ValueError("ImageTokenizer supports bf16-mixed and 32-true precision, not fp16")
        gen = [p for p in self._generator().parameters() if p.requires_grad]
        opt_g = torch.optim.AdamW(gen, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        disc = list(self.discriminator.parameters()) if self.discriminator is not None else []
        # An empty discriminator optimizer keeps the two-optimizer layout uniform.
        opt_d = torch.optim.AdamW(
            disc or [nn.Parameter(torch.zeros(()))],
            lr=hp.lr,
            betas=hp.betas,
            weight_decay=hp.weight_decay,
        )
        return [opt_g, opt_d]

    # -- evaluation -------------------------------------------------------------------------
    def _swap_ema(self) -> None:
        """Exchange live and EMA generator weights (called around evaluation)."""
        if self.ema is None:
            return
        live = self._generator().state_dict()
        with torch.no_grad():
            for name, value in self.ema.state_dict().items():
                tmp = live[name].clone()
                live[name].copy_(value)
                value.copy_(tmp)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._swap_ema()
        metrics = self._frozen["metrics"]
        metrics.to(self.device)
        self._frozen_on_device("lpips")
        metrics.reset()
        self._log_batch = None

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def _evaluate(self, batch: dict[str, Any]) -> None:
        x = batch["image"]
        q = self.quantize(self.encode(x))  # hard in eval, whatever the phase
        x_hat = self.decode(self.quantizer.lookup(q.indices))
        self._frozen["metrics"].update(x_hat, x)
        self.update_codebook_metrics(q.indices)
        if self._log_batch is None and self.hparams.num_log_images > 0:
            n = self.hparams.num_log_images
            self._log_batch = {"input": x[:n].detach(), "recon": x_hat[:n].detach()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def _finish_eval(self, prefix: str) -> None:
        metrics = self._frozen["metrics"]
        for name, value in metrics.compute(prefix).items():
            self.log(name, value.float(), sync_dist=False)
        metrics.reset()
        self._log_images(prefix)
        self._swap_ema()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._finish_eval("test")

    def _log_images(self, prefix: str) -> None:
        batch, self._log_batch = self._log_batch, None
        if batch is None:
            return
        from torchvision.utils import make_grid

        from provq_lightning.image.transforms import to_unit_range

        pairs = torch.stack([batch["input"], batch["recon"]], dim=1).flatten(0, 1)
        grid = make_grid(to_unit_range(pairs), nrow=2, padding=2)
        # Every logger (rank 0, not in the sanity check): TensorBoard/W&B/MLflow images, PNGs else.
        log_figure(self, f"{prefix}/input_vs_reconstruction", grid)

    # -- tokenize / decode hooks (provq-tokenize, provq-decode) ---------------------------
    @torch.no_grad()
    def tokenize_batch(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """``(key, int64 code ids (h, w))`` per image of a batch."""
        was_training = self.training
        self.eval()
        try:
            images = to_model_range(batch["image"].to(self.device))
            codes = self.encode_codes(images).cpu()
        finally:
            self.train(was_training)
        return [(str(key), codes[i]) for i, key in enumerate(batch["key"])]

    @torch.no_grad()
    def decode_tokens_to_file(self, key: str, codes: torch.Tensor, out_dir: Path) -> Path:
        """Decode one image's codes (h, w) and write ``out_dir/<key>.png``."""
        was_training = self.training
        self.eval()
        try:
            image = self.decode_codes(torch.as_tensor(codes).reshape(1, *codes.shape[-2:]))[0]
        finally:
            self.train(was_training)
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
        path = Path(out_dir) / f"{safe}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8_image(image)).save(path)
        return path
