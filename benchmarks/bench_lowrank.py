"""Exact low-rank LUT GEMMs against the gather path, per multiplier and core shape.

Run: ``python benchmarks/bench_lowrank.py [--repeats N] [--threads T] [--designs a,b,...]
[--evoapprox ROOT]``. For each built-in design (and each ``mul8s`` circuit of an EvoApproxLib
checkout given by ``--evoapprox`` or ``$EVOAPPROX_ROOT``) it prints the rank of the error
``lut - exact product`` (``>=r``: a modular lower bound, beyond the factorization's limit) and, per
shape, the path ``strategy="auto"`` picks (``lr-int8``/``lr-float32``/``lr-float64``: the low-rank
plan, or ``gather``), G lookup-equivalents/s (M*K*N LUT products per second of ``lut_matmul`` on int8
codes, best of ``--repeats``, the two paths timed in turns) of the gather and of ``strategy="lowrank"``
(the cheapest exact low-rank plan), and the speed-up. Every low-rank result is checked to equal the
gather's (the torch-op gather: ``routes=()`` leaves out the compiled kernel). Target: >= 3x the gather for every multiplier of rank <= 4 on the three larger shapes (the
most M*K*N products).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from approxrun.multipliers import DESIGN_EXAMPLES, get_multiplier
from approxrun.ops import LutEngine, lut_matmul
from approxrun.ops import lowrank
from approxrun.ops.lowrank.calibration import cpu_description
from bench_ops import SHAPES

TARGET_RANK = 4
TARGET_SPEEDUP = 3.0
TARGET_SHAPES = tuple(sorted(SHAPES, key=math.prod)[-3:])  # the three with the most products


def multipliers(designs: list[str], evoapprox_root: str | None):
    for name in designs:
        yield get_multiplier(name)
    if evoapprox_root:
        from approxrun.multipliers.evoapprox import evoapprox_multiplier, index_circuits
        from pathlib import Path
        for name in sorted(n for n in index_circuits(Path(evoapprox_root)) if n.startswith("mul8s")):
            yield evoapprox_multiplier(name, evoapprox_root)


def rank_text(multiplier) -> str:
    table = multiplier.engine.lowrank
    if table is not None:
        return str(table.rank)
    return f">={lowrank.modular_rank(multiplier.error_table.astype(np.int64))}"


def alternating_best(fns, repeats: int) -> list[float]:
    """Fastest of ``repeats`` timed calls of each function, the functions taking turns so that a
    shared machine's changing load reaches all of them alike (one warm-up call each)."""
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def run_with(engine: LutEngine, a, b):
    return lambda: lut_matmul(a, b, engine)


def bench(multiplier, shape, repeats: int, generator: torch.Generator):
    """(auto's choice, gather G/s, low-rank G/s or None) for one multiplier and shape."""
    m, k, n = shape
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=generator)
    cpu = torch.device("cpu")
    auto, forced = multiplier.engine, LutEngine(multiplier.lut, strategy="lowrank")
    plan, _ = auto.plan(1, m, k, n, cpu, byte_codes=True)
    choice = "gather" if plan is None else f"lr-{plan.kind}"
    gather = run_with(LutEngine(multiplier.lut, strategy="gather", routes=()), a, b)
    if forced.plan(1, m, k, n, cpu, byte_codes=True)[0] is None:
        return choice, m * k * n / alternating_best([gather], repeats)[0] / 1e9, None
    low = run_with(forced, a, b)
    if not torch.equal(low(), gather()):
        raise AssertionError(f"{multiplier.name} {shape}: low-rank result differs from the gather")
    gather_s, lowrank_s = alternating_best([gather, low], repeats)
    return choice, m * k * n / gather_s / 1e9, m * k * n / lowrank_s / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--designs", default=",".join(DESIGN_EXAMPLES), help="comma-separated designs")
    parser.add_argument("--evoapprox", default=os.environ.get("EVOAPPROX_ROOT"),
                        help="EvoApproxLib checkout: also bench its mul8s circuits")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags']) or '-'}; load average {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}; "
          "G lookup-equivalents/s = M*K*N / time")
    header = (f"{'multiplier':>15} {'rank':>5} {'M':>6} {'K':>5} {'N':>4} | {'auto':>9} "
              f"{'gather G/s':>10} {'lowrank G/s':>11} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    misses = []
    for multiplier in multipliers(args.designs.split(","), args.evoapprox):
        rank = rank_text(multiplier)
        for shape in SHAPES:
            choice, gather_rate, lowrank_rate = bench(multiplier, shape, args.repeats, generator)
            speedup = lowrank_rate / gather_rate if lowrank_rate else None
            print(f"{multiplier.name:>15} {rank:>5} {shape[0]:>6} {shape[1]:>5} {shape[2]:>4} | {choice:>9} "
                  f"{gather_rate:>10.2f} {lowrank_rate or float('nan'):>11.2f} "
                  f"{'' if speedup is None else f'{speedup:.1f}x':>8}", flush=True)
            if rank.isdigit() and int(rank) <= TARGET_RANK and shape in TARGET_SHAPES:
                if speedup is None or speedup < TARGET_SPEEDUP:
                    misses.append(f"{multiplier.name} {shape}")
    print("-" * len(header))
    print(f"target: >= {TARGET_SPEEDUP:g}x the gather for rank <= {TARGET_RANK} on {list(TARGET_SHAPES)}: "
          + ("met" if not misses else "missed by " + ", ".join(misses)))


if __name__ == "__main__":
    main()
