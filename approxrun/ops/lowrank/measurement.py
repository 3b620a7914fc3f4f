"""Measuring the :class:`~approxrun.ops.lowrank.calibration.Calibration` figures on this machine
(about a second per round on 2 cores), and the per-machine cache: :func:`load_or_measure`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from approxrun.ops.lowrank.calibration import (GEMM_WIDTHS, Calibration, calibration_dir, machine_key,
                                               map_gemm_columns)
from approxrun.threads import available_cpus

__all__ = ["measure", "load_or_measure", "int8_gemm_is_exact"]

log = logging.getLogger(__name__)

GEMM_DTYPES = ("float32", "float64", "int8")
GEMM_ROWS, GEMM_DEPTH = 1024, 512  # M and K of the timed GEMMs
GATHER_SHAPES = ((2048, 64, 64), (16384, 32, 4), (256, 64, 256), (4096, 96, 16))  # (M, K, N): each term leads once


def _operands(generator: torch.Generator, m: int, k: int, n: int,
              dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes a [1, M, K] and b [1, K, N] of a timed GEMM."""
    return (torch.randint(-128, 128, (1, m, k), generator=generator, dtype=dtype),
            torch.randint(-128, 128, (1, k, n), generator=generator, dtype=dtype))


def _best_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up: first-touch memory, kernel selection
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def int8_gemm_is_exact() -> bool:
    """Whether torch's CPU int8 GEMM (``torch._int_mm``, int32 sums) is exact here: extreme operands
    (which expose the int16 saturation of pre-VNNI kernels) and random ones."""
    if not hasattr(torch, "_int_mm"):
        return False
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.full((32, 4096), u, dtype=torch.int8), torch.full((4096, 16), v, dtype=torch.int8))
             for u, v in ((127, 127), (-128, -128), (127, -128), (-128, 127))]
    for m, k, n in ((37, 1001, 5), (1, 23, 1)):
        cases.append((torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator),
                      torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=generator)))
    try:
        return all(torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) for a, b in cases)
    except RuntimeError:
        return False


def _gather_figures(generator: torch.Generator) -> tuple[float, float, float, float]:
    """(per lookup, per row, per table entry) of the table gather, fitted by non-negative least
    squares in relative error to shapes that stress each term, and the direct gather's time per
    lookup."""
    from approxrun.ops.gather import grouped_lut_gemm
    lut = torch.randint(-2**15, 2**15, (256, 256), generator=generator).double()
    rows, times = [], []
    for m, k, n in GATHER_SHAPES:
        a, b = _operands(generator, m, k, n, torch.int32)
        times.append(_best_time(lambda: grouped_lut_gemm(a, b, lut, direct=False)))
        rows.append((m * k * n, max(m, n) * k, 256 * k * min(m, n)))
    lookup, row, table = _relative_nnls(np.array(rows, dtype=float), np.array(times))
    a, b = _operands(generator, 128, 64, 96, torch.int32)
    direct = _best_time(lambda: grouped_lut_gemm(a, b, lut, direct=True)) / (128 * 64 * 96)
    return float(lookup), float(row), float(table), direct


def _gemm_figures(generator: torch.Generator, int8_exact: bool) -> dict:
    figures = {}
    for name in GEMM_DTYPES:
        rates = []
        for n in GEMM_WIDTHS:
            if name == "int8":
                a = torch.randint(-128, 128, (GEMM_ROWS, GEMM_DEPTH), generator=generator, dtype=torch.int8)
                b = torch.randint(-128, 128, (GEMM_DEPTH, n), generator=generator, dtype=torch.int8)
                if not int8_exact:
                    rates.append(math.inf)
                    continue
                run = lambda a=a, b=b: torch._int_mm(a, b)  # noqa: E731
            else:
                dtype = getattr(torch, name)
                a = torch.randint(-128, 128, (GEMM_ROWS, GEMM_DEPTH), generator=generator).to(dtype)
                b = torch.randint(-128, 128, (GEMM_DEPTH, n), generator=generator).to(dtype)
                run = lambda a=a, b=b: torch.mm(a, b)  # noqa: E731
            rates.append(_best_time(run) / (GEMM_ROWS * GEMM_DEPTH * n))
        figures[name] = rates
    return figures


def measure(rounds: int = 2) -> Calibration:
    """Time every primitive on this machine (about a second per round on 2 cores); each figure is
    the best of ``rounds`` rounds, so that a burst of load from other processes counts less."""
    figures = [_measure_round() for _ in range(rounds)]
    best = {}
    for name, value in figures[0].as_dict().items():
        values = [f.as_dict()[name] for f in figures]
        if name == "gemm":
            best[name] = {dtype: [min(v[dtype][i] for v in values) for i in range(len(GEMM_WIDTHS))]
                          for dtype in value}
        elif name == "call_overhead":
            best[name] = {route: min(v[route] for v in values) for route in value}
        elif isinstance(value, float):
            best[name] = min(values)
        else:
            best[name] = value
    return Calibration.from_dict(best)


