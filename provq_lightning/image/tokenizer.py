"""``ImageTokenizer``: LlamaGen's VQ-16 image tokenizer trained under ProVQ's curriculum.

The recipe: uint8 images -> [-1, 1] (``model_input``, the only conversion) -> encoder -> 1x1
conv -> ``VectorQuantizer`` (bypassed in warmup, mixed in transition, hard afterwards: the
``CurriculumCallback``) -> 1x1 conv -> decoder; pixel L2 + LPIPS + curriculum-weighted VQ loss
and a PatchGAN from ``disc_start`` (``losses.py``); an optional EMA of the generator, which
evaluation uses (``ema.py``). Two optimizers under manual optimization, with gradient
accumulation (``accumulation.py``: what counts optimizer steps and what batches). One backward
per batch covers both nets, and idle parameters (the waiting discriminator, the bypassed
codebook) get zero-weight terms, so plain ``strategy: ddp`` works without
``find_unused_parameters``. Precision: bf16-mixed or fp32 (fp16 would need two grad scalers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from provq_lightning.image import llamagen
from provq_lightning.image.accumulation import (
    GradientAccumulation,
    check_accumulate_grad_batches,
)
from provq_lightning.image.ema import GeneratorEMA
from provq_lightning.image.losses import VQGANLoss
from provq_lightning.image.metrics import frozen_nets
from provq_lightning.image.transforms import pairs_grid, to_model_range, to_uint8_image
from provq_lightning.image.vqgan import Decoder, Encoder
from provq_lightning.reporting.figures import log_figure
from provq_lightning.tokenizer import VQTokenizer
from provq_lightning.tokens.codes import check_codes
from provq_lightning.tokens.names import safe_file_name
from provq_lightning.vq.quantizer import VectorQuantizer


def batch_images(batch: dict[str, Any]) -> int:
    """Images in a batch; the ``batch_size_fn`` of Lightning's ``ThroughputMonitor``."""
    return int(batch["image"].shape[0])


