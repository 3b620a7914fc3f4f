"""The compiled low-rank plans (maps read by code and multiplied in registers: float32 maps, or
int16 maps in pairs where built) against the float64 gather oracle: odd shapes around their
register blocks, K chunks, several groups, every code dtype, a strided b, denominators, int16 maps
at their limit; and their routes through the engine."""

import logging

import numpy as np
import pytest
import torch

from approxrun.multipliers import get_multiplier
from approxrun.ops import LutEngine, lut_matmul, native
from approxrun.ops.lowrank import Calibration, LowRankTable, candidate_plans, int8_gemm_is_exact

from test_lowrank import AMX_LIKE, codes, low_rank_lut, machine, matmul_oracle

KERNEL = native.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="needs a C++ toolchain")
MAPS = ["float32", "int16"]  # the maps each test runs the kernel with (int16: where built)


def grouped_oracle(a, b, lut):
    return np.stack([matmul_oracle(a[g], b[g], lut) for g in range(a.shape[0])])


def run(a, b, form: LowRankTable, chunk: int, out_dtype=torch.float64, maps: str = "float32") -> torch.Tensor:
    if maps == "int16" and not KERNEL.map_pairs:
        pytest.skip("the int16 plan is not built here (needs AVX2 or AVX-512 BW)")
    x, y = form.pair_words("cpu") if maps == "int16" else form.maps("cpu", torch.float32)
    return KERNEL.map_gemm(a, b, x, y, chunk, form.denominator, out_dtype)


@needs_kernel
@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("n", [1, 6, 8, 9, 16, 17, 33, 70])
def test_map_gemm_matches_oracle_around_register_blocks(n, maps):
    """N on both sides of one vector (8 or 16 lanes) and of two; M = 1, 13 and 37 leave partial row
    blocks; K = 300 in chunks of 1, 7 and all of K; two groups; the whole-table form of DRUM (width
    1), an asymmetric rank-2 error plus the exact product (width 3) and asymmetric integer maps of
    widths 2, 4 and 5 (the kernel's versions for fixed widths and the one for any width; int16
    pairs: odd widths padded)."""
    rng = np.random.default_rng(50 + n)
    tables = [get_multiplier("drum_4").engine.lowrank.forms[-1], LutEngine(low_rank_lut(2, seed=n)).lowrank]
    tables += [LowRankTable.of(rng.integers(-128, 128, (256, w)), rng.integers(-90, 60, (256, w)), 1) for w in (2, 4, 5)]
    for form in tables:
        lut = (np.asarray(form.x, dtype=np.int64) @ np.asarray(form.y, dtype=np.int64).T) // form.denominator
        for m in (1, 13, 37):
            a, b = codes(rng, (2, m, 300)), codes(rng, (2, 300, n))
            expected = grouped_oracle(a.numpy(), b.numpy(), lut)
            for chunk in (1, 7, 300):
                assert np.array_equal(run(a, b, form, chunk, maps=maps).numpy(), expected), (form.width, m, n, chunk)


@needs_kernel
@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int64, torch.float32])
def test_map_gemm_reads_every_code_dtype_and_strides(dtype, maps):
    """Codes are read by their byte (negative ones and ones beyond a byte included), with b of one
    column panel (a's maps read at its codes) and of several (a's rows mapped into a panel); b
    transposed in memory; int64 and float64 results."""
    rng = np.random.default_rng(51)
    form = get_multiplier("drum_4").engine.lowrank.forms[-1]
    lut = get_multiplier("drum_4").lut
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128) if dtype == torch.int8 else (-600, 600)
    for n in (5, 70):
        a, b = codes(rng, (1, 23, 150), lo, hi).to(dtype), codes(rng, (1, n, 150), lo, hi).to(dtype).transpose(1, 2)
        expected = grouped_oracle(a.long().numpy(), b.long().numpy(), lut)
        for out_dtype in (torch.int64, torch.float64):
            out = run(a, b, form, 150, out_dtype, maps)
            assert out.dtype == out_dtype and np.array_equal(out.numpy(), expected), (n, out_dtype)