def _measure_round() -> Calibration:
    from approxrun.ops import native
    from approxrun.ops.lowrank.executors import gatherer
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    warm = torch.ones(512, 512)
    for _ in range(8):  # wake the thread pool and the allocator before anything is timed
        torch.mm(warm, warm)
    lookup, row, table, direct = _gather_figures(generator)
    int8_exact = int8_gemm_is_exact()
    gemm = _gemm_figures(generator, int8_exact)
    count = 1 << 18
    index = torch.randint(0, 256, (count,), generator=generator, dtype=torch.int32)
    gather_rows = gatherer(native.load())  # the map gather engines use: the compiled one where it builds
    maps, mapped = torch.randn(256, 4, generator=generator), torch.empty(count, 4)  # outputs reused, as in use
    map_entry = _best_time(lambda: gather_rows(index, maps, out=mapped)) / (count * 4)
    words = torch.randint(-2**31, 2**31 - 1, (256,), generator=generator, dtype=torch.int32)
    gathered = torch.empty(count, dtype=torch.int32)
    word_index = _best_time(lambda: gather_rows(index, words, out=gathered)) / count
    pairs = torch.randint(-2**62, 2**62, (65536,), generator=generator)
    codes = torch.randint(-128, 128, (count,), generator=generator, dtype=torch.int8)

    def pair_gather():
        torch.index_select(pairs, 0, codes.view(torch.int16).to(torch.int32) & 0xFFFF)

    pair_index = _best_time(pair_gather) / count
    out, part = torch.zeros(count, dtype=torch.float64), torch.ones(count, dtype=torch.float64)
    accumulate = _best_time(lambda: out.add_(part)) / count
    small = torch.ones(32, 64, dtype=torch.int8)
    int8_call = _best_time(lambda: torch._int_mm(small, small.t().contiguous())) if int8_exact else math.inf
    native_lookup, native_table_entry, native_row_add, table_bytes, permute_group, permute_code = _native_figures(
        generator)
    map_read, map_mac = _map_gemm_figures(generator, pairs=False)
    pair_read, pair_mac = _map_gemm_figures(generator, pairs=True)
    backward_lookup, native_backward, lowrank_backward_entry = _backward_figures(generator)
    unfold_entry = _unfold_figure(generator)
    overheads = _call_overheads(generator, int8_exact, int8_call)
    log.info("LUT route calibration measured in %.2f s", time.perf_counter() - start)
    return Calibration(lookup, row, table, direct, gemm, map_entry, word_index, pair_index, int8_call, accumulate,
                       int8_exact, backward_lookup, native_lookup, native_table_entry, native_row_add, table_bytes,
                       permute_group, permute_code, map_read, map_mac, _map_lanes(), pair_read, pair_mac,
                       *native_backward, lowrank_backward_entry, unfold_entry, overheads, machine_key())


def _backward_figures(generator: torch.Generator) -> tuple[float, tuple[float, float, float], float]:
    """The LUT-gradient backward's routes, in seconds: per product of the torch gradient-table
    gathers (:func:`grouped_lut_gemm_backward`, M*K*N products plus 256*K*N histogram entries
    counted alike); per product (M*K*N) of the compiled one for both gradients, grad_a alone and
    grad_b alone (inf when it cannot be built); per entry of a and factor column (M*K*width) of the
    low-rank backward (the exact product's tables, rank 1)."""
    from approxrun.lut import exact_lut
    from approxrun.ops import native
    from approxrun.ops.gradients import gradient_tables, grouped_lut_gemm_backward
    from approxrun.ops.lowrank.executors import lowrank_backward
    from approxrun.ops.lowrank.factor import factor_rational_table
    from approxrun.ops.lowrank.tables import LowRankTable

    m, k, n = 256, 8, 8  # slow (a scatter per product): a small shape, one timed call
    tables = [torch.randn(256, 256, generator=generator, dtype=torch.float64) for _ in range(2)]
    a = torch.randint(0, 256, (1, m, k), generator=generator)
    b = torch.randint(0, 256, (1, k, n), generator=generator)
    grad = torch.randn(1, m, n, generator=generator, dtype=torch.float64)
    torch_lookup = _best_time(lambda: grouped_lut_gemm_backward(grad, a, b, *tables), repeats=1) / ((m + 256) * k * n)
    m, k, n = 4096, 32, 8
    a = torch.randint(0, 256, (1, m, k), generator=generator)
    b = torch.randint(0, 256, (1, k, n), generator=generator)
    grad = torch.randn(1, m, n, generator=generator, dtype=torch.float64)
    kernel = native.load()
    compiled = tuple(math.inf if kernel is None else
                     _best_time(lambda needs=needs: kernel.lut_backward(grad, a, b, *tables, needs)) / (m * k * n)
                     for needs in ((True, True), (True, False), (False, True)))
    fa, fb = (LowRankTable.from_factors(factor_rational_table(t)) for t in gradient_tables(exact_lut(), True, True))
    entry = _best_time(lambda: lowrank_backward(grad, a, b, fa, fb)) / (m * k * (fa.width + fb.width))
    return torch_lookup, compiled, entry


