"""``provq-rfid``: rFID as LlamaGen and the ProVQ paper measure it.

The paper's rFID is LlamaGen's protocol: every ImageNet val image (50k) is centre-cropped to
256px with ADM's ``center_crop_arr`` (BOX halvings while the short side is >= 2x the size, one
BICUBIC resize, integer centre window), reconstructed by the tokenizer, rounded to uint8 the way
LlamaGen does (``clamp(127.5 x + 128, 0, 255)``, truncated), and both sets are scored by the
ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``, TF Inception graph) from
two ``.npz`` sample batches: uint8 ``N x H x W x 3`` under ``arr_0``.

This command writes those two batches (``reference.npz``, ``reconstructions.npz``; streamed, so
50k images never sit in memory) and scores them itself with torchmetrics'
``FrechetInceptionDistance`` on provq's FID Inception (``pretrained.build_fid_inception``,
pytorch-fid's port of the same TF graph, local weights only). The ADM evaluator can be run on
the same files for the TF number.

    provq-rfid --ckpt runs/x/v/checkpoints/last.ckpt --data /data/imagenet/val --out runs/x/rfid
    provq-rfid --ref-npz a.npz --sample-npz b.npz --out runs/cmp   # score two existing batches

``--data`` is a folder of images (searched recursively, e.g. ImageNet's ``val/<wnid>/*.JPEG``)
or the ``index.json`` of ``provq-make-shards`` shards. Results go to ``<out>/rfid.json`` and are
printed. Without the Inception weights the command stops at once in one line (or, with
``--no-fid``, writes the batches and reports no rFID); it never prints a number it did not
measure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from provq_lightning.errors import ProvqError
from provq_lightning.image import shards as sh
from provq_lightning.image.metrics import psnr_per_image
from provq_lightning.image.pretrained import MissingWeights, build_fid_inception
from provq_lightning.image.transforms import IMAGE_SUFFIXES, UndecodableImage, decode_image

NPZ_KEY = "arr_0"
NO_FID_HINT = "--no-fid (writes the .npz batches only), or pass --inception PATH"


# -- ADM sample batches (.npz) -------------------------------------------------------------
class NpzBatchWriter:
    """Writes a uint8 ``(count, H, W, 3)`` array as ``arr_0`` of an uncompressed ``.npz``,
    batch by batch.

    The shape goes into the .npy header first, so ``count`` must be known up front; a run that
    writes a different number of images is an error and leaves no file (it writes to
    ``<path>.tmp`` and renames on success). Uncompressed (ZIP_STORED) with a version 1.0 header
    is what ``np.savez`` writes and what the ADM evaluator streams.
    """

    def __init__(self, path: Path, count: int, height: int, width: int) -> None:
        self.path, self.count, self.written = Path(path), count, 0
        self.shape = (count, height, width, 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        # force_zip64: the member size is unknown to zipfile and 50k 256px images exceed 4 GiB.
        self._member: IO[bytes] = self._zip.open(f"{NPZ_KEY}.npy", "w", force_zip64=True)
        header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._member, header)

    def add(self, images: np.ndarray) -> None:
        """Append ``(B, H, W, 3)`` uint8 images."""
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: expected uint8 (B, *{self.shape[1:]}) images, got "
                             f"{images.dtype} {images.shape}")
        if self.written + len(images) > self.count:
            raise ProvqError(f"{self.path}: more than the {self.count} images announced")
        self._member.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def close(self) -> Path:
        self._member.close()
        self._zip.close()
        if self.written != self.count:
            self._tmp.unlink()
            raise ProvqError(f"{self.path}: got {self.written} images but {self.count} were "
                             "announced; nothing written (check the data source's count)")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file (after an error)."""
        for closing in (self._member, self._zip):
            try:
                closing.close()
            except (OSError, ValueError):  # a half-written member may refuse to close cleanly
                pass
        self._tmp.unlink(missing_ok=True)


def write_npz_batch(path: Path, images: np.ndarray) -> Path:
    """All of ``images`` (N, H, W, 3) uint8 as one ADM sample batch."""
    writer = NpzBatchWriter(path, len(images), images.shape[1], images.shape[2])
    writer.add(images)
    return writer.close()


