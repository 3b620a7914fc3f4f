"""Throughput of the exact CPU LUT GEMM (``approxrun.ops.lut_matmul``) against a float matmul.

Run: ``python benchmarks/bench_ops.py [--repeats N] [--threads T] [--cpu-time]``. For each (M, K, N) it prints
G lookups/s (M*K*N LUT reads per second, best of ``--repeats`` runs), the float32 matmul time on
the same shape, and how many times slower the LUT product is; a last line gives the geo-means.
The LUT is random over the full int16 product range: full rank, with sums that need the
exactness rules, so every shape measures the general gather path.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from approxrun.lut import code_to_index
from approxrun.multipliers import Multiplier
from approxrun.ops import lut_matmul

SHAPES = ((8192, 150, 16), (128, 256, 120), (73728, 25, 6), (4096, 576, 64), (4096, 1152, 128))
TARGET_GLOOKUPS = 3.0


def best_time(fn, repeats: int, clock) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def check_rows(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lut: Multiplier, rows: int = 3) -> None:
    """A few output rows against a plain int64 gather: a fast path that is wrong is not fast."""
    a_idx, b_idx = code_to_index(a[:rows].numpy()), code_to_index(b.numpy())
    expected = lut.lut[a_idx[:, :, None], b_idx[None]].sum(1)
    if not np.array_equal(out[:rows].numpy(), expected):
        raise SystemExit(f"lut_matmul is wrong for shape {tuple(a.shape)} x {tuple(b.shape)}")


def bench_shape(m: int, k: int, n: int, lut: Multiplier, repeats: int, generator: torch.Generator, clock):
    """(G lookups/s, LUT GEMM seconds, float matmul seconds) for one shape."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=generator)
    af, bf = a.float(), b.float()
    check_rows(lut_matmul(a, b, lut), a, b, lut)
    lut_s = best_time(lambda: lut_matmul(a, b, lut), repeats, clock)
    float_s = best_time(lambda: af @ bf, repeats, clock)
    return m * k * n / lut_s / 1e9, lut_s, float_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU clock and one torch thread: a per-core figure that "
                             "other processes on a shared CPU barely disturb")
    args = parser.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    generator = torch.Generator().manual_seed(0)
    table = torch.randint(-(2**15), 2**15, (256, 256), dtype=torch.int64, generator=generator)
    lut = Multiplier("random full-range", table.numpy())  # as the layers pass it: tables cached per object

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}, "
          f"{'thread CPU time' if args.cpu_time else 'wall-clock time'}, "
          f"1-min load average {os.getloadavg()[0]:.1f} (other processes on the CPU slow every column)")
    header = f"{'M':>7} {'K':>5} {'N':>4} | {'G lookups/s':>11} {'lut ms':>9} {'float ms':>9} {'lut/float':>9}"
    print(header)
    print("-" * len(header))
    rates, ratios = [], []
    for m, k, n in SHAPES:
        rate, lut_s, float_s = bench_shape(m, k, n, lut, args.repeats, generator, clock)
        rates.append(rate)
        ratios.append(lut_s / float_s)
        print(f"{m:>7} {k:>5} {n:>4} | {rate:>11.2f} {lut_s * 1e3:>9.2f} {float_s * 1e3:>9.3f} {ratios[-1]:>9.1f}")
    geo_rate = math.exp(sum(map(math.log, rates)) / len(rates))
    geo_ratio = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print("-" * len(header))
    print(f"{'geo-mean':>18} | {geo_rate:>11.2f} {'':>9} {'':>9} {geo_ratio:>9.1f}"
          f"   (target >= {TARGET_GLOOKUPS:g} G lookups/s)")


if __name__ == "__main__":
    main()