def _unfold_figure(generator: torch.Generator) -> float:
    """Seconds per element of window rows unfolded as int32 codes from float-held codes (as the
    layers hold them; a 3x3 convolution; the compiled im2col where it builds)."""
    from approxrun.ops import native
    from approxrun.ops.im2col import grouped_rows
    x = torch.randint(-128, 128, (8, 16, 30, 30), generator=generator).float()
    rows = torch.empty(8 * 28 * 28 * 16 * 9, dtype=torch.int32)
    kernel = native.load()
    return _best_time(lambda: grouped_rows(x, (3, 3), (1, 1), (1, 1), 1, out=rows, kernel=kernel)) / rows.numel()


def _native_figures(generator: torch.Generator) -> tuple[float, float, float, int, float, float]:
    """The compiled CPU LUT GEMM (inf when it cannot be built): seconds per lookup of its direct
    strategy; of its table strategy (16-bit pair tables, as most LUTs take), the budget of a tile of
    k's tables (the fastest of an eighth, a quarter and half the L2 at a shape whose tables exceed
    all three), then with it per table entry and per 8-lane row add, fitted to a shape where building
    the tables dominates and one where adding rows does; per 64-lane lookup of the in-register
    strategy, and per code its transposed form transposes (inf where not built)."""
    from approxrun.ops import native
    kernel = native.load()
    if kernel is None:
        return math.inf, math.inf, math.inf, 0, math.inf, math.inf
    lut = torch.randint(-2**15, 2**15, (256, 256), generator=generator, dtype=torch.int32)
    lut_columns, planes = lut.t().contiguous(), native.byte_planes(lut.numpy().astype(np.int64))
    a, b = _operands(generator, 1024, 512, 32)
    budgets = {kernel.l2_bytes // parts: math.inf for parts in (8, 4, 2)}
    for _ in range(3):  # in turns, so that a burst of load hits them alike
        for bytes_ in budgets:
            budgets[bytes_] = min(budgets[bytes_], _best_time(
                lambda: kernel.tables(a, b, lut_columns, False, planes=planes, table_bytes=bytes_), repeats=2))
    budget = min(budgets, key=budgets.get)

    def timed(m: int, k: int, n: int, tables: bool) -> float:
        a, b = _operands(generator, m, k, n)
        if tables:
            return _best_time(lambda: kernel.tables(a, b, lut_columns, False, planes=planes, table_bytes=budget))
        return _best_time(lambda: kernel(a, b, lut, False))

    direct = timed(512, 128, 64, False) / (512 * 128 * 64)
    shapes = ((64, 64, 256), (8192, 64, 16), (2048, 128, 64))  # (M, K, N): tables, row adds, both
    terms = np.array([(256 * k * n, m * k * -(-n // 8)) for m, k, n in shapes], dtype=float)
    times = np.array([timed(m, k, n, True) for m, k, n in shapes])
    entry, row_add = _relative_nnls(terms, times)
    if not kernel.permutes:
        return direct, entry, row_add, budget, math.inf, math.inf
    a, b = _operands(generator, 512, 128, 128)
    group = _best_time(lambda: kernel.permute(a, b, planes, False)) / (512 * 128 * 2)
    m, k, n = 8192, 64, 8
    a, b = _operands(generator, m, k, n)
    transposed = _best_time(lambda: kernel.permute(a, b, planes, True))
    code = max(transposed - n * k * (m // 64) * group, 0.05 * transposed) / (m * k)
    return direct, entry, row_add, budget, group, code


def _call_overheads(generator: torch.Generator, int8_exact: bool, int8_call: float) -> dict:
    """Each route family's time at a tiny GEMM (1 x 4 x 8 x 4): its fixed cost per call, which the
    per-element figures miss and which dominates 0.1 ms calls (the int8 plan's GEMM call is
    modelled apart, :attr:`Calibration.int8_call`)."""
    from approxrun.ops import native
    from approxrun.ops.gather import grouped_lut_gemm
    from approxrun.ops.im2col import Workspace
    from approxrun.ops.lowrank.executors import lowrank_gemm
    from approxrun.ops.lowrank.plans import GemmPlan
    from approxrun.ops.lowrank.tables import LowRankTable
    kernel = native.load()
    a, b = _operands(generator, 4, 8, 4, torch.int32)
    maps = torch.randint(-100, 101, (256, 2), generator=generator).numpy()
    table = LowRankTable.of(maps, maps, 1)
    lut = torch.randint(-2**15, 2**15, (256, 256), generator=generator, dtype=torch.int32)
    lut64 = lut.double()
    workspace = Workspace()  # reused, as an engine's

    def plan(kind: str, compiled: bool = False):
        return lambda: lowrank_gemm(a, b, table, GemmPlan(kind, 8, 0.0, compiled=compiled), kernel, torch.int64,
                                    workspace)

    runs = {"torch": lambda: grouped_lut_gemm(a, b, lut64), "float32": plan("float32"),
            "float64": plan("float64")}
    if int8_exact and table.int8 is not None:
        runs["int8"] = plan("int8")
    if kernel is not None:
        runs.update(native=lambda: kernel(a, b, lut, False, out_dtype=torch.int64), compiled=plan("float32", True))
    overheads = {name: _best_time(run, repeats=20) for name, run in runs.items()}
    if "int8" in overheads:
        overheads["int8"] = max(0.0, overheads["int8"] - int8_call)
    return overheads


def _map_lanes() -> int:
    """The float32 lanes of the compiled low-rank plans' vectors (8 where the kernel is not built)."""
    from approxrun.ops import native
    kernel = native.load()
    return 8 if kernel is None else kernel.map_lanes


def _map_gemm_figures(generator: torch.Generator, pairs: bool) -> tuple[float, float]:
    """A compiled low-rank plan, float32 or (``pairs``) int16 (inf where it is not built): seconds
    per map read (pair word) and per multiply-add of its register blocks, fitted to a shape bound
    by multiply-adds and one bound by map reads."""
    from approxrun.ops import native
    kernel = native.load()
    if kernel is None or (pairs and not kernel.map_pairs):
        return math.inf, math.inf
    x, y = (torch.randint(-100, 101, (256, 1), generator=generator) for _ in range(2))
    x, y = (t.int() & 0xFFFF if pairs else t.float() for t in (x, y))  # a word: the pair (t, 0)
    lanes = kernel.map_lanes
    shapes = ((512, 256, 128), (16384, 64, 4))  # (M, K, N)
    terms, times = [], []
    for m, k, n in shapes:
        a, b = _operands(generator, m, k, n)
        terms.append((m * k + k * n, m * k * map_gemm_columns(n, lanes)))
        times.append(_best_time(lambda: kernel.map_gemm(a, b, x, y, k, 1)))
    read, mac = _relative_nnls(np.array(terms, dtype=float), np.array(times))
    return float(read), float(mac)


def _relative_nnls(terms: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative per-term costs fitted in relative error; no term costs nothing (at least 5% of
    its share of the fastest shape's time per unit)."""
    from scipy.optimize import nnls
    costs = nnls(terms / times[:, None], np.ones(len(times)))[0]
    floor = 0.05 * np.min(times[:, None] / np.maximum(terms, 1), axis=0)
    return np.maximum(costs, floor)


def _path(key: dict, folder: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return folder / f"calibration-{digest}.json"


def load_or_measure(folder: Path | None = None, refresh: bool = False,
                    load_average: float | None = None) -> Calibration:
    """This machine's figures: from the cache when present for its key, else measured and cached
    (written atomically; an unwritable cache only costs a new measurement next time).

    Oversubscribed cores slow small GEMMs by an order of magnitude (measured: a float64 GEMM at
    N=8 timed 47x slower while a test suite ran than just after it), so figures measured while the
    machine is busy (a 1-minute load average, ``load_average`` or the system's, above the CPUs this
    process may use) are marked so, and the first process to find the machine quiet measures them
    again."""
    folder = calibration_dir() if folder is None else Path(folder)
    key = machine_key()
    path = _path(key, folder)
    load = os.getloadavg()[0] if load_average is None else load_average
    busy = load > available_cpus()
    if not refresh and path.is_file():
        try:
            calibration = Calibration.from_dict(json.loads(path.read_text()))
            if calibration.machine == key and (busy or not calibration.measured_busy):
                return calibration
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable LUT route calibration %s", path)
    log.info("calibrating the LUT routes for this machine (once per machine key; cached in %s)", folder)
    calibration = replace(measure(), measured_busy=busy)
    if busy:
        log.warning("measured the LUT route costs on a busy machine (load average %.1f, %d CPUs); a later "
                    "process measures them again when the machine is quiet", load, available_cpus())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        partial.write_text(json.dumps(calibration.as_dict(), indent=1))
        partial.replace(path)
    except OSError as exc:
        log.warning("could not cache the LUT route calibration in %s (%s)", folder, exc)
    return calibration
