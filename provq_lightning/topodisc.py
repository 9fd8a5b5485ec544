"""A small MLP tokenizer for the TopoDisc diagnostic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanSquaredError, Metric

from provq_lightning.reporting.figures import log_figure
from provq_lightning.reporting.plots import embedding_figure
from provq_lightning.tokenizer import VQTokenizer
from provq_lightning.tokens.codes import check_codes
from provq_lightning.tokens.names import safe_file_name
from provq_lightning.topodisc_components import COMPONENT_NAMES
from provq_lightning.vq.quantizer import VectorQuantizer


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def mse_metrics() -> dict[str, Metric]:
    """Reconstruction MSE overall (``mse``) and per component (``mse_disk``, ``mse_triangle``)."""
    names = ["mse", *(f"mse_{name}" for name in COMPONENT_NAMES.values())]
    return {name: MeanSquaredError() for name in names}


class TopoDiscTokenizer(VQTokenizer):
    """MLP encoder -> ``VectorQuantizer`` -> MLP decoder on 2-D points.

    Validation reports the hard-quantized reconstruction error per component
    (``val/mse_disk``, ``val/mse_triangle``) and overall (``val/mse``), plus the codebook
    metrics, and at validations on a multiple of ``figure_every_n_steps`` a figure of the encoder
    embeddings with the codebook on top (an image in TensorBoard, W&B or MLflow; a PNG under the
    run's ``images/`` with other loggers).
    """

    encoder: nn.Sequential  # registered by VQTokenizer.__init__, ahead of the quantizer
    decoder: nn.Sequential

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
        # Built in this order (encoder, decoder, codebook) so seeded initialisation is the same
        # as in every earlier release.
        encoder = mlp([2] + [hidden] * depth + [latent_dim])
        decoder = mlp([latent_dim] + [hidden] * depth + [2])
        quantizer = VectorQuantizer(num_codes, latent_dim, beta=beta, init=codebook_init)
        super().__init__(quantizer, {"encoder": encoder, "decoder": decoder})
        self.save_hyperparameters()
        self.add_split_metrics(mse_metrics)
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
        loss = recon + self.omega * q.loss
        self.log_train(
            {"train/loss": loss, "train/recon": recon, "train/vq": q.loss}, batch_size=x.shape[0]
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, labels = batch
        z = self.encoder(x)
        q = self.quantize(z)  # evaluation: always hard
        x_hat = self.decoder(q.z_tilde)
        metrics = self.split_metrics[self.eval_prefix]
        metrics["mse"].update(x_hat, x)
        for label, name in COMPONENT_NAMES.items():
            sel = labels == label
            if sel.any():
                metrics[f"mse_{name}"].update(x_hat[sel], x[sel])
        self.update_codebook_metrics(q.indices)
        every = self.hparams.figure_every_n_steps
        if self.eval_prefix == "val" and self.figures_due(every_n_steps=every):
            self._figure_latents.append(self.quantizer.prepare(z).detach().cpu())
            self._figure_labels.append(labels.cpu())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_figure()

    def _log_figure(self) -> None:
        if not self._figure_latents:
            return
        latents = torch.cat(self._figure_latents)
        labels = torch.cat(self._figure_labels)
        self._figure_latents, self._figure_labels = [], []
        fig = embedding_figure(
            latents,
            labels,
            self.quantizer.codebook().detach().cpu(),
            title=f"step {self.global_step} ({self.phase.name.lower()})",
        )
        log_figure(self, "val/embeddings", fig)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # -- the contract's codes and files (provq-tokenize, provq-decode, provq-fit predict) -------
    @torch.no_grad()
    def encode_codes(self, inputs: torch.Tensor) -> torch.Tensor:
        """Code id (int64) of each 2-D point of ``inputs`` (N x 2), hard quantization."""
        with self.eval_mode():
            return self.quantizer(self.encoder(inputs.to(self.device)), alpha=0.0).indices

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The decoded 2-D point(s) of code id(s): shape ``codes.shape + (2,)``."""
        codes = torch.as_tensor(codes, device=self.device).long()
        check_codes(codes, self.quantizer.num_codes)
        with self.eval_mode():
            return self.decoder(self.quantizer.lookup(codes))

    def tokenize_batch(self, batch: tuple[torch.Tensor, ...]) -> list[tuple[str, torch.Tensor]]:
        """``(point index, its code id as a 0-d int64 tensor)`` per point; the index comes from
        the datamodule's predict loader (``(x, labels, index)``), else the position in the batch.
        """
        x = batch[0]
        index = batch[2] if len(batch) > 2 else torch.arange(len(x))
        codes = self.encode_codes(x).cpu()
        return [(f"{int(i):06d}", codes[n]) for n, i in enumerate(index)]

    def decode_tokens_to_file(self, key: str, codes: torch.Tensor, out_dir: Path) -> Path:
        """Write the decoded 2-D point(s) of code id(s) to ``out_dir/<key>.npy`` (float32)."""
        points = self.decode_codes(codes).float().cpu().numpy()
        path = Path(out_dir) / f"{safe_file_name(key)}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, points, allow_pickle=False)
        return path
