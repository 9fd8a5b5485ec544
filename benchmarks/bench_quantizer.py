"""Nearest-code search and k-means seeding against what users would otherwise pick.

Search (N=32768 latents, K=16384 codes, D=8): provq's ``VectorQuantizer`` forward against
``vector_quantize_pytorch.VectorQuantize`` (the baseline) and a plain ``torch.cdist`` argmin,
time and peak extra memory, each case in a fresh process so peaks do not mix; then provq's
``nearest_code`` against faiss-cpu ``IndexFlatL2.search(z, 1)`` on the same input in the same
process (alternating, medians), with both checked against an fp64 reference, and provq once
more without its fused CPU kernel (``PROVQ_CPU_KERNEL=0``); then the scaling of provq's search
time and memory in N and K.
K-means (K=4096 on 131,072 x 8 and K=16384 on 262,144 x 8 clustered vectors, 20 Lloyd
iterations): provq's ``kmeans`` (seeding included) against ``faiss.Kmeans`` on the same data in
the same process: time and inertia ratios, both inertias computed the same way (exact
assignment of each one's centres).

    python benchmarks/bench_quantizer.py [--device cuda] [--skip-kmeans] [--skip-scaling]
    python benchmarks/bench_quantizer.py --small   # where the kernel is worth its build
"""

from __future__ import annotations

import argparse
import json
import os
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


