"""Image tokenizer throughput: Lightning vs a bare PyTorch loop, and shards vs ImageFolder.

Training step (``--part step``): ``ImageTokenizer`` (the 64px sample model, with the PatchGAN on
from step 0 so both optimizers step every batch, manual optimization as in ``training_step``)
trained by a Lightning ``Trainer`` against a hand-written loop doing the same work on the same
model weights and the same pre-decoded batches, same fp32 precision and thread count. Repeats
alternate A/B/A/B (the machine is shared) and the medians of images/s are compared. Both start
from the same weights and see the same batches, so their final weights are compared too: a
large difference would mean the two loops do not do the same work.

Loader (``--part loader``): one epoch of the shared photos at 64px from shards written by
``provq-make-shards`` (``ImageNetDataModule``) against ``torchvision.datasets.ImageFolder`` over
the same photos (symlinked into class folders in a temporary directory), with the same
LlamaGen random crop + flip, uint8 output, batch size and workers. ImageFolder runs twice: with
torchvision's default PIL loader (the baseline) and, as a control, with provq's draft-mode JPEG
decode as its loader, which separates the shard format's share of the gain from the decoder's.

    python benchmarks/bench_image.py [--part step|loader|all] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SAMPLE_SHAPE = dict(
    ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=64, norm_groups=8,
    num_codes=512, code_dim=8, l2_normalize=True, beta=0.25, lr=1e-3, weight_decay=0.0,
)


def photos_root(path: str) -> Path:
    from provq_lightning.datamodules.imagenet import resolve_path

    return resolve_path(path)


# -- training step: Lightning vs bare loop -------------------------------------------------
def step_model() -> Any:
    """The sample model with the GAN active from step 0: two optimizers step every batch."""
    from provq_lightning.image.tokenizer import ImageTokenizer

    torch.manual_seed(0)
    return ImageTokenizer(
        **SAMPLE_SHAPE, lpips_weight=0.0, eval_lpips=False, eval_fid=False, disc_weight=0.5,
        disc_start=0, disc_ndf=32, disc_layers=3, grad_clip=1.0, num_log_images=0,
    )


def photo_batches(root: Path, n_batches: int, batch_size: int, size: int) -> list[dict]:
    """Centre-cropped uint8 photos (the datamodules' batches), decoded once so both loops get
    identical tensors."""
    from provq_lightning.image.make_shards import find_images
    from provq_lightning.image.transforms import center_crop, decode_image, to_uint8_tensor

    images = find_images(root)[: n_batches * batch_size]
    if len(images) < n_batches * batch_size:
        raise ValueError(f"{root} has {len(images)} photos, need {n_batches * batch_size}")
    tensors = [to_uint8_tensor(center_crop(decode_image(im.path.read_bytes(), size), size))
               for im in images]
    batches = []
    for b in range(n_batches):
        chunk = tensors[b * batch_size : (b + 1) * batch_size]
        keys = [im.key for im in images[b * batch_size : (b + 1) * batch_size]]
        batches.append({"image": torch.stack(chunk), "key": keys})
    return batches


def batch_loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    # batch_size=None: the list already holds whole batches; both loops iterate this loader.
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


class StepTimer:
    """Times batches ``[skip, end)`` of a loop: from the start of batch ``skip`` (so the
    loader fetch of later batches is inside the window) to the end of the last batch."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start = self.stop = 0.0
        self.timed = 0

    def batch_start(self, index: int) -> None:
        if index == self.skip:
            self.start = time.perf_counter()

    def batch_end(self, index: int, images: int) -> None:
        if index >= self.skip:
            self.timed += images
            self.stop = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        return self.timed / (self.stop - self.start)


def run_lightning(model, batches: list[dict], skip: int) -> tuple[float, Any]:
    import lightning as L

    timer = StepTimer(skip)

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.batch_start(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.batch_end(batch_idx, batch["image"].shape[0])

    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches),
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Timing()],
    )
    trainer.fit(model, batch_loader(batches))
    if trainer.global_step != len(batches):
        raise RuntimeError(f"Lightning ran {trainer.global_step} steps, not {len(batches)}")
    return timer.images_per_s, model


