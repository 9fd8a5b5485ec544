"""``make gpu-check``: the image tokenizer and the quantizer on one GPU, in under 8 minutes.

Parts, in order of priority (each one is skipped, and says so, when the time budget is spent):

1. Training step of VQ-16 (the ``in1k_16x16`` model: 256px -> 16x16 codes, K=16384 x 8) in
   bf16-mixed with the PatchGAN on from step 0 (both optimizers step every batch, as in
   ``bench_image.py --part step``; LPIPS off: its VGG weights are not assumed to be there):
   images/s and peak memory of a Lightning ``Trainer`` against a bare PyTorch loop doing the
   same work on the same weights and batches. The batch is sized from the free GPU memory.
2. Nearest-code search (N latents x K=16384 codes, D=8, l2-normalised like VQ-16):
   ``provq_lightning.vq.search.nearest_code`` against ``torch.cdist(z, codes).argmin(1)``, with the
   share of assignments equal to fp64's; k-means (262,144 x 8 -> K=16384, 20 Lloyd iterations)
   with ``provq_lightning.vq.kmeans.kmeans`` against a plain Lloyd loop on ``torch.cdist``.
3. The same after ``torch.compile``: the cdist baseline compiled, then the training step with
   ``compile: true`` (encoder and decoder) in both loops.

Timing: warmup iterations first, ``torch.cuda.synchronize()`` around every timed region, peak
memory from ``torch.cuda.max_memory_allocated`` after a reset. The markdown table goes to
stdout and to ``--out`` (default ``runs/gpu_check.md``), ready for ``benchmarks/README.md``.

    python benchmarks/gpu_check.py                     # what `make gpu-check` runs
    python benchmarks/gpu_check.py --device cpu --tiny # tiny sizes on the CPU (tests only)

Without a CUDA device (and without ``--device cpu``) it stops at once with one line and exit
status 1.
"""

from __future__ import annotations

import argparse
import copy
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The in1k_16x16 model (experiments/in1k_16x16.yaml), LPIPS and evaluation nets off.
VQ16 = dict(
    ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, norm_groups=32,
    num_codes=16384, code_dim=8, l2_normalize=True, beta=0.25, lr=1e-4, weight_decay=0.05,
)
TINY_MODEL = dict(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4, num_codes=32,
    code_dim=4, l2_normalize=True, beta=0.25, lr=1e-4, weight_decay=0.05,
)


@dataclass
class Sizes:
    """Problem sizes: the real check, or a tiny one for the CPU test."""

    image_size: int
    max_batch: int
    warmup_steps: int
    timed_steps: int
    search_n: int
    num_codes: int
    code_dim: int
    kmeans_n: int
    kmeans_iters: int
    model: dict[str, Any]
    disc_ndf: int
    disc_layers: int


FULL = Sizes(256, 32, 3, 10, 65536, 16384, 8, 262144, 20, VQ16, 64, 3)
TINY = Sizes(16, 2, 1, 2, 256, 32, 4, 512, 3, TINY_MODEL, 8, 2)


class OutOfTime(Exception):
    """The global time budget ran out in the middle of a part."""


@dataclass
class Report:
    """Rows of the markdown tables, filled part by part."""

    header: str
    step_rows: list[str] = field(default_factory=list)
    search_rows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False

    def markdown(self) -> str:
        lines = [self.header, ""]
        lines += ["| training step | batch | images/s | peak memory (GiB) | vs bare loop |",
                  "|---|---|---|---|---|", *self.step_rows, ""]
        lines += ["| quantizer | size | time | result |", "|---|---|---|---|",
                  *self.search_rows, ""]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