def npz_shape(path: Path) -> tuple[int, ...]:
    """Shape of ``arr_0`` from its header (nothing else is read)."""
    with _npz_member(path) as member:
        return _read_header(member, path)


def iter_npz_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """``arr_0`` of an ADM sample batch in chunks of ``batch_size`` images, streamed."""
    with _npz_member(path) as member:
        shape = _read_header(member, path)
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = member.read(n * per_image)
            if len(data) != n * per_image:
                raise ProvqError(f"{path}: {NPZ_KEY} ends after {start} of {shape[0]} images "
                                 "(truncated file); write it again")
            yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def _npz_member(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise ProvqError(f"{path} is not a readable .npz ({err}); pass an ADM sample batch "
                         f"(np.savez(path, {NPZ_KEY}=uint8 N x H x W x 3))") from None
    if f"{NPZ_KEY}.npy" not in archive.namelist():
        raise ProvqError(f"{path} has no {NPZ_KEY} (keys: {archive.namelist()[:4]}); the ADM "
                         f"evaluator reads the images from {NPZ_KEY}")
    return archive.open(f"{NPZ_KEY}.npy")


def _read_header(member: IO[bytes], path: Path) -> tuple[int, ...]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ProvqError(f"{path}: {NPZ_KEY} has .npy format version {version}; write it with "
                         "np.savez (versions 1.0 and 2.0 are read)")
    shape, fortran, dtype = read(member)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise ProvqError(f"{path}: {NPZ_KEY} is {dtype} {shape}; the ADM evaluator expects "
                         "uint8 N x H x W x 3 (C order)")
    return tuple(shape)


# -- the evaluation images -----------------------------------------------------------------
def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's (and LlamaGen's) ``center_crop_arr``: (size, size, 3) uint8 of an RGB image."""
    # Halving with a box filter first keeps the final bicubic step from aliasing.
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.uint8)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def _crop_item(key: str, read: Callable[[], bytes], size: int) -> dict[str, Any]:
    """One image as the loader sends it; a failure travels as text so that the main process
    can report it in one line (a worker's exception arrives wrapped in a traceback)."""
    try:
        pixels = adm_center_crop(decode_image(read()), size)
        error = ""
    except (UndecodableImage, OSError) as err:
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"); the key says more.
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err).splitlines()[0])
        pixels, error = np.zeros((size, size, 3), np.uint8), f"{key}: {reason}"
    return {"key": key, "image": torch.from_numpy(pixels.copy()), "error": error}