def bare_step(model, batch: dict, opt_g, opt_d) -> torch.Tensor:
    """What ``ImageTokenizer.training_step`` does for one batch with the GAN active, by hand."""
    hp = model.hparams
    x = model.model_input(batch)
    q = model.quantize(model.encode(x))
    x_hat = model.decode(q.z_tilde)
    losses = model.loss(x, x_hat, model.omega * q.loss, disc_active=True, lpips=None,
                        last_layer=model.decoder.last_layer_weight)
    (losses.generator + losses.discriminator).backward()  # one backward for both nets
    for opt in (opt_g, opt_d):
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses.generator.detach()


def run_bare(model, batches: list[dict], skip: int) -> tuple[float, Any]:
    opt_g, opt_d = model.configure_optimizers()  # the same AdamW pair Lightning gets
    model.train()
    timer = StepTimer(skip)
    for index, batch in enumerate(batch_loader(batches)):
        timer.batch_start(index)
        bare_step(model, batch, opt_g, opt_d)
        timer.batch_end(index, batch["image"].shape[0])
    return timer.images_per_s, model


def max_weight_difference(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa
               if sa[k].is_floating_point())


def alternate(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run the cases A/B/A/B... so slow phases of a shared machine hit all of them."""
    results: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            results[name].append(fn())
            print(f"  repeat {r + 1}/{repeats} {name:<28}{results[name][-1]:>9.1f} images/s",
                  flush=True)
    return results


def bench_step(args) -> float:
    import lightning as L

    L.seed_everything(0, verbose=False)
    batches = photo_batches(photos_root(args.photos), args.warmup + args.steps, args.batch_size,
                            args.image_size)
    initial = step_model()
    finals: dict[str, Any] = {}

    def case(runner) -> Callable[[], float]:
        def fn() -> float:
            torch.manual_seed(0)
            speed, model = runner(copy.deepcopy(initial), batches, args.warmup)
            finals[runner.__name__] = model
            return speed
        return fn

    print(f"\nTraining step: ImageTokenizer 64px sample model + PatchGAN (both optimizers step), "
          f"batch {args.batch_size}, fp32, {torch.get_num_threads()} thread(s), "
          f"{args.steps} timed steps after {args.warmup} untimed, {args.repeats} alternating "
          "repeats")
    results = alternate({"Lightning Trainer": case(run_lightning),
                         "bare PyTorch loop": case(run_bare)}, args.repeats)
    light = statistics.median(results["Lightning Trainer"])
    bare = statistics.median(results["bare PyTorch loop"])
    # Each A/B pair ran back to back, so its ratio sees nearly the same machine load.
    pairs = sorted(a / b for a, b in zip(results["Lightning Trainer"],
                                         results["bare PyTorch loop"], strict=True))
    diff = max_weight_difference(finals["run_lightning"], finals["run_bare"])
    print(f"{'case':<28}{'median images/s':>16}{'ratio':>8}")
    print(f"{'Lightning Trainer':<28}{light:>16.1f}{light / bare:>7.3f}x")
    print(f"{'bare PyTorch loop (base)':<28}{bare:>16.1f}{1.0:>7.3f}x")
    print(f"per-pair ratios: median {statistics.median(pairs):.3f}x, range "
          f"{pairs[0]:.3f}x-{pairs[-1]:.3f}x")
    print(f"max |weight difference| after {args.warmup + args.steps} steps: {diff:.2e}")
    return light / bare


# -- loader: shards vs ImageFolder ---------------------------------------------------------
class LlamaGenCrop:
    """provq's training crop + flip + uint8 tensor, as a torchvision-style transform."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img) -> torch.Tensor:
        from provq_lightning.image.transforms import random_crop, to_uint8_tensor

        # Fresh randomness per call, seeded from torch like provq's own datasets.
        rng = random.Random(torch.randint(0, 2**62, ()).item())
        img = img if img.mode == "RGB" else img.convert("RGB")  # no copy for the usual case
        return to_uint8_tensor(random_crop(img, self.size, rng))


class DraftLoader:
    """provq's draft-mode JPEG decode as an ImageFolder ``loader`` (the control case)."""

    def __init__(self, size: int, min_crop_frac: float = 0.8) -> None:
        self.draft = round(size / min_crop_frac) + 1  # what the shard dataset asks for

    def __call__(self, path: str):
        from provq_lightning.image.transforms import decode_image

        with open(path, "rb") as fh:
            return decode_image(fh.read(), self.draft)


def class_folders(photos: Path, out: Path) -> Path:
    """``out/<wnid>/<file>`` symlinks to the flat photo folder (nothing is copied)."""
    from provq_lightning.image.make_shards import find_images

    for im in find_images(photos):
        folder = out / im.wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / im.path.name).symlink_to(im.path.resolve())
    return out


