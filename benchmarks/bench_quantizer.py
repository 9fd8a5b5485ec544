"""Nearest-code search and k-means seeding against what users would otherwise pick.

Search (N=32768 latents, K=16384 codes, D=8): provq's ``VectorQuantizer`` forward against
``vector_quantize_pytorch.VectorQuantize`` (the baseline) and a plain ``torch.cdist`` argmin,
time and peak extra memory, each case in a fresh process so peaks do not mix.
K-means seeding (K=16384 on 262,144 x 8): provq's ``kmeans`` against scikit-learn ``KMeans``
(the baseline) with the same iteration cap: time and inertia ratios.

    python benchmarks/bench_quantizer.py [--device cuda] [--skip-kmeans]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = ("provq", "vector_quantize_pytorch", "cdist_argmin")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_case(case: str, n: int, k: int, d: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    # Off-centre latents, as real encoders produce.
    z = (3.0 + torch.randn(n, d, generator=g)).to(device)
    codes = (3.0 + torch.randn(k, d, generator=g)).to(device)
    if case == "provq":
        from provq_lightning.quantizer import VectorQuantizer

        vq = VectorQuantizer(k, d).to(device).train()
        vq.set_codebook(codes)
        return lambda: vq(z).indices
    if case == "vector_quantize_pytorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=d, codebook_size=k).to(device).train()
        with torch.no_grad():
            vq._codebook.embed.copy_(codes.unsqueeze(0))
            vq._codebook.initted.fill_(True)
        return lambda: vq(z.unsqueeze(0))[1]
    if case == "cdist_argmin":
        return lambda: torch.cdist(z, codes).argmin(dim=1)
    raise ValueError(case)


def run_case(case: str, n: int, k: int, d: int, device: str, repeats: int) -> dict:
    dev = torch.device(device)
    fn = make_case(case, n, k, d, dev)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()
    times = []
    for i in range(repeats + 1):
        sync(dev)
        start = time.perf_counter()
        fn()
        sync(dev)
        if i:  # the first call warms caches and allocators
            times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"case": case, "seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def bench_search(args) -> list[dict]:
    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--n", str(args.n), "--k", str(args.k),
               "--d", str(args.d), "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next(r for r in rows if r["case"] == "vector_quantize_pytorch")
    print(f"\nNearest-code search, N={args.n} K={args.k} D={args.d} on {args.device} "
          f"(median of {args.repeats}); baseline: vector_quantize_pytorch.VectorQuantize")
    print(f"{'case':<26}{'time (s)':>10}{'peak MB':>10}{'speed vs base':>15}{'memory vs base':>16}")
    for r in rows:
        print(f"{r['case']:<26}{r['seconds']:>10.3f}{r['peak_bytes'] / 2**20:>10.0f}"
              f"{base['seconds'] / r['seconds']:>14.2f}x"
              f"{base['peak_bytes'] / max(r['peak_bytes'], 1):>15.2f}x")
    return rows


def bench_kmeans(args) -> dict:
    from sklearn.cluster import KMeans

    from provq_lightning.kmeans import kmeans

    g = torch.Generator().manual_seed(0)
    # A clustered, anisotropic cloud, like encoder outputs after warmup.
    centres = 2.0 * torch.randn(512, args.d, generator=g)
    x = centres[torch.randint(512, (args.kmeans_n,), generator=g)] + 0.5 * torch.randn(
        args.kmeans_n, args.d, generator=g)
    dev = torch.device(args.device)
    xd = x.to(dev)
    sync(dev)
    start = time.perf_counter()
    ours = kmeans(xd, args.kmeans_k, iters=args.kmeans_iters, tol=0.0, seed=0)
    sync(dev)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    sk = KMeans(args.kmeans_k, init="k-means++", n_init=1, max_iter=args.kmeans_iters, tol=0.0,
                random_state=0).fit(x.numpy())
    sk_s = time.perf_counter() - start
    print(f"\nK-means seeding, K={args.kmeans_k} on {args.kmeans_n} x {args.d}, "
          f"{args.kmeans_iters} Lloyd iterations max; baseline: sklearn.cluster.KMeans (CPU)")
    print(f"{'case':<26}{'time (s)':>10}{'inertia':>14}")
    print(f"{'provq kmeans (' + args.device + ')':<26}{ours_s:>10.1f}{ours.inertia:>14.1f}")
    print(f"{'sklearn KMeans':<26}{sk_s:>10.1f}{sk.inertia_:>14.1f}")
    print(f"speed vs sklearn: {sk_s / ours_s:.2f}x   inertia ratio (provq / sklearn): "
          f"{ours.inertia / sk.inertia_:.4f}")
    return {"seconds": ours_s, "sklearn_seconds": sk_s, "inertia_ratio": ours.inertia / sk.inertia_}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--k", type=int, default=16384)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kmeans-n", type=int, default=262144)
    parser.add_argument("--kmeans-k", type=int, default=16384)
    parser.add_argument("--kmeans-iters", type=int, default=20)
    parser.add_argument("--skip-kmeans", action="store_true")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.k, args.d, args.device, args.repeats)))
        return
    bench_search(args)
    if not args.skip_kmeans:
        bench_kmeans(args)


if __name__ == "__main__":
    main()