class ImageTokenizer(GradientAccumulation, VQTokenizer):
    """VQGAN image tokenizer. Defaults are LlamaGen's VQ-16 (256px -> 16x16 codes).

    Args:
        ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout: encoder/decoder shape
            (LlamaGen: 128, (1, 1, 2, 2, 4), 2, 256, 32, 0.0).
        num_codes, code_dim: codebook K x D (16384 x 8); ``l2_normalize`` codes and latents
            (LlamaGen's codebook_l2_norm); ``beta`` commitment weight (0.25);
            ``linear_codebook`` / ``freeze_base_codebook`` for SimVQ; ``codebook_init``.
        pixel_weight, lpips_weight: weights of pixel L2 and LPIPS (1.0, 1.0); LPIPS 0 is off.
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
        ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
        z_channels: int = 256, norm_groups: int = 32, dropout: float = 0.0, num_codes: int = 16384,
        code_dim: int = 8, beta: float = 0.25, l2_normalize: bool = True,
        linear_codebook: bool = False, freeze_base_codebook: bool = False,
        codebook_init: str = "uniform", pixel_weight: float = 1.0, lpips_weight: float = 1.0,
        lpips_vgg_path: str | None = None, disc_weight: float = 0.5, disc_start: int = 20000,
        disc_start_from: str = "run", adaptive_disc_weight: bool = False, disc_ndf: int = 64,
        disc_layers: int = 3, disc_norm: str = "batch", lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.05,
        grad_clip: float = 1.0, ema_decay: float | None = None, eval_lpips: bool = True,
        eval_fid: bool = True, fid_inception_path: str | None = None, num_log_images: int = 8,
        accumulate_grad_batches: int = 1, compile: bool | str = False, init_from: str | None = None,
    ) -> None:
        check_accumulate_grad_batches(accumulate_grad_batches)
        # Built in LlamaGen's order (encoder, decoder, convs, codebook, discriminator): the
        # random initialisation of a seed stays what it was.
        shape = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                     z_channels=z_channels, norm_groups=norm_groups, dropout=dropout)
        encoder, decoder = Encoder(**shape), Decoder(**shape)
        quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, l2_normalize=l2_normalize,
                                    linear_codebook=linear_codebook, init=codebook_init,
                                    freeze_base_codebook=freeze_base_codebook)
        super().__init__(quantizer)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.batches_per_step = accumulate_grad_batches  # GradientAccumulation's N
        self.encoder, self.decoder = encoder, decoder
        self.quant_conv, self.post_quant_conv = quant_conv, post_quant_conv
        self.loss = VQGANLoss(pixel_weight, lpips_weight, disc_weight, disc_start,
                              disc_start_from, adaptive_disc_weight, disc_ndf, disc_layers,
                              disc_norm)
        self.ema = GeneratorEMA(self.generator(), ema_decay) if ema_decay is not None else None
        # Frozen pretrained nets are built in setup() and kept out of state_dict.
        self._frozen: dict[str, Any] = {}
        self._log_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        if init_from:
            llamagen.init_from(self, init_from)
        if compile:
            # After the EMA copy, which stays eager (it only runs in evaluation swaps).
            options = {"backend": compile} if isinstance(compile, str) else {}
            self.encoder.compile(**options)
            self.decoder.compile(**options)

    @classmethod
    def from_llamagen(cls, path: str | Path, weights: str = "model",
                      **overrides: Any) -> ImageTokenizer:
        """An ``ImageTokenizer`` holding a LlamaGen VQ-8 / VQ-16 checkpoint, in eval mode: the
        shape from the file, ``overrides`` for any other argument; ``weights``: the file's
        ``"model"`` (default, what LlamaGen's own scripts load) or ``"ema"``."""
        return llamagen.build(cls, Path(path), weights, overrides)

    def generator(self) -> nn.ModuleDict:
        """The generator's modules (what its optimizer, the EMA and LlamaGen import cover)."""
        names = ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantizer")
        return nn.ModuleDict({name: getattr(self, name) for name in names})

    def setup(self, stage: str) -> None:
        if not self._frozen:  # once: a later stage of the same trainer keeps them
            self._frozen = frozen_nets(self.hparams)

    def _frozen_on_device(self, name: str) -> Any:
        net = self._frozen.get(name)
        return net.to(self.device) if net is not None else None

    # -- model ------------------------------------------------------------------------------
    def model_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's uint8 images (B, 3, H, W), as the datamodules deliver them, in the
        model's range [-1, 1] on its device: the one place images are converted."""
        return to_model_range(batch["image"].to(self.device))

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
        check_codes(codes, self.quantizer.num_codes)
        return self.decode(self.quantizer.lookup(codes))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own reconstruction, decode(hard codes(images)), in [-1, 1]: of uint8
        images (B, 3, H, W) or of images already in [-1, 1] (LlamaGen's convention)."""
        x = to_model_range(images) if images.dtype == torch.uint8 else images
        return self.decode_codes(self.encode_codes(x))

    # -- training ---------------------------------------------------------------------------
    def disc_active(self, step: int) -> bool:
        """Whether the GAN trains at optimizer step ``step``."""
        return self.loss.disc_active(step, int(self.quantization_start))

    def on_quantization_start(self, step: int) -> None:
        if self.ema is not None:  # k-means just replaced the codebook: restart the EMA
            self.ema.restart(self.generator())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        use_disc = self.disc_active(self.curriculum_step())  # constant across a window
        x = self.model_input(batch)
        q = self.quantize(self.encode(x))
        x_hat = self.decode(q.z_tilde)
        losses = self.loss(x, x_hat, self.omega * q.loss, disc_active=use_disc,
                           lpips=self._frozen_on_device("lpips"),
                           last_layer=self.decoder.last_layer_weight)
        if self.backward_in_window(losses.generator + losses.discriminator, batch_idx):
            self._optimizer_steps(use_disc)
        self.log_train({"train/loss": losses.generator.detach(), "train/vq": q.loss.detach(),
                        "train/commit": q.commit_loss.detach(),
                        **{f"train/{name}": v for name, v in losses.terms.items()}}, x.shape[0])
        return losses.generator.detach()

    def _optimizer_steps(self, use_disc: bool) -> None:
        opt_g, opt_d = self.optimizers()
        self._clip(opt_g)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.generator())
        if use_disc:
            self._clip(opt_d)
            opt_d.optimizer.step()  # raw step: global_step keeps counting generator steps
        opt_d.zero_grad(set_to_none=True)

    def _clip(self, optimizer) -> None:
        if (clip := self.hparams.grad_clip) > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        hp = self.hparams
        trainer = self._trainer  # the public property raises without a Trainer
        if trainer is not None and "16-mixed" == str(trainer.precision):
            raise ValueError("trainer.precision: 16-mixed is not supported by ImageTokenizer "
                             "(two optimizers); use bf16-mixed or 32-true")
        gen = [p for p in self.generator().parameters() if p.requires_grad]
        opt_g = torch.optim.AdamW(gen, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        disc = self.loss.discriminator
        # An empty discriminator optimizer keeps the two-optimizer layout uniform.
        opt_d = torch.optim.AdamW(
            list(disc.parameters()) if disc is not None else [nn.Parameter(torch.zeros(()))],
            lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
        )
        return [opt_g, opt_d]

    # -- evaluation (with the EMA weights swapped in, if any) ---------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.ema is not None:
            self.ema.swap(self.generator())
        metrics = self._frozen["metrics"]
        metrics.to(self.device)
        self._frozen_on_device("lpips")
        metrics.reset()
        self._log_batch = None

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self.model_input(batch)
        q = self.quantize(self.encode(x))  # hard in eval, whatever the phase
        x_hat = self.decode(self.quantizer.lookup(q.indices))
        self._frozen["metrics"].update(x_hat, x)
        self.update_codebook_metrics(q.indices)
        n = self.hparams.num_log_images
        if self._log_batch is None and n > 0 and self.figures_due():
            self._log_batch = (x[:n].detach(), x_hat[:n].detach())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._finish_eval("test")

    def _finish_eval(self, prefix: str) -> None:
        metrics = self._frozen["metrics"]
        for name, value in metrics.compute(prefix).items():
            self.log(name, value.float(), sync_dist=False)
        metrics.reset()
        pairs, self._log_batch = self._log_batch, None
        if pairs is not None:  # collected where figures_due
            log_figure(self, f"{prefix}/input_vs_reconstruction", pairs_grid(*pairs))
        if self.ema is not None:
            self.ema.swap(self.generator())

    # -- tokenize / decode hooks (provq-tokenize, provq-decode) ---------------------------
    @torch.no_grad()
    def tokenize_batch(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """``(key, int64 code ids (h, w))`` per image of a batch."""
        with self.eval_mode():
            codes = self.encode_codes(self.model_input(batch)).cpu()
        return [(str(key), codes[i]) for i, key in enumerate(batch["key"])]

    @torch.no_grad()
    def decode_tokens_to_file(self, key: str, codes: torch.Tensor, out_dir: Path) -> Path:
        """Decode one image's codes (h, w) and write ``out_dir/<safe key>.png``."""
        with self.eval_mode():
            image = self.decode_codes(torch.as_tensor(codes).reshape(1, *codes.shape[-2:]))[0]
        path = Path(out_dir) / f"{safe_file_name(key)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8_image(image)).save(path)
        return path
