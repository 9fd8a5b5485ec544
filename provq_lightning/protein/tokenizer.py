"""``ProteinTokenizer``: the ESM3 / StructTokenBench structure VQ-VAE on provq's curriculum.

Encoder (kNN geometric attention, SE(3)-invariant) -> ``VectorQuantizer`` -> decoder
(transformer over codes, frame head placing ideal N/CA/C, C-beta distogram head).

Options beside that ESM3-style default (the ``cath_*`` configs): ``encoder_type: local`` reads
each residue's window of CA internal coordinates (``local_encoder.py``), and
``decoder_head: internal`` predicts CA (theta, tau) and builds the trace by NeRF
(``internal_decoder.py``), trained with an angular loss, the N/C offset loss and optionally a
short-window CA distance loss.

ESM3 / StructTokenBench interop (``protein/esm3.py``): ``encoder_type: esm3`` is ESM3's
structure encoder exactly and ``decoder_head: esm3`` its decoder reading the quantized latents
(StructTokenBench's), ``esm3_tokens`` reading code ids (ESM3's released decoder; decodes but
does not train). ``from_esm3`` / ``from_structtokenbench`` (or ``init_from:``) load their
checkpoints.

Variants (``variant``):
- ``vanilla``: a plain learnable codebook (StructTokenBench's VanillaVQ);
- ``aminoaseed``: effective codes = Linear(C) with the base codebook C frozen (after k-means
  seeding, when the curriculum seeds it), AminoAseed's reparameterisation.
ProVQ or not is the ``CurriculumCallback`` in the config, not a model option.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchmetrics import Metric

from provq_lightning.errors import ProvqError
from provq_lightning.protein import esm3
from provq_lightning.protein.decoder import StructureDecoder
from provq_lightning.protein.encoder import StructureEncoder
from provq_lightning.protein.esm3_decoder import ESM3StructureDecoder
from provq_lightning.protein.geometry import backbone_with_oxygen
from provq_lightning.protein.internal import (
    angular_loss,
    ca_internal,
    local_offsets,
    trace_frames,
)
from provq_lightning.protein.internal_decoder import InternalCoordinateDecoder
from provq_lightning.protein.local_encoder import LocalGeometryEncoder
from provq_lightning.protein.losses import (
    backbone_direction_loss,
    backbone_distance_loss,
    distogram_loss,
    windowed_ca_distance_loss,
)
from provq_lightning.protein.metrics import CALDDT, BackboneRMSD, TMScore
from provq_lightning.protein.pdb_io import write_backbone_pdb
from provq_lightning.protein.plots import chain_figure
from provq_lightning.reporting.figures import log_figure
from provq_lightning.tokenizer import VQTokenizer
from provq_lightning.tokens.codes import check_codes
from provq_lightning.tokens.names import safe_file_name
from provq_lightning.vq.quantizer import VectorQuantizer

VARIANTS = ("vanilla", "aminoaseed")
ENCODERS = ("geometric", "local", "esm3")
DECODER_HEADS = ("frames", "internal", "esm3", "esm3_tokens")
MISSING_TOKEN = -1  # residues without a backbone frame have no code


def structure_metrics() -> dict[str, Metric]:
    """Backbone RMSD, CA-lDDT and TM-score after superposition, per chain, averaged per split."""
    return {"rmsd": BackboneRMSD(), "lddt": CALDDT(), "tm_score": TMScore()}


class ProteinTokenizer(VQTokenizer):
    """Structure tokenizer; defaults are a small CPU model, the paper's is in the cath_ configs.

    Args:
        variant: ``vanilla`` or ``aminoaseed`` (see module docstring).
        num_codes, code_dim: codebook size K and code dimension D (paper 512, 1024).
        encoder_dim, encoder_heads, encoder_layers: geometric encoder width, vector heads,
            depth (paper 1024, 128, 2); ``knn`` neighbourhood (16), ``rel_pos_bins`` (32).
        decoder_dim, decoder_heads, decoder_layers: decoder transformer (paper 1024, 16, 8);
            ``pair_dim`` width of the distogram head (paper 128).
        beta: commitment weight; ``l2_normalize``, ``codebook_init`` as in ``VectorQuantizer``.
        distance_weight, direction_weight, distogram_weight: reconstruction loss weights.
        distance_clamp, direction_clamp: per-pair squared-error clamps (25, 20).
        distance_cutoff: only atom pairs closer than this (A) in the input count in the
            distance loss (15: the pairs lDDT scores); None: every pair (ESM3).
        lr, weight_decay, lr_warmup_steps: AdamW with a linear learning-rate warmup;
            ``lr_decay_to`` < 1: then a cosine decay to that fraction of ``lr`` at the
            trainer's ``max_steps`` (1: constant).
        num_log_structures: at every validation, a picture of each of the first this many
            validation chains (the same chains every time; 0: none), see ``protein.plots``.
        encoder_type: ``geometric`` (kNN geometric attention, ESM3) or ``local`` (window of CA
            internal coordinates ``window_before``..``window_after`` around each residue, then
            ``encoder_layers`` conv blocks; ``knn`` > 0 adds RBF distances to that many
            nearest residues).
        decoder_head: ``frames`` (rotary transformer + frame head + distogram, ESM3) or
            ``internal`` (CA theta/tau + NeRF, trunk ``decoder_trunk``: ``conv`` or
            ``transformer``); its losses: ``angle_weight`` x (1 - cos) of theta and tau,
            ``offset_weight`` x MSE of the N/C offsets, ``local_distance_weight`` x the CA
            distance loss over pairs up to ``local_distance_window`` apart along the chain.
            ``encoder_type: esm3``: the geometric encoder as ESM3's ``StructureTokenEncoder``
            (SwiGLU, biases, no final norm, ESM3's frames; ``knn`` must be 16 to load ESM3).
            ``decoder_head: esm3``: ESM3's decoder transformer, frame head and pairwise head
            reading the latents through ``post_vq_proj`` (StructTokenBench), ``decoder_dim``,
            ``decoder_heads``, ``decoder_layers``, ``pair_dim`` its shape, the distogram the
            pairwise head's first 64 bins; ``esm3_tokens``: the same reading code ids through
            ESM3's token table (ESM3's released decoder; decodes, cannot train).
        angle_skip: with the local encoder and the internal head: the residue's own angles,
            times this scale, are 4 of the code's dimensions, and the decoder predicts a
            correction to the angles its code holds (0: off).
        init_from: start from ``esm3:PATH`` (ESM3's encoder ``.pth``: encoder and codebook) or
            ``structtokenbench:PATH`` (its DeepSpeed checkpoint: encoder, codebook, decoder);
            the shape arguments must match (``from_esm3`` / ``from_structtokenbench`` read
            them from the files). A loaded codebook switches the curriculum's k-means seeding
            off. See ``provq_lightning.protein.esm3``.
        dead_code_threshold: revive codes used less than this fraction of the mean (see
            ``vq.revival``; 0: off, the default, as in StructTokenBench).
    """

    # Registered by VQTokenizer.__init__, ahead of the quantizer.
    encoder: StructureEncoder | LocalGeometryEncoder

    def __init__(
        self,
        variant: str = "vanilla",
        num_codes: int = 64,
        code_dim: int = 32,
        encoder_dim: int = 64,
        encoder_heads: int = 8,
        encoder_layers: int = 2,
        knn: int = 16,
        rel_pos_bins: int = 32,
        decoder_dim: int = 64,
        decoder_heads: int = 4,
        decoder_layers: int = 2,
        pair_dim: int = 32,
        beta: float = 0.25,
        l2_normalize: bool = False,
        codebook_init: str = "uniform",
        distance_weight: float = 1.0,
        direction_weight: float = 1.0,
        distogram_weight: float = 1.0,
        distance_clamp: float = 25.0,
        distance_cutoff: float | None = None,
        direction_clamp: float = 20.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        lr_warmup_steps: int = 0,
        num_log_structures: int = 2,
        encoder_type: str = "geometric",
        window_before: int = 2,
        window_after: int = 3,
        decoder_head: str = "frames",
        decoder_trunk: str = "conv",
        angle_weight: float = 1.0,
        offset_weight: float = 0.1,
        local_distance_weight: float = 0.0,
        local_distance_window: int = 8,
        lr_decay_to: float = 1.0,
        angle_skip: float = 0.0,
        dead_code_threshold: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if encoder_type not in ENCODERS:
            raise ValueError(f"encoder_type must be one of {ENCODERS}, got {encoder_type!r}")
        if decoder_head not in DECODER_HEADS:
            raise ValueError(
                f"decoder_head must be one of {DECODER_HEADS}, got {decoder_head!r}"
            )
        # Built in this order (encoder, codebook, decoder) so seeded initialisation is the same
        # as in every earlier release.
        if encoder_type in ("geometric", "esm3"):
            encoder = StructureEncoder(
                encoder_dim, encoder_heads, encoder_layers, code_dim, knn, rel_pos_bins,
                esm3=encoder_type == "esm3",
            )
        else:
            encoder = LocalGeometryEncoder(
                encoder_dim, encoder_layers, code_dim, window_before, window_after,
                knn, rel_pos_bins=rel_pos_bins, angle_skip=angle_skip,
            )
        aminoaseed = variant == "aminoaseed"
        quantizer = VectorQuantizer(
            num_codes,
            code_dim,
            beta=beta,
            l2_normalize=l2_normalize,
            linear_codebook=aminoaseed,
            freeze_base_codebook=aminoaseed,
            init=codebook_init,
            dead_code_threshold=dead_code_threshold,
        )
        if decoder_head == "frames":
            decoder = StructureDecoder(
                code_dim,
                decoder_dim,
                decoder_heads,
                decoder_layers,
                distogram_bins=64 if distogram_weight > 0 else 0,
                pair_dim=pair_dim,
            )
        elif decoder_head == "internal":
            decoder = InternalCoordinateDecoder(
                code_dim, decoder_dim, decoder_layers, decoder_trunk, decoder_heads,
                angle_residual=angle_skip if encoder_type == "local" else 0.0,
            )
        else:
            decoder = ESM3StructureDecoder(
                code_dim, decoder_dim, decoder_heads, decoder_layers, pair_dim,
                tokens=decoder_head == "esm3_tokens",
            )
        super().__init__(quantizer, {"encoder": encoder})
        self.save_hyperparameters()
        self.decoder = decoder
        self.add_split_metrics(structure_metrics)
        self._picture_chains: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        if init_from:  # sets codebook_loaded, so the curriculum keeps the loaded codebook
            esm3.init_from(self, init_from)

    @classmethod
    def from_esm3(
        cls, encoder_path: str | Path, decoder_path: str | Path | None = None, **overrides
    ) -> ProteinTokenizer:
        """A tokenizer holding ESM3's structure encoder and codebook (and, with
        ``decoder_path``, its decoder: ``decoder_head: esm3_tokens``; without it a fresh
        ``esm3`` decoder), in eval mode: the shape from the files, ``overrides`` for any other
        argument."""
        return esm3.build_esm3(cls, encoder_path, decoder_path, overrides)

    @classmethod
    def from_structtokenbench(cls, path: str | Path, **overrides) -> ProteinTokenizer:
        """A tokenizer holding a StructTokenBench (VanillaVQ or AminoAseed) checkpoint, a
        DeepSpeed folder or its ``mp_rank_00_model_states.pt``, in eval mode: the shape from
        the file, ``overrides`` for any other argument."""
        return esm3.build_structtokenbench(cls, path, overrides)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        if self.hparams.decoder_head == "esm3_tokens":
            raise ProvqError(
                "decoder_head: esm3_tokens (ESM3's released decoder) reads code ids, which carry "
                "no gradient to the encoder, so this model does not train; continue training "
                "with decoder_head: esm3 (init_from: esm3:ENCODER loads the encoder and codebook)"
            )

    # -- model ------------------------------------------------------------------------------
    def encode(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch["coords"], batch["residue_mask"], batch["residue_index"])

    def internal_losses(self, batch: dict, out) -> dict[str, torch.Tensor]:
        """Losses of the internal-coordinate head: angles, N/C offsets, short-range CA
        distances (this last one only when weighted)."""
        hp = self.hparams
        true = batch["coords"][:, :, :3].float()
        mask = batch["residue_mask"]
        with torch.autocast(true.device.type, enabled=False):
            theta, tau, theta_ok, tau_ok = ca_internal(true[:, :, 1], mask)
            target = local_offsets(true, trace_frames(true[:, :, 1]))
            err = (out.offsets.float() - target).pow(2).sum(-1).mean(-1)
            w = mask.float()
            losses = {
                "theta": angular_loss(out.theta.float(), theta, theta_ok),
                "tau": angular_loss(out.tau.float(), tau, tau_ok),
                "offsets": (err * w).sum() / w.sum().clamp_min(1.0),
            }
            if hp.local_distance_weight > 0:
                losses["local_distance"] = windowed_ca_distance_loss(
                    out.backbone[:, :, 1].float(), true[:, :, 1], mask,
                    hp.local_distance_window,
                )
        return losses

    def reconstruction_losses(self, batch: dict, out) -> dict[str, torch.Tensor]:
        hp = self.hparams
        if hp.decoder_head == "internal":
            return self.internal_losses(batch, out)
        true = batch["coords"][:, :, :3].float()
        pred = out.backbone.float()
        mask = batch["residue_mask"]
        # Distances and dot products of coordinates need float32 (bf16 autocast would turn the
        # direction loss's matmul into ~0.5 A^2 noise).
        with torch.autocast(true.device.type, enabled=False):
            losses = {
                "distance": backbone_distance_loss(
                    pred, true, mask, hp.distance_clamp, hp.distance_cutoff
                ),
                "direction": backbone_direction_loss(
                    pred, true, mask, batch["residue_index"], hp.direction_clamp
                ),
            }
            if out.distogram_logits is not None:
                losses["distogram"] = distogram_loss(out.distogram_logits.float(), true, mask)
        return losses

    def _decode(self, z, mask, pad_mask, codes, with_distogram: bool = True):
        if self.hparams.decoder_head == "esm3_tokens":
            if codes is None:
                raise ProvqError("decoder_head: esm3_tokens needs code ids; the quantizer was "
                                 "bypassed (a curriculum warmup), which this decoder cannot "
                                 "follow")
            return self.decoder(z, mask, pad_mask, with_distogram, codes=codes)
        return self.decoder(z, mask, pad_mask, with_distogram)

    def _step(self, batch: dict):
        mask = batch["residue_mask"]
        q = self.quantize(self.encode(batch), mask=mask)
        out = self._decode(q.z_tilde, mask, batch["pad_mask"], q.indices)
        losses = self.reconstruction_losses(batch, out)
        hp = self.hparams
        weights = {
            "distance": hp.distance_weight,
            "direction": hp.direction_weight,
            "distogram": hp.distogram_weight,
            "theta": hp.angle_weight,
            "tau": hp.angle_weight,
            "offsets": hp.offset_weight,
            "local_distance": hp.local_distance_weight,
        }
        recon = sum(weights[k] * v for k, v in losses.items())
        return q, out, losses, recon

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q, _, losses, recon = self._step(batch)
        loss = recon + self.omega * q.loss
        self.log_train(
            {
                "train/loss": loss,
                "train/recon": recon,
                "train/vq": q.loss,
                **{f"train/{k}": v for k, v in losses.items()},
            },
            batch_size=max(int(batch["residue_mask"].sum()), 1),
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        q, out, losses, recon = self._step(batch)  # eval mode: always hard quantization
        prefix = self.eval_prefix
        mask = batch["residue_mask"]
        true = batch["coords"][:, :, :3]
        for metric in self.split_metrics[prefix].values():
            metric.update(out.backbone.float(), true, mask)
        self.update_codebook_metrics(q.indices, mask)
        if prefix == "val":
            self._keep_picture_chains(batch, out.backbone)
        b = max(int(mask.any(-1).sum()), 1)
        values = {"recon": recon, "vq": q.loss, **losses}
        for k, v in values.items():
            self.log(f"{prefix}/{k}", v, batch_size=b, sync_dist=True)

    def _keep_picture_chains(self, batch: dict, pred: torch.Tensor) -> None:
        """Keep the first ``num_log_structures`` validation chains (the loader does not
        shuffle, so these are the same chains at every validation), full residues only."""
        wanted = self.hparams.num_log_structures - len(self._picture_chains)
        if wanted <= 0 or not self.figures_due(count=self.hparams.num_log_structures):
            return
        mask = batch["residue_mask"]
        for i, name in enumerate(batch["ids"]):
            if wanted <= 0:
                break
            if mask[i].any():
                keep = mask[i]
                true = batch["coords"][i, :, :3][keep]
                self._picture_chains.append(
                    (name, pred[i][keep].detach().float().cpu(), true.float().cpu())
                )
                wanted -= 1

    def _log_structure_pictures(self, prefix: str) -> None:
        chains, self._picture_chains = self._picture_chains, []
        for slot, (name, pred, true) in enumerate(chains):
            # Tags by slot, not by chain id: stable names whatever characters an id holds.
            log_figure(self, f"{prefix}/structure_{slot}", chain_figure(name, pred, true))

    def on_validation_epoch_start(self) -> None:
        self._picture_chains = []
        super().on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_structure_pictures("val")

    def configure_optimizers(self):
        hp = self.hparams
        # No decay on the codebook, norms and biases: decay would pull codes to the origin.
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or name.startswith("quantizer.embedding") or "rel_pos" in name
            (no_decay if plain else decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
        )
        decay_to = hp.lr_decay_to
        if hp.lr_warmup_steps <= 0 and decay_to >= 1.0:
            return opt
        warm = max(hp.lr_warmup_steps, 1)
        total = self.trainer.max_steps if self._trainer is not None else -1

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if decay_to >= 1.0 or total is None or total <= warm:
                return 1.0
            progress = min(1.0, (step - warm) / (total - warm))
            return decay_to + (1.0 - decay_to) * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- the contract's codes and files (provq-tokenize, provq-decode, provq-fit predict) -------
    @torch.no_grad()
    def encode_codes(self, inputs: dict) -> torch.Tensor:
        """Code ids (B, L) of a batch; ``MISSING_TOKEN`` where a residue has no backbone or is
        padding."""
        with self.eval_mode():
            q = self.quantizer(self.encode(inputs), alpha=0.0, mask=inputs["residue_mask"])
        return q.indices.masked_fill(~inputs["residue_mask"], MISSING_TOKEN)

    def tokenize_batch(self, batch: dict) -> list[tuple[str, torch.Tensor]]:
        """``(chain id, int64 codes of its residues)`` per chain; -1 marks residues without a
        backbone frame."""
        codes = self.encode_codes(batch).cpu()
        lengths = batch["pad_mask"].sum(-1).tolist()
        pairs = zip(batch["ids"], lengths, strict=True)
        return [(key, codes[i, :n]) for i, (key, n) in enumerate(pairs)]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Backbone (L, 4, 3) N/CA/C/O decoded from a code sequence (L,) (-1 = missing)."""
        codes = torch.as_tensor(codes, device=self.device).long().reshape(-1)
        check_codes(codes, self.quantizer.num_codes, missing=MISSING_TOKEN)
        present = codes >= 0
        with self.eval_mode():
            z = self.quantizer.lookup(codes.clamp_min(0)).unsqueeze(0)
            out = self._decode(
                z, present[None], torch.ones_like(present)[None], codes.clamp_min(0)[None],
                with_distogram=False,
            )
        return backbone_with_oxygen(out.backbone[0].float())

    def decode_tokens_to_file(self, key: str, codes: torch.Tensor, out_dir: Path) -> Path:
        """Write the decoded backbone of one chain to ``out_dir/<key>.pdb``."""
        path = Path(out_dir) / f"{safe_file_name(key)}.pdb"
        return write_backbone_pdb(path, self.decode_codes(codes))