@needs_kernel
@pytest.mark.parametrize("maps", MAPS)
def test_map_gemm_divides_by_the_denominator_exactly(maps):
    """denominator * table == x @ y.T with x a multiple of the denominator: results are the exact
    integer quotients, in int64 and float64."""
    rng = np.random.default_rng(52)
    u, v = rng.integers(-40, 41, (256, 2)), rng.integers(-60, 61, (256, 2))
    form = LowRankTable.of(7 * u, v, 7)
    a, b = codes(rng, (3, 9, 41)), codes(rng, (3, 41, 20))
    expected = grouped_oracle(a.numpy(), b.numpy(), u @ v.T)
    for out_dtype in (torch.int64, torch.float64):
        assert np.array_equal(run(a, b, form, 41, out_dtype, maps).numpy(), expected)


@needs_kernel
@pytest.mark.parametrize("width", [1, 2])
def test_int16_maps_at_their_limit_are_exact(width):
    """Maps of magnitude up to 2**15 - 1 (width 2: a pair's products reach 2 * 32767**2, just below
    2**31; width 1: padded with zeros): one K column per chunk, the chunks summed exactly."""
    rng = np.random.default_rng(54 + width)
    limit = 2**15 - 1
    x, y = (rng.choice([-limit, limit, -limit + 1, 0, 1, 12345], (256, width)) for _ in range(2))
    form = LowRankTable.of(x, y, 1)
    assert form.map_bound == limit
    a, b = codes(rng, (1, 19, 60)), codes(rng, (1, 60, 21))
    chunk = (2**31 - 1) // form.term_bound
    assert chunk >= 1 and chunk * form.term_bound < 2**31
    expected = grouped_oracle(a.numpy(), b.numpy(), x @ y.T)
    assert np.array_equal(run(a, b, form, chunk, torch.int64, "int16").numpy(), expected)


