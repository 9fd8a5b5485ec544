"""A small MLP tokenizer for the TopoDisc diagnostic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanSquaredError

from provq_lightning.datamodules.topodisc import COMPONENT_NAMES
from provq_lightning.image_log import log_figure
from provq_lightning.plots import embedding_figure
from provq_lightning.quantizer import VectorQuantizer
from provq_lightning.tokenizer import VQTokenizer


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class TopoDiscTokenizer(VQTokenizer):
    """MLP encoder -> ``VectorQuantizer`` -> MLP decoder on 2-D points.

    Validation reports the hard-quantized reconstruction error per component
    (``val/mse_disk``, ``val/mse_triangle``) and overall (``val/mse``), plus the codebook
    metrics, and at validations on a multiple of ``figure_every_n_steps`` a figure of the encoder
    embeddings with the codebook on top (an image in TensorBoard, W&B or MLflow; a PNG under the
    run's ``images/`` with other loggers).
    """

    def __init__(
        self,
        num_codes: int = 32,
        latent_dim: int = 2,
        hidden: int = 64,
        depth: int = 3,
        beta: float = 0.25,
        codebook_init: str = "uniform",
        lr: float = 1e-3,
        figure_every_n_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = mlp([2] + [hidden] * depth + [latent_dim])
        self.decoder = mlp([latent_dim] + [hidden] * depth + [2])
        self.quantizer = VectorQuantizer(num_codes, latent_dim, beta=beta, init=codebook_init)
        self.val_mse = nn.ModuleDict(
            {name: MeanSquaredError() for name in ["all", *COMPONENT_NAMES.values()]}
        )
        self._figure_latents: list[torch.Tensor] = []
        self._figure_labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard-quantized reconstruction and code ids."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.z_q), q.indices

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, _ = batch
        q = self.quantize(self.encoder(x))
        recon = F.mse_loss(self.decoder(q.z_tilde), x)
        loss = recon + self.vq_loss_weight * q.loss
        if self.should_log_step():
            self.log_dict(
                {"train/loss": loss, "train/recon": recon, "train/vq": q.loss},
                on_step=True,
                on_epoch=False,
                batch_size=x.shape[0],
            )
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, labels = batch
        z = self.encoder(x)
        q = self.quantize(z)
        x_hat = self.decoder(q.z_tilde)
        self.val_mse["all"].update(x_hat, x)
        for label, name in COMPONENT_NAMES.items():
            sel = labels == label
            if sel.any():
                self.val_mse[name].update(x_hat[sel], x[sel])
        self.update_codebook_metrics(q.indices)
        if self._figure_due():
            self._figure_latents.append(self.quantizer.prepare(z).detach().cpu())
            self._figure_labels.append(labels.cpu())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def _log_mse(self, prefix: str) -> None:
        for name, metric in self.val_mse.items():
            key = f"{prefix}/mse" if name == "all" else f"{prefix}/mse_{name}"
            self.log(key, metric.compute())
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_mse("val")
        super().on_validation_epoch_end()
        self._log_figure()

    def on_test_epoch_end(self) -> None:
        self._log_mse("test")
        super().on_test_epoch_end()

    def _figure_due(self) -> bool:
        every = self.hparams.figure_every_n_steps
        return (
            every > 0
            and not self.trainer.sanity_checking
            and self.global_step % every == 0
            and len(self.loggers) > 0  # any logger: log_figure writes PNGs for those without images
        )

    def _log_figure(self) -> None:
        if not self._figure_latents:
            return
        latents = torch.cat(self._figure_latents)
        labels = torch.cat(self._figure_labels)
        self._figure_latents, self._figure_labels = [], []
        if self.trainer.is_global_zero:
            fig = embedding_figure(
                latents,
                labels,
                self.quantizer.codebook().detach().cpu(),
                title=f"step {self.global_step} ({self.phase.name.lower()})",
            )
            log_figure(self, "val/embeddings", fig)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # -- tokenize / decode hooks (provq-tokenize, provq-decode, provq-fit predict) --------------
    @torch.no_grad()
    def tokenize_batch(self, batch: tuple[torch.Tensor, ...]) -> list[tuple[str, torch.Tensor]]:
        """``(point index, its code id as a 0-d int64 tensor)`` per point; the index comes from
        the datamodule's predict loader (``(x, labels, index)``), else the position in the batch.
        """
        x = batch[0].to(self.device)
        index = batch[2] if len(batch) > 2 else torch.arange(len(x))
        was_training = self.training
        self.eval()
        try:
            codes = self.quantizer(self.encoder(x), alpha=0.0).indices.cpu()
        finally:
            self.train(was_training)
        return [(f"{int(i):06d}", codes[n]) for n, i in enumerate(index)]

    @torch.no_grad()
    def decode_tokens_to_file(self, key: str, codes: torch.Tensor, out_dir: Path) -> Path:
        """Write the decoded 2-D point(s) of code id(s) to ``out_dir/<key>.npy`` (float32)."""
        codes = torch.as_tensor(codes, device=self.device).long()
        k = self.quantizer.num_codes
        if codes.numel() == 0 or int(codes.min()) < 0 or int(codes.max()) >= k:
            raise ValueError(f"code ids must lie in [0, {k}); got shape {tuple(codes.shape)}")
        points = self.decoder(self.quantizer.lookup(codes)).float().cpu().numpy()
        path = Path(out_dir) / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, points, allow_pickle=False)
        return path