class EvalFolderImages(Dataset):
    """Every image file under a folder (recursive, sorted by path), centre-cropped."""

    def __init__(self, root: Path, size: int) -> None:
        self.root, self.size = root, size
        self.files = sorted(p for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ProvqError(f"--data {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found; "
                             "pass the ImageNet val folder or a shard index.json")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        return _crop_item(str(path), path.read_bytes, self.size)


class ShardImages(IterableDataset):
    """The images of ``provq-make-shards`` shards (whole shards per loader worker)."""

    def __init__(self, index: Path, size: int) -> None:
        try:
            self.shards = sh.read_index(index)
        except (KeyError, ValueError) as err:
            raise ProvqError(f"--data {index}: not a shard index ({err}); pass the index.json "
                             "that provq-make-shards wrote") from None
        self.size = size

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        for shard in mine:
            try:
                for sample in sh.iter_shard(shard.url):
                    data = sh.image_member(sample)
                    key = f"{shard.url}:{sample.key}"
                    if data is None:
                        yield {"key": key, "image": torch.zeros(self.size, self.size, 3,
                                                                dtype=torch.uint8),
                               "error": f"{key}: no image member"}
                        continue
                    yield _crop_item(key, lambda d=data: d, self.size)
            except sh.ShardReadError as err:
                yield {"key": shard.url, "image": torch.zeros(self.size, self.size, 3,
                                                              dtype=torch.uint8),
                       "error": str(err)}
                return


def image_source(data: Path, size: int) -> Dataset:
    """A folder of images or a shard ``index.json``."""
    if data.is_dir():
        return EvalFolderImages(data, size)
    if data.is_file() and data.suffix == ".json":
        return ShardImages(data, size)
    raise ProvqError(f"--data {data} is neither a folder of images nor a shard index.json; "
                     "pass one of them")


# -- reconstruction and scoring ------------------------------------------------------------
def to_uint8_llamagen(recon: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) as LlamaGen rounds: trunc(127.5 x + 128)."""
    return (127.5 * recon.float() + 128.0).clamp_(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)


class FidScore:
    """torchmetrics FID over provq's FID Inception (or nothing, with ``inception=None``)."""

    def __init__(self, inception: torch.nn.Module | None, device: torch.device) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = None
        if inception is not None:
            self.metric = FrechetInceptionDistance(feature=inception, reset_real_features=True)
            self.metric.to(device)

    def update(self, nhwc: torch.Tensor, real: bool) -> None:
        if self.metric is not None:
            self.metric.update(nhwc.permute(0, 3, 1, 2).float() / 255.0, real=real)

    def compute(self) -> float | None:
        return None if self.metric is None else float(self.metric.compute())


def reconstruct_and_score(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    count: int,
    out: Path,
    fid: FidScore,
    device: torch.device,
    size: int,
    write_reference: bool = True,
) -> dict[str, Any]:
    """The main loop: crops -> model -> both .npz batches, FID and PSNR updates."""
    writers = {"reconstructions": NpzBatchWriter(out / "reconstructions.npz", count, size, size)}
    if write_reference:
        writers["reference"] = NpzBatchWriter(out / "reference.npz", count, size, size)
    psnr_sum, seen = 0.0, 0
    try:
        with Progress() as progress, torch.inference_mode():
            task = progress.add_task("reconstructing", total=count)
            for batch in loader:
                wanted = count - seen  # with --limit, images past it do not matter
                errors = [e for e in batch["error"][:wanted] if e]
                if errors:
                    raise ProvqError(f"unreadable image {errors[0]}; remove it from --data "
                                     "(rFID is defined over the whole set)")
                real = batch["image"][:wanted].to(device)  # (B, H, W, 3) uint8
                recon = to_uint8_llamagen(model(real.permute(0, 3, 1, 2)))
                writers["reconstructions"].add(recon.cpu().numpy())
                if write_reference:
                    writers["reference"].add(real.cpu().numpy())
                fid.update(real, real=True)
                fid.update(recon, real=False)
                # LlamaGen's PSNR: the saved uint8 reconstruction against the crop, in [0, 1].
                psnr_sum += float(psnr_per_image(recon.float() / 255, real.float() / 255).sum())
                seen += len(real)
                progress.advance(task, len(real))
                if seen >= count:
                    break
        paths = {name: str(writer.close()) for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {"count": seen, "psnr": psnr_sum / max(seen, 1), "npz": paths}


def score_npz(ref: Path, sample: Path, fid: FidScore, device: torch.device,
              batch_size: int) -> dict[str, Any]:
    """FID of two existing ADM sample batches (for instance LlamaGen's own)."""
    shapes = {path: npz_shape(path) for path in (ref, sample)}
    with Progress() as progress, torch.inference_mode():
        for path, real in ((ref, True), (sample, False)):
            task = progress.add_task(f"features of {path.name}", total=shapes[path][0])
            for images in iter_npz_batches(path, batch_size):
                fid.update(torch.from_numpy(images.copy()).to(device), real=real)
                progress.advance(task, len(images))
    return {"count": shapes[sample][0], "reference_count": shapes[ref][0],
            "npz": {"reference": str(ref), "reconstructions": str(sample)}}


# -- the model ---------------------------------------------------------------------------------
def load_tokenizer(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, str]:
    """``reconstruct(uint8 (B, 3, H, W)) -> [-1, 1]`` of a provq run or a LlamaGen checkpoint,
    its source and which weights it uses (a provq run: ``ema`` or ``live``; LlamaGen: its
    checkpoint's ``ema`` or ``model`` entry)."""
    if args.llamagen is not None:
        from provq_lightning.image import llamagen
        from provq_lightning.image.tokenizer import ImageTokenizer

        # LlamaGen's reconstruction script evaluates "ema" when the file has it, else "model".
        has_ema = "ema" in llamagen.read_checkpoint(args.llamagen)
        weights = "ema" if has_ema and args.weights == "ema" else "model"
        model = ImageTokenizer.from_llamagen(args.llamagen, weights=weights, eval_fid=False,
                                             eval_lpips=False, lpips_weight=0.0)
        return model.to(device).eval().reconstruct, str(args.llamagen), weights
    from provq_lightning.runs.loading import load_run

    model, _ = load_run(args.ckpt, args.config, None, str(device))
    model = model.to(device).eval()
    weights = "live"
    if getattr(model, "ema", None) is not None and args.weights == "ema":
        model.ema.swap(model.generator())  # validation evaluates the EMA; so does the paper
        weights = "ema"
    return model.reconstruct, str(args.ckpt), weights


# -- entry point ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="provq-rfid", description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", type=Path, help="checkpoint of a provq image tokenizer run")
    what.add_argument("--llamagen", type=Path, help="a LlamaGen VQ checkpoint ({'model': ...})")
    what.add_argument("--ref-npz", type=Path, help="score an existing reference batch against "
                      "--sample-npz instead of reconstructing")
    parser.add_argument("--sample-npz", type=Path, help="with --ref-npz: the sample batch")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: found "
                        "next to --ckpt)")
    parser.add_argument("--data", type=Path, help="ImageNet val folder, any image folder, or "
                        "a shard index.json")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=256, help="centre-crop size (default 256)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema",
                        help="EMA weights when the run kept them (default), else the live ones")
    parser.add_argument("--inception", type=Path, help="FID Inception weights (default: "
                        "$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--no-fid", action="store_true", help="only write the .npz batches")
    parser.add_argument("--no-reference-npz", action="store_true",
                        help="do not write reference.npz (it is the same for every model)")
    args = parser.parse_args(argv)
    if args.ref_npz is not None and args.sample_npz is None:
        parser.error("--ref-npz needs --sample-npz")
    if args.ref_npz is None and args.data is None:
        parser.error("--data is required to reconstruct (or pass --ref-npz and --sample-npz)")
    if args.ref_npz is not None and args.no_fid:
        parser.error("--no-fid with --ref-npz leaves nothing to do")
    return args