@needs_kernel
def test_map_gemm_rejects_bad_maps():
    a, b = torch.zeros(1, 2, 3, dtype=torch.int32), torch.zeros(1, 3, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32 maps"):
        KERNEL.map_gemm(a, b, torch.zeros(256, 2, dtype=torch.float64), torch.zeros(256, 2), 3, 1)
    with pytest.raises(RuntimeError, match="float32 maps"):  # int32 words of pairs with float maps
        KERNEL.map_gemm(a, b, torch.zeros(256, 1, dtype=torch.int32), torch.zeros(256, 1), 3, 1)
    with pytest.raises(RuntimeError, match="chunk"):
        KERNEL.map_gemm(a, b, torch.zeros(256, 1), torch.zeros(256, 1), 0, 1)


@needs_kernel
def test_every_compiled_gemm_takes_one_group_in_2d():
    """a [M, K] and b [K, N] without the group dimension (what lut_matmul passes, saving views per
    call) give out [M, N], equal to the oracle: the gathers (direct and tables), the in-register
    permutes where built, the int8 plan and the float32 and int16 map plans; mixed ranks are refused."""
    rng = np.random.default_rng(53)
    engine = LutEngine(low_rank_lut(2, seed=53))
    lut, table = engine.values, engine.lowrank
    a, b = codes(rng, (37, 300)), codes(rng, (300, 70)).T.contiguous().T  # b strided (transposed weights)
    calls = {"direct": lambda out: KERNEL(a, b, engine.int32_table(), False, out),
             "tables": lambda out: KERNEL.tables(a, b, engine.int32_table(transposed=True), False, out),
             "float32 maps": lambda out: run(a, b, table, 300, out, "float32")}
    if KERNEL.map_pairs:
        calls["int16 maps"] = lambda out: run(a, b, table, 300, out, "int16")
    if KERNEL.permutes and engine.byte_planes is not None:
        for rows in (False, True):
            calls[f"permute rows={rows}"] = lambda out, rows=rows: KERNEL.permute(a, b, engine.byte_planes, rows, out)
    if table.int8 is not None and int8_gemm_is_exact():  # torch's int8 GEMM saturates without VNNI
        scratch = torch.empty(37 * 300 * table.int8.width, dtype=torch.int8)
        calls["int8"] = lambda out: KERNEL.int8_lowrank_gemm(a, b, table.int8, 300, 16, scratch, out)
    expected = matmul_oracle(a.numpy(), b.numpy(), lut)
    for name, call in calls.items():
        for out_dtype in (torch.int64, torch.float64):
            out = call(out_dtype)
            assert out.shape == (37, 70) and out.dtype == out_dtype, name
            assert np.array_equal(out.numpy(), expected), (name, out_dtype)
    with pytest.raises(RuntimeError, match="without G"):
        KERNEL(a[None], b, engine.int32_table(), False)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_table_strategy_splits_work_exactly(threads):
    """The tables strategy's tasks (16 columns and a block of rows each, row blocks only where the
    threads need them) at 1-3 threads: N of one narrow tile, of a full tile plus a narrow one and
    of several; K of one tile of k and of many with a remainder (tables of half the L2, and of 1-3
    k); M below the rows added at a time;
    int32 and int64 sums, an asymmetric LUT, int8 codes and codes held in floats; int32 tables and,
    for LUTs spanning less than 2**16 (offset below, within and above zero), pair tables."""
    rng = np.random.default_rng(70 + threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for low, high, k in ((-2**15, 2**15, 5), (-2**15, 2**15, 301), (-2**30, 2**30, 37), (1000, 1000 + 2**16, 301),
                             (-70000, -70000 + 2**16, 37)):
            lut = rng.integers(low, high, (256, 256))
            columns = torch.as_tensor(lut.T, dtype=torch.int32).contiguous()
            planes = native.byte_planes(lut)
            assert (planes is None) == (low == -2**30)
            for m, n in ((3, 6), (37, 19), (5, 70), (130, 16)):
                a, b = codes(rng, (m, k)), codes(rng, (k, n))
                expected = matmul_oracle(a, b, lut)
                wide = bool(np.abs(lut).max() * k >= 2**31)
                for a_in, b_in in ((a, b), (a.to(torch.int8), b.float())):
                    for pairs in {None, planes}:
                        for budget in (None, 3 * 8192):  # tiles of k: half the L2; 1 or 3 k deep
                            out = KERNEL.tables(a_in, b_in, columns, wide, torch.int64, pairs, budget)
                            assert np.array_equal(out.numpy(), expected), (threads, k, m, n, pairs is None, budget)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("k", [native.SPAN16_MAX_K - 1, native.SPAN16_MAX_K])
def test_pair_tables_at_their_largest_sums(k):
    """Pair tables sum K values of up to 2**16 - 1 in int32 lanes: at the largest K they take, every
    offset value at its top (one entry at the bottom, so the span is 2**16 - 1), the sums are exact;
    at K = SPAN16_MAX_K the kernel falls back to int32 tables."""
    lut = np.full((256, 256), 5000 + 2**16 - 1)
    lut[7, 9] = 5000
    a = torch.randint(0, 256, (3, k), generator=torch.Generator().manual_seed(k), dtype=torch.int32)
    b = torch.randint(0, 256, (k, 19), generator=torch.Generator().manual_seed(k + 1), dtype=torch.int32)
    a[:, :2], b[:2] = 7, 9  # two products at the bottom
    columns = torch.as_tensor(lut.T, dtype=torch.int32).contiguous()
    out = KERNEL.tables(a, b, columns, True, torch.int64, native.byte_planes(lut))
    assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))


COMPILED_FAST = Calibration(**{**AMX_LIKE.as_dict(), "int8_exact": False, "native_map_entry": 1e-13,
                               "native_map_mac": 1e-14, "native_map_lanes": 16})