def peak_rss_bytes() -> int:
    """This process's own resident high-water mark. Not ``getrusage``'s ``ru_maxrss``: a child
    keeps its parent's maximum across fork and exec, so a large parent inflates every child."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_case(case: str, n: int, k: int, d: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    # Off-centre latents, as real encoders produce.
    z = (3.0 + torch.randn(n, d, generator=g)).to(device)
    codes = (3.0 + torch.randn(k, d, generator=g)).to(device)
    if case == "provq":
        from provq_lightning.vq.quantizer import VectorQuantizer

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
        peak = peak_rss_bytes() - base
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


def without_kernel(fn):
    """``fn`` run by provq's search without its fused CPU kernel: the blocked torch path (the
    GPU code, and what runs where no C++ compiler is available)."""
    from provq_lightning.vq.cpu_kernel import ENV_SWITCH

    def run():
        previous = os.environ.get(ENV_SWITCH)
        os.environ[ENV_SWITCH] = "0"
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ[ENV_SWITCH]
            else:
                os.environ[ENV_SWITCH] = previous
    return run


def median_times(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each callable, alternating them so load changes hit all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm caches and allocators
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_search_faiss(args) -> dict:
    import faiss

    from provq_lightning.vq.search import nearest_code

    g = torch.Generator().manual_seed(0)
    z = 3.0 + torch.randn(args.n, args.d, generator=g)
    codes = 3.0 + torch.randn(args.k, args.d, generator=g)
    index = faiss.IndexFlatL2(args.d)
    index.add(codes.numpy())
    z_np = z.numpy()
    dev = torch.device(args.device)
    z_dev, codes_dev = z.to(dev), codes.to(dev)
    fns = {
        "provq": lambda: nearest_code(z_dev, codes_dev),
        "faiss": lambda: index.search(z_np, 1),
    }
    if dev.type == "cpu":
        fns["provq_blocks"] = without_kernel(lambda: nearest_code(z_dev, codes_dev))
    med = median_times(fns, args.repeats_faiss, dev)
    # fp64 reference in row chunks (the whole N x K fp64 matrix would take 4 GiB).
    reference = torch.cat([torch.cdist(part.double(), codes.double()).argmin(dim=1)
                           for part in z.split(1024)])
    ours = nearest_code(z_dev, codes_dev).cpu()
    theirs = torch.from_numpy(index.search(z_np, 1)[1][:, 0]).long()
    print(f"\nNearest-code search vs faiss-cpu IndexFlatL2.search(z, 1), N={args.n} K={args.k} "
          f"D={args.d}, same input and process, median of {args.repeats_faiss} alternating runs "
          f"(torch {torch.get_num_threads()} threads, faiss {faiss.omp_get_max_threads()})")
    print(f"{'case':<26}{'time (s)':>10}{'rows != fp64':>14}")
    print(f"{'provq nearest_code':<26}{med['provq']:>10.3f}{int((ours != reference).sum()):>14}")
    if "provq_blocks" in med:
        blocks = without_kernel(lambda: nearest_code(z_dev, codes_dev))().cpu()
        print(f"{'  without the CPU kernel':<26}{med['provq_blocks']:>10.3f}"
              f"{int((blocks != reference).sum()):>14}")
    print(f"{'faiss IndexFlatL2':<26}{med['faiss']:>10.3f}{int((theirs != reference).sum()):>14}")
    print(f"time ratio provq / faiss: {med['provq'] / med['faiss']:.2f}x")
    return {"provq": med["provq"], "faiss": med["faiss"]}


def bench_search_scaling(args) -> list[dict]:
    grid = [(n, args.k) for n in (8192, 32768, 131072)]
    grid += [(args.n, k) for k in (1024, 4096, 65536)]
    rows = []
    for n, k in sorted(set(grid), key=lambda nk: (nk[1], nk[0])):
        cmd = [sys.executable, __file__, "--case", "provq", "--n", str(n), "--k", str(k),
               "--d", str(args.d), "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"scaling N={n} K={k} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"n": n, "k": k, **row})
    print(f"\nScaling of provq's search (training-mode VectorQuantizer forward, D={args.d}, "
          f"median of {args.repeats}, fresh process per point)")
    print(f"{'N':>8}{'K':>8}{'time (s)':>10}{'ns / (N*K)':>12}{'peak MB':>10}")
    for r in rows:
        print(f"{r['n']:>8}{r['k']:>8}{r['seconds']:>10.3f}"
              f"{1e9 * r['seconds'] / (r['n'] * r['k']):>12.2f}{r['peak_bytes'] / 2**20:>10.0f}")
    return rows


def bench_small(args) -> list[dict]:
    """Per-call time of small searches with and without the fused kernel: where it gains too
    little to be worth its one-time build (``cpu_kernel.MIN_PAIRS``)."""
    from provq_lightning.vq import cpu_kernel
    from provq_lightning.vq.search import nearest_code

    if cpu_kernel.kernel() is None:
        raise SystemExit("the fused CPU kernel could not be built here; nothing to compare")
    build_seconds = 30.0
    grid = [(675, 32, 2)]  # TopoDisc: its whole training set against 32 codes, every step
    grid += [(n, k, args.d) for k in (32, 128, 512, 2048) for n in (256, 1024, 2048, 4096, 16384)]
    threshold, rows = cpu_kernel.MIN_PAIRS, []
    cpu_kernel.MIN_PAIRS = 0  # the kernel at every size, to measure it
    try:
        for n, k, d in grid:
            g = torch.Generator().manual_seed(0)
            z = 3.0 + torch.randn(n, d, generator=g)
            codes = 3.0 + torch.randn(k, d, generator=g)
            repeats = max(args.repeats_faiss, min(300, 20_000_000 // (n * k)))
            med = median_times({"kernel": lambda z=z, c=codes: nearest_code(z, c),
                                "torch": without_kernel(lambda z=z, c=codes: nearest_code(z, c))},
                               repeats, torch.device("cpu"))
            rows.append({"n": n, "k": k, "d": d, **med})
    finally:
        cpu_kernel.MIN_PAIRS = threshold
    print(f"\nSmall searches (nearest_code), per call, median of alternating runs, torch "
          f"{torch.get_num_threads()} threads; MIN_PAIRS = {threshold} rows x codes")
    print(f"{'N':>6}{'K':>6}{'D':>4}{'N x K':>10}{'kernel us':>11}{'torch us':>10}{'saved us':>10}"
          f"{'calls to repay a 30 s build':>29}")
    for r in rows:
        saved = r["torch"] - r["kernel"]
        repay = f"{build_seconds / saved:,.0f}" if saved > 0 else "never"
        print(f"{r['n']:>6}{r['k']:>6}{r['d']:>4}{r['n'] * r['k']:>10}{1e6 * r['kernel']:>11.0f}"
              f"{1e6 * r['torch']:>10.0f}{1e6 * saved:>10.0f}{repay:>29}")
    return rows


def clustered(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A clustered, anisotropic cloud, like encoder outputs after warmup.
    centres = 2.0 * torch.randn(512, d, generator=g)
    return centres[torch.randint(512, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def bench_kmeans(args, n: int, k: int) -> dict:
    import faiss

    from provq_lightning.vq.kmeans import kmeans
    from provq_lightning.vq.search import nearest_code

    x = clustered(n, args.d)
    dev = torch.device(args.device)
    xd = x.to(dev)

    def inertia(centers: torch.Tensor) -> float:
        centers = centers.to(dev)
        return float((xd - centers[nearest_code(xd, centers)]).double().pow(2).sum())

    rows = []
    for _ in range(args.kmeans_repeats):  # alternate, so load changes hit both alike
        sync(dev)
        start = time.perf_counter()
        ours = kmeans(xd, k, iters=args.kmeans_iters, tol=0.0, seed=0)
        sync(dev)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = faiss.Kmeans(args.d, k, niter=args.kmeans_iters, seed=1234)
        theirs.train(x.numpy())
        faiss_s = time.perf_counter() - start
        rows.append((ours_s, faiss_s))
    ours_s = statistics.median(r[0] for r in rows)
    faiss_s = statistics.median(r[1] for r in rows)
    ours_i, faiss_i = inertia(ours.centers), inertia(torch.from_numpy(theirs.centroids))
    blocks_s = None
    if dev.type == "cpu":  # once, for the record: no compiler, or GPU-like code
        start = time.perf_counter()
        blocks = without_kernel(lambda: kmeans(xd, k, iters=args.kmeans_iters, tol=0.0, seed=0))()
        blocks_s = time.perf_counter() - start
    print(f"\nK-means, K={k} on {n} x {args.d} clustered vectors, {args.kmeans_iters} Lloyd "
          f"iterations (provq: k-means++ seeding included; faiss: its random init), same data "
          f"and process, median of {args.kmeans_repeats} alternating runs")
    print(f"{'case':<26}{'time (s)':>10}{'inertia':>14}")
    print(f"{'provq kmeans (' + args.device + ')':<26}{ours_s:>10.2f}{ours_i:>14.1f}")
    if blocks_s is not None:
        print(f"{'  without the CPU kernel':<26}{blocks_s:>10.2f}{inertia(blocks.centers):>14.1f}"
              f"   (1 run, {blocks_s / faiss_s:.2f}x faiss)")
    print(f"{'faiss.Kmeans (CPU)':<26}{faiss_s:>10.2f}{faiss_i:>14.1f}")
    print(f"time ratio provq / faiss: {ours_s / faiss_s:.2f}x   inertia ratio provq / faiss: "
          f"{ours_i / faiss_i:.4f}")
    return {"seconds": ours_s, "faiss_seconds": faiss_s, "inertia_ratio": ours_i / faiss_i,
            "blocks_seconds": blocks_s}


def bench_threads(args) -> list[dict]:
    """Search and k-means (K=4096) at 1 thread and at every core, same process, against faiss
    at the same thread count: the thread-scaling table (issue 25)."""
    import faiss

    from provq_lightning.vq.kmeans import kmeans
    from provq_lightning.vq.search import nearest_code

    g = torch.Generator().manual_seed(0)
    z = 3.0 + torch.randn(args.n, args.d, generator=g)
    codes = 3.0 + torch.randn(args.k, args.d, generator=g)
    index = faiss.IndexFlatL2(args.d)
    index.add(codes.numpy())
    x = clustered(131072, args.d)

    def inertia(centers: torch.Tensor) -> float:
        return float((x - centers[nearest_code(x, centers)]).double().pow(2).sum())

    counts = sorted({1, os.cpu_count() or 1})
    saved = torch.get_num_threads()
    rows = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            search = median_times({"provq": lambda: nearest_code(z, codes),
                                   "faiss": lambda: index.search(z.numpy(), 1)},
                                  args.repeats_faiss, torch.device("cpu"))
            times = []
            for _ in range(args.kmeans_repeats):  # alternating, as above
                start = time.perf_counter()
                ours = kmeans(x, 4096, iters=args.kmeans_iters, tol=0.0, seed=0)
                mid = time.perf_counter()
                theirs = faiss.Kmeans(args.d, 4096, niter=args.kmeans_iters, seed=1234)
                theirs.train(x.numpy())
                times.append((mid - start, time.perf_counter() - mid))
            rows.append({
                "threads": threads, "search": search["provq"], "search_faiss": search["faiss"],
                "kmeans": statistics.median(t[0] for t in times),
                "kmeans_faiss": statistics.median(t[1] for t in times),
                "inertia_ratio": inertia(ours.centers)
                / inertia(torch.from_numpy(theirs.centroids)),
            })
    finally:
        torch.set_num_threads(saved)
    one = rows[0]
    print(f"\nThread scaling, same process: search N={args.n} K={args.k} D={args.d} (median of "
          f"{args.repeats_faiss}), k-means K=4096 on 131072 x {args.d}, {args.kmeans_iters} "
          f"iterations (median of {args.kmeans_repeats}); faiss at the same thread count")
    print(f"{'threads':>7}{'search s':>10}{'x 1 thr':>9}{'/ faiss':>9}"
          f"{'k-means s':>11}{'x 1 thr':>9}{'/ faiss':>9}{'inertia':>9}")
    for r in rows:
        print(f"{r['threads']:>7}{r['search']:>10.3f}{one['search'] / r['search']:>9.2f}"
              f"{r['search'] / r['search_faiss']:>9.2f}{r['kmeans']:>11.2f}"
              f"{one['kmeans'] / r['kmeans']:>9.2f}{r['kmeans'] / r['kmeans_faiss']:>9.2f}"
              f"{r['inertia_ratio']:>9.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--k", type=int, default=16384)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-faiss", type=int, default=7)
    parser.add_argument("--kmeans-iters", type=int, default=20)
    parser.add_argument("--kmeans-repeats", type=int, default=3)
    parser.add_argument("--skip-kmeans", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--threads-only", action="store_true",
                        help="only the thread-scaling table (1 thread and every core)")
    parser.add_argument("--small", action="store_true",
                        help="only the small-search table behind cpu_kernel.MIN_PAIRS")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.k, args.d, args.device, args.repeats)))
        return
    if args.small:
        bench_small(args)
        return
    if args.threads_only:
        bench_threads(args)
        return
    bench_search(args)
    bench_search_faiss(args)
    if not args.skip_scaling:
        bench_search_scaling(args)
    if not args.skip_kmeans:
        bench_kmeans(args, 131072, 4096)
        bench_kmeans(args, 262144, 16384)
    bench_threads(args)
    if args.device == "cpu":
        bench_small(args)


if __name__ == "__main__":
    main()