def _rfid(argv: list[str] | None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.time()
    inception = None
    if not args.no_fid:  # before any work: a missing file must not cost a 50k-image pass
        try:
            inception = build_fid_inception(
                str(args.inception) if args.inception else None, NO_FID_HINT)
        except (MissingWeights, ValueError) as err:
            raise ProvqError(str(err).splitlines()[0]) from None
    fid = FidScore(inception, device)
    if args.ref_npz is not None:
        result = score_npz(args.ref_npz, args.sample_npz, fid, device, args.batch_size)
        source = weights = None
    else:
        reconstruct, source, weights = load_tokenizer(args, device)
        dataset = image_source(args.data, args.size)
        count = min(len(dataset), args.limit) if args.limit else len(dataset)
        workers = args.workers if not isinstance(dataset, ShardImages) else min(
            args.workers, len(dataset.shards))
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                            shuffle=False, pin_memory=device.type == "cuda")
        result = reconstruct_and_score(reconstruct, loader, count, args.out, fid, device,
                                       args.size, not args.no_reference_npz)
        if result["count"] != count:
            raise ProvqError(f"--data {args.data}: read {result['count']} images but its "
                             f"listing announced {count}; rebuild the shard index")
    rfid = fid.compute()
    if rfid is not None and not math.isfinite(rfid):
        raise ProvqError(f"rFID came out {rfid} over {result['count']} images; FID needs at "
                         "least 2 images and distinct features (check the data and weights)")
    report = {
        "rfid": rfid,
        **result,
        "image_size": args.size if args.ref_npz is None else None,
        "crop": "ADM center_crop_arr" if args.ref_npz is None else None,
        "model": source,
        "weights": weights,
        "data": str(args.data) if args.data else None,
        "fid": None if inception is None else "torchmetrics FrechetInceptionDistance on provq "
        "FIDInception (pytorch-fid's TF Inception port)",
        "seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rfid.json").write_text(json.dumps(report, indent=2) + "\n")
    what = "rFID not computed (--no-fid)" if rfid is None else f"rFID {rfid:.4f}"
    psnr = f", PSNR {result['psnr']:.2f} dB" if "psnr" in result else ""
    print(f"{what} over {result['count']} images{psnr}; wrote {args.out / 'rfid.json'}")


def main(argv: list[str] | None = None) -> None:
    try:
        _rfid(argv)
    except ProvqError as err:
        print(f"provq-rfid: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