@needs_kernel
def test_engine_takes_the_compiled_plan_when_its_figures_say_so(caplog):
    """Injected figures where the compiled plan is cheapest: the engine runs it (exactly); without
    the "native" route, or without float32, it never does."""
    multiplier = get_multiplier("drum_4")
    engine = LutEngine(multiplier.lut, calibration=COMPILED_FAST, trials=0)
    rng = np.random.default_rng(53)
    a, b = codes(rng, (37, 300)), codes(rng, (300, 29))
    with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
        out = lut_matmul(a, b, engine)
    assert "compiled float32 map GEMM over 300 K columns, 1 map columns" in caplog.text
    assert np.array_equal(out.numpy(), matmul_oracle(a.numpy(), b.numpy(), multiplier.lut))
    for routes in (("int8", "float32", "float64"), ("native", "int8", "float64")):
        other = LutEngine(multiplier.lut, routes=routes, calibration=COMPILED_FAST, trials=0)
        assert not other.chosen_route(1, 37, 300, 29, "cpu").startswith("compiled")


def test_compiled_plan_needs_a_calibration_and_the_argument():
    """candidate_plans offers the compiled plan only when asked (the engine asks where the kernel
    runs), with the same proven K chunk as the torch float32 plan."""
    table = get_multiplier("drum_4").engine.lowrank
    cpu = torch.device("cpu")
    assert not any(p.compiled for p in candidate_plans(table, 1, 64, 4096, 64, cpu, COMPILED_FAST))
    plans = candidate_plans(table, 1, 64, 4096, 64, cpu, COMPILED_FAST, compiled=True)
    compiled, float32 = (next(p for p in plans if p.kind == "float32" and p.compiled == flag) for flag in (True, False))
    assert compiled.k_chunk == float32.k_chunk and compiled.k_chunk * compiled.form.term_bound < 2**24


PAIRS_FAST = Calibration(**{**COMPILED_FAST.as_dict(), "native_pair_entry": 1e-14, "native_pair_mac": 1e-15})


@needs_kernel
def test_engine_takes_the_int16_plan_when_its_figures_say_so(caplog):
    """Figures where int16 pairs are cheapest (an AVX2 machine's wide layers): kulkarni's width-2
    maps run as one word per code, exactly; without the int16 route, or without its figures (not
    built), the float32 plan runs instead."""
    if not KERNEL.map_pairs:
        pytest.skip("the int16 plan is not built here (needs AVX2 or AVX-512 BW)")
    multiplier = get_multiplier("kulkarni", signed=False)
    engine = LutEngine(multiplier.lut, False, False, calibration=PAIRS_FAST, trials=0)
    rng = np.random.default_rng(55)
    a, b = codes(rng, (37, 300), 0, 256), codes(rng, (300, 29), 0, 256)
    with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
        out = lut_matmul(a, b, engine)
    assert "compiled int16 map GEMM over 300 K columns, 2 map columns" in caplog.text
    assert np.array_equal(out.numpy(), matmul_oracle(a.numpy(), b.numpy(), multiplier.lut))
    for routes, calibration in ((("native", "int8", "float32", "float64"), PAIRS_FAST),
                                (("native", "int8", "int16", "float32", "float64"), COMPILED_FAST)):
        other = LutEngine(multiplier.lut, False, False, routes=routes, calibration=calibration, trials=0)
        assert other.chosen_route(1, 37, 300, 29, "cpu").startswith("compiled float32")


def timed_routes(engine: LutEngine, lut, rng, caplog) -> str:
    """Calls lut_matmul at (300, 64, 40) until auto's trials are over (every call exact); the routes
    they timed and the one kept, as the route log gives them."""
    a, b = codes(rng, (300, 64)), codes(rng, (64, 40))
    expected = matmul_oracle(a.numpy(), b.numpy(), lut)
    calls = 0
    with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
        while calls == 0 or engine.timing_routes(1, 300, 64, 40):
            assert np.array_equal(lut_matmul(a, b, engine).numpy(), expected)
            calls += 1
    measured = [line for line in caplog.text.splitlines() if "lut gemm: measured" in line]
    assert len(measured) == 1, measured
    return measured[0].split(" for ", 1)[1]


