"""TopoDisc: the paper's 2-D diagnostic for premature discretization.

A dense disk centred at the origin plus the sparse boundary of a larger equilateral triangle
around it. A quantizer that discretizes too early spends its codes on the dense disk and leaves
the triangle under-served; per-component reconstruction error makes that visible.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, TensorDataset

from provq_lightning.topodisc_components import DISK, TRIANGLE


def sample_disk(n: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` points uniform in a disk of ``radius`` centred at the origin."""
    r = radius * torch.rand(n, generator=generator, dtype=torch.float64).sqrt()
    theta = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.stack([r * theta.cos(), r * theta.sin()], dim=1)


def sample_triangle_boundary(
    n: int, circumradius: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` points uniform along the perimeter of an origin-centred equilateral triangle."""
    angles = torch.tensor([90.0, 210.0, 330.0], dtype=torch.float64) * math.pi / 180
    vertices = circumradius * torch.stack([angles.cos(), angles.sin()], dim=1)
    s = 3 * torch.rand(n, generator=generator, dtype=torch.float64)  # position along 3 equal sides
    side = s.floor().long().clamp_max(2)
    t = (s - side).unsqueeze(1)
    start, end = vertices[side], vertices[(side + 1) % 3]
    return start + t * (end - start)


def make_topodisc(
    n_disk: int = 400,
    n_triangle: int = 275,
    disk_radius: float = 1.0,
    triangle_circumradius: float = 4.0,
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (N x 2, float32) and component labels (N, 0 = disk, 1 = triangle)."""
    g = torch.Generator().manual_seed(seed)
    disk = sample_disk(n_disk, disk_radius, g)
    tri = sample_triangle_boundary(n_triangle, triangle_circumradius, g)
    points = torch.cat([disk, tri])
    points = points + noise * torch.randn(points.shape, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.full((n_disk,), DISK), torch.full((n_triangle,), TRIANGLE)])
    return points.float(), labels


class FullBatch(Dataset):
    """Yields the same whole-set batch ``repeats`` times (one epoch = ``repeats`` steps)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], repeats: int) -> None:
        self.tensors, self.repeats = tensors, repeats

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.tensors


class TopoDiscDataModule(LightningDataModule):
    """Training and validation samples of TopoDisc, drawn from independent seeds.

    ``batch_size`` of ``None`` means full batch (one step per epoch), the paper's setting and
    the one that makes CPU runs bit-reproducible across a resume.
    """

    def __init__(
        self,
        n_disk: int = 400,
        n_triangle: int = 275,
        disk_radius: float = 1.0,
        triangle_circumradius: float = 4.0,
        noise: float = 0.02,
        seed: int = 0,
        batch_size: int | None = None,
        steps_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        if n_disk < 1 or n_triangle < 1:
            raise ValueError("n_disk and n_triangle must both be >= 1")
        self.save_hyperparameters()
        self.shape = dict(
            n_disk=n_disk,
            n_triangle=n_triangle,
            disk_radius=disk_radius,
            triangle_circumradius=triangle_circumradius,
            noise=noise,
        )
        self.seed = seed
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDataset(*make_topodisc(**self.shape, seed=self.seed))
        self.val_set = TensorDataset(*make_topodisc(**self.shape, seed=self.seed + 10_000))

    def _full(self, dataset: TensorDataset) -> int:
        return self.batch_size or len(dataset)

    def train_dataloader(self) -> DataLoader:
        if self.batch_size is None:
            # Full batch, steps_per_epoch times: no sampler randomness, no per-item collation.
            full = FullBatch(self.train_set.tensors, self.steps_per_epoch)
            return DataLoader(full, batch_size=None, shuffle=False)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        sampler = None
        trainer = self.trainer
        # Decided when the loader is built, i.e. once the process group exists. Every point is
        # evaluated by exactly one rank: Lightning's default DistributedSampler pads an odd-sized
        # set with repeats, which the rank-reduced metrics would count twice.
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                self.val_set, num_replicas=trainer.world_size, rank=trainer.global_rank,
                shuffle=False,
            )
        return DataLoader(
            self.val_set, batch_size=self._full(self.val_set), shuffle=False, sampler=sampler
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The training points in order as ``(x, labels, index)``: the index keys their codes
        (``provq-fit predict``, ``provq-tokenize``)."""
        points, labels = self.train_set.tensors
        indexed = TensorDataset(points, labels, torch.arange(len(points)))
        return DataLoader(indexed, batch_size=self._full(indexed), shuffle=False)