class Budget:
    """A deadline for the whole check; parts ask whether they still fit."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3):
    """(median seconds of ``fn``, its last result) after ``warmup`` untimed calls."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def require_device(name: str) -> torch.device:
    """The device to check; exits with one line when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu-check: no CUDA device (torch.cuda.is_available() is False); run `make "
            "gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    return torch.device(name)


# -- training step: Lightning vs bare loop ------------------------------------------------
def build_model(sizes: Sizes, compile_backend: str | None) -> Any:
    from provq_lightning.image.tokenizer import ImageTokenizer

    torch.manual_seed(0)
    return ImageTokenizer(
        **sizes.model, lpips_weight=0.0, eval_lpips=False, eval_fid=False, disc_weight=0.5,
        disc_start=0, disc_ndf=sizes.disc_ndf, disc_layers=sizes.disc_layers, grad_clip=1.0,
        num_log_images=0, compile=compile_backend or False,
    )


def make_batches(n: int, batch: int, size: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    # uint8 pixels, as the datamodules deliver them; the model maps them to [-1, 1].
    return [{"image": torch.randint(0, 256, (batch, 3, size, size), generator=g,
                                    dtype=torch.uint8).to(device)} for _ in range(n)]


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def bare_step(model, batch: dict, opt_g, opt_d, device: torch.device) -> None:
    """What ``ImageTokenizer.training_step`` does for a batch with the GAN on, by hand."""
    hp = model.hparams
    x = model.model_input(batch)
    with autocast(device):
        q = model.quantize(model.encode(x))
        x_hat = model.decode(q.z_tilde)
        losses = model.loss(x, x_hat, model.omega * q.loss, disc_active=True, lpips=None,
                            last_layer=model.decoder.last_layer_weight)
    (losses.generator + losses.discriminator).backward()
    for opt in (opt_g, opt_d):
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def run_bare(model, batches: list[dict], warmup: int, device: torch.device) -> float:
    """Images/s of batches ``[warmup:]`` of a bare loop."""
    model.to(device).train()
    opt_g, opt_d = model.configure_optimizers()
    start = 0.0
    for index, batch in enumerate(batches):
        if index == warmup:
            sync(device)
            start = time.perf_counter()
        bare_step(model, batch, opt_g, opt_d, device)
    sync(device)
    images = sum(b["image"].shape[0] for b in batches[warmup:])
    return images / (time.perf_counter() - start)


def run_lightning(model, batches: list[dict], warmup: int, device: torch.device) -> float:
    """Images/s of batches ``[warmup:]`` of a Lightning ``Trainer`` fit."""
    import lightning as L

    clock = {"start": 0.0, "stop": 0.0}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                sync(device)
                clock["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == len(batches) - 1:
                sync(device)
                clock["stop"] = time.perf_counter()

    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[Clock()],
    )
    # batch_size=None: the list holds whole batches, already on the device.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(model, loader)
    images = sum(b["image"].shape[0] for b in batches[warmup:])
    return images / (clock["stop"] - clock["start"])


def size_batch(sizes: Sizes, device: torch.device) -> int:
    """The largest power of two <= ``max_batch`` whose training step fits in half the free
    memory, from the peak of a 2-image probe step (activations scale with the batch)."""
    if device.type != "cuda":
        return sizes.max_batch
    probe = 2
    model = build_model(sizes, None)
    reset_peak(device)
    run_bare(model, make_batches(2, probe, sizes.image_size, device), 1, device)
    per_image = peak_gib(device) * 2**30 / probe
    del model
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fit = max(1, int(0.5 * free / per_image))
    return min(sizes.max_batch, 2 ** int(math.log2(fit)))


def bench_step(sizes: Sizes, device: torch.device, batch: int, backend: str | None,
               report: Report) -> None:
    """Lightning vs bare loop on the same initial weights and batches."""
    label = "eager" if backend is None else f"torch.compile ({backend})"
    initial = build_model(sizes, backend)
    batches = make_batches(sizes.warmup_steps + sizes.timed_steps, batch, sizes.image_size,
                           device)
    speeds, peaks = {}, {}
    for name, runner in (("bare PyTorch loop", run_bare), ("Lightning Trainer", run_lightning)):
        reset_peak(device)
        speeds[name] = runner(copy.deepcopy(initial), batches, sizes.warmup_steps, device)
        peaks[name] = peak_gib(device)
    base = speeds["bare PyTorch loop"]
    for name in ("Lightning Trainer", "bare PyTorch loop"):
        report.step_rows.append(
            f"| {name}, {label} | {batch} | {speeds[name]:.1f} | {peaks[name]:.2f} | "
            f"{speeds[name] / base:.3f}x |"
        )


# -- quantizer: search and k-means ---------------------------------------------------------
def cdist_argmin(z: torch.Tensor, codes: torch.Tensor, chunk: int, fn=None) -> torch.Tensor:
    """The baseline: ``torch.cdist(...).argmin(1)`` over row chunks of ``chunk`` rows."""
    fn = fn or (lambda a, b: torch.cdist(a, b).argmin(dim=1))
    return torch.cat([fn(z[i : i + chunk], codes) for i in range(0, z.shape[0], chunk)])


def baseline_kmeans(x: torch.Tensor, k: int, iters: int, chunk: int, fn=None):
    """Plain Lloyd (random initial centres, cdist argmin, mean update): (inertia, centres)."""
    g = torch.Generator(device=x.device).manual_seed(0)
    centers = x[torch.randperm(x.shape[0], generator=g, device=x.device)[:k]].clone()
    for _ in range(iters):
        idx = cdist_argmin(x, centers, chunk, fn)
        sums = torch.zeros_like(centers).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    idx = cdist_argmin(x, centers, chunk, fn)
    return float((x - centers[idx]).pow(2).sum()), centers


def search_chunk(n: int, k: int, device: torch.device) -> int:
    """Rows per cdist block: an n-divisor whose fp32 block takes at most 1/8 of free memory."""
    if device.type != "cuda":
        return n
    free, _ = torch.cuda.mem_get_info(device)
    rows = max(1, int(free / 8 / (4 * k)))
    chunk = 1
    while chunk * 2 <= min(rows, n) and n % (chunk * 2) == 0:
        chunk *= 2
    return chunk


def bench_quantizer(sizes: Sizes, device: torch.device, backend: str | None,
                    report: Report) -> None:
    from provq_lightning.vq.kmeans import kmeans
    from provq_lightning.vq.search import nearest_code

    g = torch.Generator().manual_seed(0)
    k, d = sizes.num_codes, sizes.code_dim
    codes = F.normalize(torch.randn(k, d, generator=g), dim=1).to(device)
    z = F.normalize(torch.randn(sizes.search_n, d, generator=g), dim=1).to(device)
    chunk = search_chunk(sizes.search_n, k, device)
    exact = cdist_argmin(z.double(), codes.double(), max(1, chunk // 2))  # the fp64 reference
    size = f"N={sizes.search_n}, K={k}, D={d}"
    label = "" if backend is None else f", torch.compile ({backend})"
    cases: dict[str, Callable[[], torch.Tensor]] = {}
    if backend is None:
        cases["provq nearest_code"] = lambda: nearest_code(z, codes)
        cases["torch.cdist(z, codes).argmin(1)"] = lambda: cdist_argmin(z, codes, chunk)
    else:
        compiled = torch.compile(lambda a, b: torch.cdist(a, b).argmin(dim=1), backend=backend)
        cases["torch.cdist(z, codes).argmin(1)"] = lambda: cdist_argmin(z, codes, chunk, compiled)
    for name, fn in cases.items():
        seconds, idx = timed(fn, device)
        equal = float((idx == exact).double().mean())
        report.search_rows.append(f"| search: {name}{label} | {size} | {seconds * 1e3:.2f} ms | "
                                  f"{equal:.6f} of assignments equal fp64's |")
    x = F.normalize(torch.randn(sizes.kmeans_n, d, generator=g), dim=1).to(device)
    ksize = f"N={sizes.kmeans_n}, K={k}, D={d}, {sizes.kmeans_iters} iterations"
    kchunk = search_chunk(sizes.kmeans_n, k, device)
    kcases: dict[str, Callable[[], float]] = {}
    if backend is None:
        kcases["provq kmeans (k-means++ + Lloyd)"] = lambda: kmeans(
            x, k, iters=sizes.kmeans_iters, tol=0.0, seed=0).inertia
        kcases["Lloyd on torch.cdist (random init)"] = lambda: baseline_kmeans(
            x, k, sizes.kmeans_iters, kchunk)[0]
    else:
        kcases["Lloyd on torch.cdist (random init)"] = lambda: baseline_kmeans(
            x, k, sizes.kmeans_iters, kchunk, compiled)[0]
    for name, fn in kcases.items():
        seconds, inertia = timed(fn, device, warmup=0 if backend is None else 1, repeats=1)
        report.search_rows.append(f"| k-means: {name}{label} | {ksize} | {seconds:.2f} s | "
                                  f"inertia {float(inertia):.5g} |")


# -- driver ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tests)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="time budget of the whole check in seconds (default 420)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of part 3 (default inductor; 'none' skips)")
    parser.add_argument("--out", default=str(REPO / "runs" / "gpu_check.md"),
                        help="markdown file to write (default runs/gpu_check.md)")
    return parser.parse_args(argv)


def describe(device: torch.device) -> str:
    import lightning

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"CPU, {torch.get_num_threads()} threads"
    return (f"GPU check on {what}: torch {torch.__version__}, Lightning {lightning.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def run_part(name: str, need_s: float, budget: Budget, report: Report,
             fn: Callable[[], None]) -> None:
    """Run one part if it fits in the budget; record a skip or a one-line failure."""
    if not budget.allows(need_s):
        report.notes.append(f"{name}: skipped, {budget.left():.0f} s left of the time budget "
                            f"(needs about {need_s:.0f} s)")
        return
    started = time.monotonic()
    try:
        fn()
    except OutOfTime:
        report.notes.append(f"{name}: stopped by the time budget")
        raise
    except Exception as error:  # one broken part must not lose the others' figures
        report.failed = True
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        report.notes.append(f"{name}: FAILED: {type(error).__name__}: {first}")
    else:
        report.notes.append(f"{name}: {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    sizes = TINY if args.tiny else FULL
    backend = None if args.compile_backend == "none" else args.compile_backend
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # what a bf16-mixed user sets
    budget = Budget(args.budget_s)
    report = Report(describe(device))

    def out_of_time(signum, frame):
        raise OutOfTime()

    # A hard stop shortly after the budget, wherever the check is (a long compile included).
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, out_of_time)
        signal.alarm(int(args.budget_s) + 30)
    batch = sizes.max_batch
    try:
        def sized() -> None:
            nonlocal batch
            batch = size_batch(sizes, device)
            how = "half the free memory, probe of 2 images" if device.type == "cuda" else "fixed"
            report.notes.append(f"batch {batch} images of {sizes.image_size}px ({how}); "
                                f"{sizes.warmup_steps} untimed + {sizes.timed_steps} timed steps")
            bench_step(sizes, device, batch, None, report)

        run_part("training step, eager", 30, budget, report, sized)
        run_part("search and k-means", 20, budget, report,
                 lambda: bench_quantizer(sizes, device, None, report))
        if backend is not None:
            run_part("search and k-means, compiled", 20, budget, report,
                     lambda: bench_quantizer(sizes, device, backend, report))
            run_part("training step, compiled", 120 if not args.tiny else 5, budget, report,
                     lambda: bench_step(sizes, device, batch, backend, report))
    except OutOfTime:
        pass
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    text = report.markdown()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