def epoch_images_per_s(loader: Iterable) -> float:
    """One full epoch, worker start-up included (as every epoch pays it without persistence)."""
    start = time.perf_counter()
    images = sum(batch["image"].shape[0] if isinstance(batch, dict) else batch[0].shape[0]
                 for batch in loader)
    return images / (time.perf_counter() - start)


def bench_loader(args) -> float:
    import lightning as L

    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory(prefix="provq_bench_image_") as tmp:
        return compare_loaders(args, photos_root(args.photos), Path(tmp))


def compare_loaders(args, photos: Path, tmp: Path) -> float:
    from torchvision.datasets import ImageFolder

    from provq_lightning.datamodules.imagenet import ImageNetDataModule
    from provq_lightning.image.make_shards import main as make_shards

    make_shards([str(photos), str(tmp / "shards"), "--shard-size", str(args.shard_size)])
    folders = class_folders(photos, tmp / "folders")
    dm = ImageNetDataModule(str(tmp / "shards" / "index.json"), image_size=args.image_size,
                            batch_size=args.batch_size, num_workers=args.workers,
                            shuffle_buffer=args.shuffle_buffer)
    dm.setup("fit")

    def folder_loader(loader_fn=None) -> torch.utils.data.DataLoader:
        kwargs = {"loader": loader_fn} if loader_fn is not None else {}
        dataset = ImageFolder(str(folders), transform=LlamaGenCrop(args.image_size), **kwargs)
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                           drop_last=True, num_workers=args.workers)

    cases = {
        "shards (provq)": lambda: epoch_images_per_s(dm.train_dataloader()),
        "ImageFolder (base)": lambda: epoch_images_per_s(folder_loader()),
        "ImageFolder + draft decode": lambda: epoch_images_per_s(
            folder_loader(DraftLoader(args.image_size))),
    }
    for fn in cases.values():  # warm the page cache for every source before timing
        fn()
    print(f"\nLoader: one epoch of {len(ImageFolder(str(folders)))} photos -> {args.image_size}px "
          f"random crops, batch {args.batch_size}, {args.workers} worker(s), "
          f"{args.repeats} alternating repeats")
    results = alternate(cases, args.repeats)
    medians = {name: statistics.median(v) for name, v in results.items()}
    base = medians["ImageFolder (base)"]
    print(f"{'case':<28}{'median images/s':>16}{'vs base':>9}")
    for name, value in medians.items():
        print(f"{name:<28}{value:>16.1f}{value / base:>8.2f}x")
    return medians["shards (provq)"] / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("step", "loader", "all"), default="all")
    parser.add_argument("--photos", default="../shared/data/images/imagenet_sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training step (1: the machine is shared)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per repeat")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--shuffle-buffer", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = {}
    if args.part in ("step", "all"):
        ratios["Lightning / bare loop (training images/s)"] = bench_step(args)
    if args.part in ("loader", "all"):
        ratios["shards / ImageFolder (loader images/s)"] = bench_loader(args)
    print()
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