@needs_kernel
def test_auto_times_the_fastest_compiled_plan_even_when_modelled_far_slower(caplog):
    """Auto's trials time each family's best: with figures that put the compiled plans over twice
    the fastest route (beyond the trial spread), the fastest compiled one is still timed (torch's
    GEMMs and the compiled kernel are modelled apart, and their models err apart); every call exact."""
    slow_compiled = {"native_map_entry": 1e-9, "native_map_mac": 1e-9, "native_map_lanes": KERNEL.map_lanes,
                     "native_pair_entry": 1e-9, "native_pair_mac": 1e-9}
    calibration = Calibration(**{**machine(int8_mac=1e-11, float32_mac=1e-10).as_dict(), **slow_compiled})
    lut = get_multiplier("drum_4").lut
    engine = LutEngine(lut, calibration=calibration)
    rng = np.random.default_rng(56)
    assert "compiled" in timed_routes(engine, lut, rng, caplog)


@needs_kernel
def test_auto_times_the_runner_up_gather_strategy(caplog):
    """The compiled kernel's gather strategies are modelled apart and their models err apart
    (measured: the permutes modelled faster than the tables at (73728, 25, 6) and ran 1.5x slower),
    so auto times the next gather modelled within the trial spread of the first too, though a
    low-rank plan is modelled far faster than both; not a gather beyond that spread."""
    figures = {"native_lookup": 1e-9, "native_table_entry": 1e-10, "native_row_add": 1.1e-8}
    calibration = Calibration(**{**machine(int8_mac=1e-11, float32_mac=1e-11, gather_lookup=1e-7).as_dict(),
                                 **figures})
    rng = np.random.default_rng(57)
    lut = low_rank_lut(2, seed=57)
    engine = LutEngine(lut, calibration=calibration)
    assert engine.gather_route(1, 300, 64, 40, torch.device("cpu"))[0] == "native gather"
    timed = timed_routes(engine, lut, rng, caplog)
    assert "native gather" in timed and "native tables" in timed and "torch gather" not in timed, timed
    assert "GEMMs" in timed  # a low-rank plan, modelled over twice as fast as the gathers


def test_int16_plan_needs_maps_below_2_15():
    """A form whose maps reach 2**15 has no int16 plan; the int16 plan's chunk keeps int32 sums."""
    cpu = torch.device("cpu")
    small = LowRankTable.of(np.full((256, 2), 300), np.full((256, 2), -200), 1)
    large = LowRankTable.of(np.full((256, 1), 2**15), np.full((256, 1), 3), 1)
    plan = next(p for p in candidate_plans(small, 1, 64, 100000, 64, cpu, PAIRS_FAST, compiled=True) if p.kind == "int16")
    assert plan.compiled and plan.k_chunk * small.term_bound < 2**31 < (plan.k_chunk + 1) * small.term_bound
    assert not any(p.kind == "int16" for p in candidate_plans(large, 1, 64, 64, 64, cpu, PAIRS_FAST, compiled=True))
    with pytest.raises(ValueError, match=r"below 2\*\*15 in magnitude, got 32768"):
        large.pair_words("cpu")


@needs_kernel
def test_engine_tables_route_is_exact_at_a_calibrated_budget():
    """The engine's tables route with pair tables (a LUT spanning less than 2**16, offset below zero)
    and the calibration's budget per tile of k, here a few k deep: exact across the tiles."""
    rng = np.random.default_rng(29)
    lut = rng.integers(-40000, -40000 + 2**16, (256, 256))
    tables_cheap = Calibration(**{**AMX_LIKE.as_dict(), "native_lookup": 1e-6, "native_table_entry": 1e-12,
                                  "native_row_add": 1e-12, "native_table_bytes": 3 * 8192})
    engine = LutEngine(lut, calibration=tables_cheap, trials=0)
    a, b = codes(rng, (45, 301)), codes(rng, (301, 19))
    assert engine.chosen_route(1, 45, 301, 19, "cpu") == "native tables"
    assert np.array_equal(lut_matmul(a, b, engine).numpy(), matmul_oracle(a, b, lut))
