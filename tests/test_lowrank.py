"""Exact low-rank LUT GEMMs against the float64 gather oracle over the LUT; routes chosen through
the engine's arguments (strategy, routes, an injected calibration)."""

import itertools
import types
import logging
import math

import numpy as np
import pytest
import torch

from approxrun.lut import exact_lut
from approxrun.multipliers import get_multiplier
from approxrun.ops import EngineRegistry, LutEngine, engine_for, lut_conv2d, lut_matmul
from approxrun.ops import lowrank, native
from approxrun.ops.trials import TRIAL_DROP_ROUNDS
from approxrun.ops.gradients import gradient_tables, grouped_lut_gemm_backward
from approxrun.ops.lowrank import Calibration, GemmPlan, calibration as calibration_module, measurement
from approxrun.ops.lowrank.calibration import GEMM_WIDTHS

INT8_EXACT = lowrank.int8_gemm_is_exact()


KERNELS = [None] + [kernel for kernel in [native.load()] if kernel is not None]  # torch ops; compiled


def matmul_oracle(a, b, lut):
    a_idx, b_idx = np.asarray(a) & 0xFF, np.asarray(b) & 0xFF
    return np.asarray(lut, dtype=np.float64)[a_idx[:, :, None], b_idx[None, :, :]].sum(1)


def conv_oracle(x, w, lut, stride, padding, dilation, groups, pad_value):
    """Direct loops over kernel offsets (no unfold), padded positions holding ``pad_value``."""
    lut = np.asarray(lut, dtype=np.float64)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=pad_value)
    batch, _, height, width = xp.shape
    out_channels, group_channels, kh, kw = w.shape
    ho = (height - dilation * (kh - 1) - 1) // stride + 1
    wo = (width - dilation * (kw - 1) - 1) // stride + 1
    per_group = out_channels // groups
    out = np.zeros((batch, out_channels, ho, wo))
    for g in range(groups):
        wg = w[g * per_group:(g + 1) * per_group] & 0xFF
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * group_channels:(g + 1) * group_channels,
                           i * dilation:i * dilation + stride * (ho - 1) + 1:stride,
                           j * dilation:j * dilation + stride * (wo - 1) + 1:stride] & 0xFF
                out[:, g * per_group:(g + 1) * per_group] += \
                    lut[patch[:, None], wg[None, :, :, i, j, None, None]].sum(2)
    return out


def low_rank_lut(rank: int, seed: int, signed=(True, True)) -> np.ndarray:
    """The exact product plus an asymmetric integer error of exact rank ``rank`` (entries in the
    thousands, like real approximate multipliers)."""
    rng = np.random.default_rng(seed)
    u, v = rng.integers(-40, 41, (256, rank)), rng.integers(-60, 61, (256, rank))
    return exact_lut(*signed) + u @ v.T


def codes(rng, shape, lo=-128, hi=128):
    return torch.as_tensor(rng.integers(lo, hi, shape))


def machine(int8_mac: float, float32_mac: float, gather_lookup: float = 1e-9) -> Calibration:
    """Injected calibration figures: seconds per multiply-add of int8 and float32 GEMMs at every
    width, and per gathered lookup (other primitives at plausible values)."""
    return Calibration(gather_lookup=gather_lookup, gather_row=5 * gather_lookup, gather_table=gather_lookup, direct_lookup=2 * gather_lookup,
                       gemm={"float32": [float32_mac] * len(GEMM_WIDTHS), "float64": [2 * float32_mac] * len(GEMM_WIDTHS),
                             "int8": [int8_mac] * len(GEMM_WIDTHS)},
                       map_entry=2e-10, word_index=4e-10, pair_index=6e-10, int8_call=1e-5, accumulate=1e-10,
                       int8_exact=INT8_EXACT)


AVX2_ONLY = machine(int8_mac=5e-10, float32_mac=3e-11)  # int8 GEMMs ~15x slower than float32 (issue 13)
AMX_LIKE = machine(int8_mac=1e-12, float32_mac=1e-11)  # int8 GEMMs nearly free
PLAN_LOG = {"int8": "int8 GEMMs", "int16": "compiled int16 map GEMM", "float32": "float32 GEMMs",
            "float64": "float64 GEMM"}
PAIRS_BUILT = native.load() is not None and native.load().map_pairs  # the compiled int16 plan (AVX2 / AVX-512 BW)
WITH_PAIRS = Calibration(**{**AMX_LIKE.as_dict(), "native_pair_entry": 1e-10, "native_pair_mac": 1e-11})


def forced(lut, kind: str, signed=(True, True)) -> LutEngine:
    """An engine that runs every GEMM on one low-rank plan kind (or a conv route; int16: the
    compiled kernel's, which needs the native route)."""
    if kind == "int8" and not INT8_EXACT:
        pytest.skip("torch's int8 GEMM is not exact here")
    if kind == "int16" and not PAIRS_BUILT:
        pytest.skip("the compiled int16 plan is not built here (needs AVX2 or AVX-512 BW)")
    lut = lut.lut if hasattr(lut, "lut") else lut
    routes = (kind, "native") if kind == "int16" else (kind,)
    return LutEngine(lut, *signed, strategy="lowrank", routes=routes, calibration=WITH_PAIRS)


@pytest.fixture
def lowrank_log(caplog):
    """The debug log of the route choices, to check that the low-rank path really ran."""
    with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
        yield caplog


@pytest.mark.parametrize("rank", range(1, 9))
def test_random_low_rank_lut_is_factored_exactly(rank):
    lut = low_rank_lut(rank, seed=rank)
    table = LutEngine(lut).lowrank
    assert table is not None and table.rank == rank and table.exact_part == (True, True)
    x, y = table.x.astype(object), table.y.astype(object)
    assert np.array_equal(x.dot(y.T), lut.astype(object) * table.denominator)


@pytest.mark.parametrize("kind", ["int8", "int16", "float32", "float64"])
@pytest.mark.parametrize("rank", range(1, 9))
def test_every_plan_matches_oracle_for_asymmetric_ranks(rank, kind, lowrank_log):
    rng = np.random.default_rng(100 + rank)
    lut = low_rank_lut(rank, seed=rank)
    engine = forced(lut, kind)
    ran = False
    for m, k, n in ((23, 115, 15), (1, 23, 1), (40, 64, 7)):
        a, b = codes(rng, (m, k)), codes(rng, (k, n))
        ran |= engine.plan(1, m, k, n, torch.device("cpu"))[0] is not None
        out = lut_matmul(a, b, engine)
        assert out.dtype == torch.int64
        assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))
    exists = {"int8": engine.lowrank.int8 is not None, "float32": engine.lowrank.term_bound < 2**24,
              "int16": any(f.map_bound < 2**15 and f.term_bound < 2**31 for f in engine.lowrank.forms),
              "float64": True}  # rational factors of ranks >= 3 are too large for int8 or float32 maps
    assert ran == exists[kind] and (PLAN_LOG[kind] in lowrank_log.text) == exists[kind]
    assert rank > 2 or exists[kind]


@pytest.mark.parametrize("kind", ["int8", "int16", "float32", "float64"])
@pytest.mark.parametrize("rank, signed", [(1, (True, True)), (2, (False, False)), (2, (True, False))])
def test_large_k_matches_oracle(kind, rank, signed, lowrank_log):
    """K = 4100: sums reach far beyond 2**24, so one float32 GEMM could not be exact."""
    rng = np.random.default_rng(7)
    lut = low_rank_lut(rank, seed=20 + rank, signed=signed)
    k = 4100
    assert k * np.abs(lut).max() >= 2**24
    lo_a, hi_a = (-128, 128) if signed[0] else (0, 256)
    lo_b, hi_b = (-128, 128) if signed[1] else (0, 256)
    a, b = codes(rng, (23, k), lo_a, hi_a), codes(rng, (k, 9), lo_b, hi_b)
    out = lut_matmul(a, b, forced(lut, kind, signed))
    assert PLAN_LOG[kind] in lowrank_log.text
    assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))


@pytest.mark.parametrize("rank", [3, 8])
def test_large_k_rational_factors_match_oracle(rank, lowrank_log):
    """Random errors of rank >= 3 factor with rational coefficients: the float64 path rounds."""
    rng = np.random.default_rng(8)
    lut = low_rank_lut(rank, seed=20 + rank)
    engine = forced(lut, "float64")
    assert engine.lowrank.denominator > 1
    a, b = codes(rng, (23, 4100)), codes(rng, (4100, 9))
    out = lut_matmul(a, b, engine)
    assert "float64 GEMM" in lowrank_log.text
    assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))


def test_plans_keep_every_partial_sum_exact():
    drum = LutEngine(get_multiplier("drum_4").lut).lowrank
    plans = {p.kind: p for p in lowrank.candidate_plans(drum, 1, 64, 4096, 64, torch.device("cpu"), AMX_LIKE)}
    float32 = plans["float32"]
    assert float32.k_chunk * float32.form.term_bound < 2**24 and float32.k_chunk < 4096
    assert plans["float64"].k_chunk == 4096
    if INT8_EXACT:
        assert plans["int8"].k_chunk * drum.int8.bound < 2**31
    rational = LutEngine(low_rank_lut(5, seed=5)).lowrank
    assert rational.denominator > 1  # random factors are rational: the digits hold D * lut
    assert lowrank.candidate_plans(rational, 1, 64, 4096, 64, torch.device("cpu"), AMX_LIKE)


@pytest.mark.parametrize("name, signed, width", [("drum_4", True, 1), ("drum_4", False, 1),
                                                 ("perforated_0_2", True, 1), ("bam_2_6", True, 6)])
@pytest.mark.parametrize("kind", ["float32", "float64"])
def test_float_plans_run_the_narrowest_form(name, signed, width, kind, lowrank_log):
    """Where the whole table has a lower rank than exact product + error (DRUM: u(a) u(b), rank 1,
    against width 3), float plans multiply the whole table's maps, exactly, its denominator included."""
    multiplier = get_multiplier(name, signed)
    engine = forced(multiplier, kind, (signed, signed))
    assert engine.lowrank.width > width
    plan = next(p for p in lowrank.candidate_plans(engine.lowrank, 1, 37, 1030, 29, torch.device("cpu"), AMX_LIKE)
                if p.kind == kind)
    assert plan.form.width == width and plan.form.exact_part is None
    rng = np.random.default_rng(15)
    lo, hi = (-128, 128) if signed else (0, 256)
    a, b = codes(rng, (37, 1030), lo, hi), codes(rng, (1030, 29), lo, hi)
    assert np.array_equal(lut_matmul(a, b, engine).numpy(), matmul_oracle(a, b, multiplier.lut))
    assert f"{width} map columns" in lowrank_log.text


@pytest.mark.parametrize("name, signed, width, code_gemm", [
    ("drum_4", True, 4, False),  # the whole LUT is rank 1, u(a) u(b), split into int8 columns
    ("drum_4", False, 4, False), ("bam_2_6", True, 8, False),
    ("truncated_4", True, 4, True),  # exact product from the codes themselves, 4 error columns
    ("exact", False, 4, False)])  # unsigned operands: centred columns and an offset
def test_int8_maps_reproduce_the_table(name, signed, width, code_gemm):
    multiplier = get_multiplier(name, signed)
    maps = multiplier.engine.lowrank.int8
    assert maps.x.dtype == maps.y.dtype == np.int8 and maps.width == width
    assert bool(maps.code_scale) == code_gemm
    values = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int64)  # a byte read as int8
    total = (maps.x.astype(np.int64) @ maps.y.T.astype(np.int64) + maps.offset[None, :]
             + maps.code_scale * np.outer(values, values))
    assert np.array_equal(total, multiplier.lut * maps.denominator)
    assert maps.bound == (np.abs(maps.x.astype(np.int64)) @ np.abs(maps.y.T.astype(np.int64))).max()


@pytest.mark.parametrize("name, signed", [("drum_4", True), ("truncated_4", True), ("kulkarni", False),
                                          ("exact", False), ("bam_2_6", True)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.int64])
def test_int8_plan_matches_oracle_for_code_dtypes_and_chunks(name, signed, dtype, lowrank_log):
    """int8/uint8 codes with an even K gather byte pairs; other dtypes and odd K one code at a
    time; explicit plans with short K chunks sum several int8 GEMMs; the compiled one-call plan
    (where it builds) and the torch ops alike; width-8 maps (bam_2_6)."""
    multiplier = get_multiplier(name, signed)
    engine = forced(multiplier, "int8", (signed, signed))
    rng = np.random.default_rng(14)
    lo, hi = (-128, 128) if signed else (0, 256)
    dtype = torch.uint8 if dtype == torch.int8 and not signed else dtype
    for m, k, n in ((37, 150, 16), (23, 151, 5), (1, 2, 1), (9, 7, 1), (64, 700, 3)):
        a, b = codes(rng, (m, k), lo, hi), codes(rng, (k, n), lo, hi)
        expected = matmul_oracle(a, b, multiplier.lut)
        out = lut_matmul(a.to(dtype), b.to(dtype), engine)
        transposed = lut_matmul(a.to(dtype), b.to(dtype).t().contiguous().t(), engine)
        assert np.array_equal(out.numpy(), expected), (m, k, n)
        assert np.array_equal(transposed.numpy(), expected)
        for chunk, kernel in itertools.product((1, 3, 64), KERNELS):
            chunked = lowrank.lowrank_gemm(a.to(dtype)[None], b.to(dtype)[None], engine.lowrank,
                                           GemmPlan("int8", min(chunk, k), 0.0), kernel)
            assert np.array_equal(chunked[0].numpy(), expected), (m, k, n, chunk, kernel)
    assert "int8 GEMMs" in lowrank_log.text


def test_no_exact_plan_falls_back_to_gather():
    """Errors near 2**30 with rational factors: no integer digits, and for K = 4096 the float64
    rounding bound fails; for K = 256 it holds."""
    rng = np.random.default_rng(4)
    lut = exact_lut() + rng.integers(-2**14, 2**14, (256, 3)) @ rng.integers(-2**14, 2**14, (256, 3)).T
    engine = LutEngine(lut, strategy="lowrank", calibration=AMX_LIKE)
    assert engine.lowrank.rank == 3 and engine.lowrank.int8 is None
    cpu = torch.device("cpu")
    assert engine.plan(1, 3, 4096, 2, cpu)[0] is None
    assert engine.plan(1, 3, 256, 2, cpu)[0].kind == "float64"
    a, b = codes(rng, (3, 4096)), codes(rng, (4096, 2))
    assert np.array_equal(lut_matmul(a, b, engine).numpy(), matmul_oracle(a, b, lut))
    assert np.array_equal(lut_matmul(a[:, :256], b[:256], engine).numpy(), matmul_oracle(a[:, :256], b[:256], lut))


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("stride, padding, dilation, groups, pad_value", [
    (1, 1, 1, 1, -3), (2, 2, 2, 2, 5), (1, 0, 1, 1, 0)])
def test_conv_matches_oracle(rank, stride, padding, dilation, groups, pad_value, lowrank_log):
    rng = np.random.default_rng(rank * 10 + groups)
    lut = low_rank_lut(rank, seed=30 + rank)
    x, w = codes(rng, (2, 6, 9, 11)), codes(rng, (4, 6 // groups, 3, 2))
    engine = LutEngine(lut, strategy="lowrank", calibration=AVX2_ONLY)
    out = lut_conv2d(x, w, engine, stride, padding, dilation, groups, pad_value=pad_value)
    expected = conv_oracle(x.numpy(), w.numpy(), lut, stride, padding, dilation, groups, pad_value)
    assert f"low rank {rank}," in lowrank_log.text
    assert np.array_equal(out.numpy(), expected)


@pytest.mark.parametrize("kind", ["int8", "int16", "float32", "float64"])
def test_conv_unfolded_plans_match_oracle(kind, lowrank_log):
    """Every GEMM plan inside a convolution (unfolded rows: the maps-first routes are off)."""
    rng = np.random.default_rng(13)
    lut = get_multiplier("drum_4", signed=False).lut
    x, w = codes(rng, (2, 4, 9, 8), 0, 256), codes(rng, (6, 2, 3, 3), 0, 256)
    out = lut_conv2d(x, w, forced(lut, kind, (False, False)), stride=2, padding=2, groups=2, pad_value=200)
    assert PLAN_LOG[kind] in lowrank_log.text
    assert np.array_equal(out.numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 2, 2, 1, 2, 200))


CONV_ROUTES = {"map": ("map_conv",), "int8": ("int8",), "unfold": ("float32",)}
ROUTE_LOG = {"map": "map-then-conv", "int8": "int8 im2col"}


@pytest.mark.parametrize("route", ["map", "int8", "unfold"])
@pytest.mark.parametrize("name, signed", [("drum_4", True), ("kulkarni", False), ("truncated_4", True)])
@pytest.mark.parametrize("stride, padding, dilation, groups, pad_value", [
    (1, 2, 1, 1, -3), (2, 1, 2, 2, 5), (1, 1, 1, 6, 0)])
def test_conv_routes_match_oracle(route, name, signed, stride, padding, dilation, groups, pad_value, lowrank_log):
    if route == "int8" and not INT8_EXACT:
        pytest.skip("torch's int8 GEMM is not exact here")
    rng = np.random.default_rng(15)
    multiplier = get_multiplier(name, signed)
    engine = LutEngine(multiplier.lut, signed, signed, strategy="lowrank", routes=CONV_ROUTES[route],
                       calibration=AMX_LIKE)
    lo, hi = (-128, 128) if signed else (0, 256)
    pad_value = pad_value & 0xFF if not signed else pad_value
    x, w = codes(rng, (3, 6, 11, 9), lo, hi), codes(rng, (12, 6 // groups, 3, 2), lo, hi)
    expected = conv_oracle(x.numpy(), w.numpy(), multiplier.lut, stride, padding, dilation, groups, pad_value)
    for dtype in (torch.float32, torch.int64):
        out = lut_conv2d(x.to(dtype), w.to(dtype), engine, stride, padding, dilation, groups, pad_value=pad_value)
        assert np.array_equal(out.numpy(), expected)
    code_gemm = engine.lowrank.int8.code_scale != 0  # not an int8 conv: unfold instead
    for taken, text in ROUTE_LOG.items():
        assert (text in lowrank_log.text) == (taken == route and not (route == "int8" and code_gemm))


def test_auto_conv_counts_the_unfold_against_map_then_conv(lowrank_log):
    """Auto's map-then-conv or unfolded convolution follows the injected figures, the unfold of the
    window rows counted on the unfolded side (LeNet5's second layer at batch 32, measured: its GEMM
    0.08 ms, the whole unfolded convolution 0.25 ms, map-then-conv 0.19 ms)."""
    rng = np.random.default_rng(17)
    multiplier = get_multiplier("drum_4")
    x, w = codes(rng, (4, 6, 12, 12)), codes(rng, (16, 6, 5, 5))
    expected = conv_oracle(x.numpy(), w.numpy(), multiplier.lut, 1, 0, 1, 1, 0)
    slow_maps = {**AMX_LIKE.as_dict(), "map_entry": 1e-6}  # map-then-conv modelled slower than any GEMM
    for unfold_entry, maps_taken in ((0.0, False), (1e-3, True)):
        calibration = Calibration(**{**slow_maps, "unfold_entry": unfold_entry})
        engine = LutEngine(multiplier.lut, routes=("map_conv", "float32"), calibration=calibration, trials=1)
        lowrank_log.clear()
        out = lut_conv2d(x.float(), w.float(), engine)
        assert np.array_equal(out.numpy(), expected)
        assert ("map-then-conv" in lowrank_log.text) == maps_taken


def test_map_conv_refuses_unproven_cases(monkeypatch, lowrank_log):
    """Sums that could reach 2**24, or a conv backend that might use Winograd/FFT: no map-then-conv,
    and the int8 route gives the same exact result."""
    if not INT8_EXACT:
        pytest.skip("torch's int8 GEMM is not exact here")
    rng = np.random.default_rng(16)
    multiplier = get_multiplier("drum_4")
    engine = LutEngine(multiplier.lut, strategy="lowrank", routes=("map_conv", "int8"), calibration=AMX_LIKE)
    x, w = codes(rng, (2, 100, 6, 6)), codes(rng, (3, 100, 3, 3))
    assert 100 * 9 * engine.lowrank.conv_maps.bound >= 2**24
    expected = conv_oracle(x.numpy(), w.numpy(), multiplier.lut, 1, 1, 1, 1, 4)

    def routes_taken(*args):
        lowrank_log.clear()
        out = lut_conv2d(*args, engine, padding=1, pad_value=4)
        return out, [r for r, text in ROUTE_LOG.items() if text in lowrank_log.text]

    out, taken = routes_taken(x, w)
    assert np.array_equal(out.numpy(), expected) and taken == ["int8"]
    small_x, small_w = x[:, :4], w[:, :4]
    assert routes_taken(small_x, small_w)[1] == ["map"]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # float32 products may round through bfloat16
    try:
        assert routes_taken(small_x, small_w)[1] == ["int8"]
    finally:
        torch.set_float32_matmul_precision(precision)
    monkeypatch.setattr(torch._C, "_select_conv_backend", lambda *args: "_ConvBackend.NnpackSpatial")
    out, taken = routes_taken(small_x, small_w)
    assert taken == ["int8"]
    assert np.array_equal(out.numpy(), conv_oracle(small_x.numpy(), small_w.numpy(), multiplier.lut, 1, 1, 1, 1, 4))


@pytest.mark.parametrize("strategy", ["lowrank", "auto"])
def test_depthwise_conv_matches_oracle(strategy, lowrank_log):
    rng = np.random.default_rng(11)
    lut = get_multiplier("drum_4").lut
    x, w = codes(rng, (2, 5, 7, 7)), codes(rng, (5, 1, 3, 3))
    out = lut_conv2d(x, w, LutEngine(lut, strategy=strategy, calibration=AVX2_ONLY), padding=1, groups=5,
                     pad_value=-7)
    assert strategy == "auto" or "G=5 M=98 K=9 N=1" in lowrank_log.text
    assert np.array_equal(out.numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 1, 1, 1, 5, -7))


@pytest.mark.parametrize("name, rank", [("drum_4", 2), ("drum_6", 2), ("truncated_2", 2),
                                        ("truncated_4", 4), ("kulkarni", 1), ("roba", 1),
                                        ("perforated_0_2", 1), ("exact", 0)])
@pytest.mark.parametrize("signed", [True, False])
def test_builtin_design_ranks(name, rank, signed):
    multiplier = get_multiplier(name, signed)
    table = multiplier.engine.lowrank
    assert table.rank == rank and table.exact_part == (signed, signed)
    assert table.denominator == 1  # integer factors: the float32 path applies
    error = table.x[:, 1:].astype(object).dot(table.y[:, 1:].T.astype(object))
    assert np.array_equal(error, multiplier.error_table.astype(np.int64))


def test_mitchell_is_high_rank_and_falls_back():
    mitchell = get_multiplier("mitchell")
    assert mitchell.engine.lowrank is None
    assert lowrank.modular_rank(mitchell.error_table.astype(np.int64)) > lowrank.MAX_FACTOR_RANK


def test_full_rank_lut_falls_back_to_gather(lowrank_log):
    rng = np.random.default_rng(5)
    lut = rng.integers(-2000, 2000, (256, 256))
    a, b = codes(rng, (23, 40)), codes(rng, (40, 7))
    for strategy in ("auto", "lowrank"):
        engine = LutEngine(lut, strategy=strategy, calibration=AMX_LIKE)
        assert engine.lowrank is None
        assert np.array_equal(lut_matmul(a, b, engine).numpy(), matmul_oracle(a, b, lut))
    assert "low rank" not in lowrank_log.text


def test_router_follows_injected_calibration():
    """The same table and shape: an int8-slow machine (AVX2 only) picks float32 low rank, an
    AMX-like one int8; a machine whose lookups are nearly free keeps the gather."""
    cpu = torch.device("cpu")
    shapes = ((8192, 150, 16), (4096, 576, 64), (4096, 1152, 128))
    avx2 = LutEngine(get_multiplier("drum_4").lut, calibration=AVX2_ONLY)
    for m, k, n in shapes:
        assert avx2.plan(1, m, k, n, cpu)[0].kind == "float32"
    if INT8_EXACT:
        amx = LutEngine(get_multiplier("drum_4").lut, calibration=AMX_LIKE)
        assert amx.plan(1, 4096, 1152, 128, cpu)[0].kind == "int8"
    free_lookups = LutEngine(get_multiplier("drum_4").lut, calibration=machine(5e-10, 3e-11, gather_lookup=1e-15))
    assert free_lookups.plan(1, 4096, 576, 64, cpu)[0] is None
    biased = LutEngine(get_multiplier("drum_4").lut, calibration=AVX2_ONLY, lookup_cost=1e-9)
    assert biased.plan(1, 4096, 576, 64, cpu)[0] is None  # lookup_cost scales the gather's time
    gather = LutEngine(get_multiplier("drum_4").lut, strategy="gather", calibration=AMX_LIKE)
    assert gather.plan(1, 4096, 576, 64, cpu) == (None, "gather (strategy)")
    if native.load() is not None:  # cheap compiled row adds beat low rank where N is small
        tables = Calibration(**{**AMX_LIKE.as_dict(), "native_lookup": 1e-9, "native_table_entry": 1e-10,
                                "native_row_add": 1e-11})
        engine = LutEngine(get_multiplier("drum_4").lut, calibration=tables, trials=0)
        assert engine.chosen_route(1, 73728, 25, 6, cpu) == "native tables"
        if INT8_EXACT:  # torch's int8 GEMM saturates without VNNI: then no int8 plan is exact
            assert engine.chosen_route(1, 4096, 1152, 128, cpu).startswith("int8")
        without_native = LutEngine(get_multiplier("drum_4").lut, calibration=tables, native=False)
        assert without_native.chosen_route(1, 73728, 25, 6, cpu).startswith(("int8", "float32"))  # low rank


def test_auto_times_close_routes_then_keeps_the_fastest(lowrank_log):
    """Under auto the first calls of a shape run the candidate routes (each exact), then the fastest
    measured one stays; trials=0, or a shape modelled under TRIAL_MIN_SECONDS, keeps the model's
    choice untimed."""
    rng = np.random.default_rng(17)
    lut = get_multiplier("drum_4").lut
    a, b = codes(rng, (300, 64)), codes(rng, (64, 40))
    even = machine(int8_mac=1e-9, float32_mac=1e-9, gather_lookup=1e-8)  # routes modelled close, over 2 ms
    engine = LutEngine(lut, calibration=even)
    assert not engine.timing  # no shape seen yet
    calls = 0
    while calls == 0 or engine.timing_routes(1, 300, 64, 40):
        assert np.array_equal(lut_matmul(a, b, engine).numpy(), matmul_oracle(a, b, lut))
        assert engine.timing == engine.timing_routes(1, 300, 64, 40)
        calls += 1
    assert calls >= 2 * TRIAL_DROP_ROUNDS * 2  # two routes at least, each warmed and timed per turn
    assert not engine.timing
    assert np.array_equal(lut_matmul(a, b, engine).numpy(), matmul_oracle(a, b, lut))
    measured = [line for line in lowrank_log.text.splitlines() if "lut gemm: measured" in line]
    assert len(measured) == 1 and measured[0].count(" ms for ") == 1 and "GEMM" in measured[0]
    lowrank_log.clear()
    model_only = LutEngine(lut, calibration=even, trials=0)
    lut_matmul(a, b, model_only)
    assert "measured" not in lowrank_log.text and "shape G=1 M=300 K=64 N=40" in lowrank_log.text
    lowrank_log.clear()
    quick = LutEngine(lut, calibration=machine(int8_mac=1e-12, float32_mac=1e-12, gather_lookup=1e-11))
    for _ in range(10):
        lut_matmul(a, b, quick)
    assert "measured" not in lowrank_log.text


def test_engine_settings_are_checked():
    with pytest.raises(ValueError, match="strategy"):
        LutEngine(exact_lut(), strategy="fast")
    with pytest.raises(ValueError, match="lookup_cost"):
        LutEngine(exact_lut(), lookup_cost=0)
    with pytest.raises(ValueError, match="routes"):
        LutEngine(exact_lut(), routes=("int4",))
    with pytest.raises(ValueError, match="256x256"):
        LutEngine(np.zeros((16, 16)))


def test_raw_tensor_lut_is_analysed_once_across_calls():
    """A notebook's 256x256 tensor: one engine (one factorization, one plan per shape) however often
    it is passed; an in-place change or another object of other content gets another engine."""
    registry = EngineRegistry()
    rng = np.random.default_rng(3)
    tensor = torch.tensor(get_multiplier("drum_4").lut, dtype=torch.float64)
    a, b = codes(rng, (40, 64)), codes(rng, (64, 9))
    first = engine_for(tensor, engines=registry)
    first.configure(calibration=AVX2_ONLY)
    table = first.lowrank
    for _ in range(3):
        assert np.array_equal(lut_matmul(a, b, tensor, engines=registry).numpy(), matmul_oracle(a, b, tensor))
    assert engine_for(tensor, engines=registry) is first and first.lowrank is table and len(registry) == 1
    assert engine_for(tensor.clone(), engines=registry) is first  # same content
    assert engine_for(tensor.numpy().astype(np.int64), engines=registry) is first
    tensor.copy_(torch.as_tensor(exact_lut(), dtype=torch.float64))  # in-place change: new version
    assert engine_for(tensor, engines=registry).lowrank.rank == 0 and len(registry) == 2
    multiplier = get_multiplier("drum_6")
    assert engine_for(multiplier, engines=registry) is multiplier.engine and len(registry) == 2


@pytest.mark.parametrize("name", ["drum_4", "truncated_4"])
def test_lut_gradients_match_gather_backward(name):
    multiplier = get_multiplier(name)
    da, db = gradient_tables(multiplier.lut, True, True)
    engine = LutEngine(multiplier.lut, calibration=AVX2_ONLY)
    for table, factors in zip((da, db), engine.gradient_lowrank):
        x, y = factors.x.astype(object), factors.y.astype(object)
        assert np.allclose(x.dot(y.T).astype(float) / factors.denominator, table, rtol=1e-14, atol=0)
    rng = np.random.default_rng(8)
    a_codes, b_codes = codes(rng, (19, 45)).double(), codes(rng, (45, 7)).double()
    grad_out = torch.as_tensor(rng.standard_normal((19, 7)))
    results = {}
    for strategy in ("gather", "lowrank"):
        a, b = a_codes.clone().requires_grad_(), b_codes.clone().requires_grad_()
        out = lut_matmul(a, b, engine.configure(strategy), grad="lut")
        out.backward(grad_out)
        results[strategy] = (out.detach(), a.grad, b.grad)
    (out_g, grad_a_g, grad_b_g), (out_l, grad_a_l, grad_b_l) = results["gather"], results["lowrank"]
    assert torch.equal(out_g, out_l)
    torch.testing.assert_close(grad_a_l, grad_a_g, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(grad_b_l, grad_b_g, rtol=1e-12, atol=1e-9)
    assert not torch.equal(grad_a_g, grad_out @ b_codes.T)  # the LUT gradient differs from the STE one


@pytest.mark.parametrize("name", ["drum_4", "truncated_4", "constant"])  # factor widths 1, 5 and 0
def test_blocked_lowrank_backward_matches_the_gradient_table_gathers(name):
    """The low-rank backward over many row blocks, two groups, signed codes held in floats, and
    each gradient alone, against the gathers over the full gradient tables."""
    engine = LutEngine(np.full((256, 256), 7)) if name == "constant" else get_multiplier(name).engine
    rng = np.random.default_rng(9)
    a, b = codes(rng, (2, 37, 11)).double(), codes(rng, (2, 11, 5)).double()
    grad_out = torch.as_tensor(rng.standard_normal((2, 37, 5)))
    indices = (grad_out, a.long() & 255, b.long() & 255, *engine.gradient_tensors("cpu"))
    expected = grouped_lut_gemm_backward(*indices)
    for needs in ((True, True), (True, False), (False, True)):
        got = lowrank.lowrank_backward(grad_out, a, b, *engine.gradient_lowrank, needs, block_elements=40)
        gathered = grouped_lut_gemm_backward(*indices, needs)
        for wanted, result, alone, reference in zip(needs, got, gathered, expected):
            if wanted:
                torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-9)
                assert torch.equal(alone, reference)
            else:
                assert result is None and alone is None


def _gradient_oracle(grad_out, a, b, da, db):
    """float64 gathers over the full gradient tables (numpy): [G, M, K, N] entries, then sums."""
    a_idx, b_idx = a.long().numpy() & 255, b.long().numpy() & 255
    g = grad_out.double().numpy()[:, :, None, :]  # [G, M, 1, N]
    picked_a = da.numpy()[a_idx[..., None], b_idx[:, None, :, :]]  # [G, M, K, N]
    picked_b = db.numpy()[a_idx[..., None], b_idx[:, None, :, :]]
    return (g * picked_a).sum(-1), (g * picked_b).sum(1)


@pytest.mark.skipif(native.load() is None, reason="needs a C++ toolchain")
@pytest.mark.parametrize("shape", [(3, 37, 11, 5), (1, 300, 3, 70)], ids=["groups", "row-blocks"])
def test_compiled_lut_backward_matches_an_oracle(shape):
    """The compiled LUT-gradient backward against float64 gathers over asymmetric random gradient
    tables, for codes held in floats and int16 codes, each gradient alone and both."""
    groups, m, k, n = shape
    rng = np.random.default_rng(10)
    da, db = (torch.as_tensor(rng.standard_normal((256, 256)) * 100) for _ in range(2))
    grad_out = torch.as_tensor(rng.standard_normal((groups, m, n)), dtype=torch.float32)
    for dtype in (torch.float32, torch.int16):
        a, b = codes(rng, (groups, m, k)).to(dtype), codes(rng, (groups, k, n)).to(dtype)
        expected = _gradient_oracle(grad_out, a, b, da, db)
        for needs in ((True, True), (True, False), (False, True)):
            got = native.load().lut_backward(grad_out, a, b, da, db, needs)
            for wanted, result, reference in zip(needs, got, expected):
                if wanted:
                    np.testing.assert_allclose(result.numpy(), reference, rtol=1e-10, atol=1e-9)
                else:
                    assert result is None


@pytest.mark.skipif(native.load() is None, reason="needs a C++ toolchain")
def test_backward_route_follows_the_calibration(caplog):
    """A LUT-gradient backward takes the low-rank GEMMs or the compiled table reads, whichever the
    injected figures make cheaper; both give the same gradients."""
    lut = get_multiplier("drum_4").lut
    rng = np.random.default_rng(11)
    a_codes, b_codes = codes(rng, (40, 30)).double(), codes(rng, (30, 6)).double()
    grads = {}
    for route, figures in (("low rank", {"native_backward": 1e-6, "lowrank_backward_entry": 1e-12}),
                           ("compiled", {"native_backward": 1e-12, "lowrank_backward_entry": 1e-6})):
        engine = LutEngine(lut, calibration=Calibration(**{**AVX2_ONLY.as_dict(), **figures}))
        a, b = a_codes.clone().requires_grad_(), b_codes.clone().requires_grad_()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
            lut_matmul(a, b, engine, grad="lut").sum().backward()
        assert f"lut backward: {route}" in caplog.text
        grads[route] = (a.grad, b.grad)
    for low_rank, compiled in zip(grads["low rank"], grads["compiled"]):
        torch.testing.assert_close(low_rank, compiled, rtol=1e-12, atol=1e-9)


@pytest.mark.skipif(native.load() is None, reason="needs a C++ toolchain")
def test_backward_route_counts_only_the_wanted_gradients(caplog):
    """With one gradient wanted (a network's first layer: grad_b only) the route follows that
    gradient's figures: compiled table reads cheap for both gradients but dear for grad_b alone give
    low rank there, and the compiled reads where both are wanted."""
    lut = get_multiplier("drum_4").lut
    rng = np.random.default_rng(12)
    a_codes, b_codes = codes(rng, (40, 30)).double(), codes(rng, (30, 6)).double()
    figures = {"native_backward": 1e-12, "native_backward_a": 1e-12, "native_backward_b": 1e-6,
               "lowrank_backward_entry": 1e-9}
    engine = LutEngine(lut, calibration=Calibration(**{**AVX2_ONLY.as_dict(), **figures}))
    for a_wanted, route in ((True, "compiled"), (False, "low rank")):
        a, b = a_codes.clone().requires_grad_(a_wanted), b_codes.clone().requires_grad_()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
            lut_matmul(a, b, engine, grad="lut").sum().backward()
        assert f"lut backward: {route}" in caplog.text
        assert (a.grad is not None) == a_wanted and b.grad is not None


def test_calibration_is_measured_once_per_machine_key(tmp_path):
    """Measured figures are positive and cached under the machine key; a cached file is reused, unless
    it was measured on a busy machine and the machine is quiet now."""
    busy = measurement.load_or_measure(tmp_path, load_average=1e6)  # measured on a busy machine
    assert busy.measured_busy and measurement.load_or_measure(tmp_path, load_average=1e6) == busy
    first = measurement.load_or_measure(tmp_path, load_average=0.0)  # quiet now: measured again
    assert not first.measured_busy
    assert first.machine == calibration_module.machine_key()
    assert all(v > 0 for v in (first.gather_lookup + first.gather_row + first.gather_table, first.direct_lookup,
                               first.map_entry, first.word_index, first.accumulate, first.unfold_entry))
    assert all(math.isfinite(v) and v > 0 for v in first.gemm["float32"] + first.gemm["float64"])
    assert {"torch", "float32", "float64"} <= set(first.call_overhead)  # fixed costs of every family here
    # the int8 plan's cost beyond its GEMM call (modelled apart as int8_call) is clamped at 0 and can be 0
    assert all(math.isfinite(v) and (v > 0 or (route == "int8" and v == 0)) for route, v in first.call_overhead.items())
    if native.load() is not None:
        assert math.isfinite(first.native_map_mac) and first.native_map_lanes in (8, 16)
        assert first.map_gemm_time(1, 64, 64, 9, 1) > first.map_gemm_time(1, 64, 64, 8, 1) > first.overhead("compiled")
    files = list(tmp_path.glob("calibration-*.json"))
    assert len(files) == 1
    assert measurement.load_or_measure(tmp_path, load_average=1e6) == first  # quiet figures stay
    assert 0 < first.gemm_mac("float32", 20) and first.gemm_mac("float32", 1) == first.gemm["float32"][0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [2, 6])
def test_cuda_lowrank_matches_oracle(rank):
    rng = np.random.default_rng(9)
    lut = low_rank_lut(rank, seed=40 + rank)
    a, b = codes(rng, (37, 4100)), codes(rng, (4100, 21))
    x, w = codes(rng, (2, 4, 8, 8)), codes(rng, (6, 2, 3, 3))
    engine = LutEngine(lut, strategy="lowrank")
    out = lut_matmul(a.cuda(), b.cuda(), engine)
    conv = lut_conv2d(x.cuda(), w.cuda(), engine, padding=1, groups=2, pad_value=3)
    assert np.array_equal(out.cpu().numpy(), matmul_oracle(a, b, lut))
    assert np.array_equal(conv.cpu().numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 1, 1, 1, 2, 3))


@pytest.mark.parametrize("low, high, k", [(-2**15, 2**15, 300), (-2**30, 2**30, 40)])
def test_native_gather_matches_oracle(low, high, k, lowrank_log):
    """The compiled CPU kernel (int32 sums, or int64 when K * max|lut| could pass 2**31), on int8,
    int32 and float codes, int64 codes beyond the byte range (only their byte counts), several groups;
    N of one tile of table columns and of two (the tables' storage reused across tiles); M below and
    beyond the rows the tables strategy adds at a time, with every remainder."""
    from approxrun.ops import native
    if native.load() is None:
        pytest.skip("no C++ toolchain to build the CPU LUT kernel")
    rng = np.random.default_rng(21)
    lut = rng.integers(low, high, (256, 256))
    for figures, route in ((("native_lookup",), "native gather"), (("native_table_entry", "native_row_add"),
                                                                   "native tables")):
        fast_native = Calibration(**{**AVX2_ONLY.as_dict(), **dict.fromkeys(figures, 1e-15)})
        engine = LutEngine(lut, strategy="gather", calibration=fast_native)
        for dtype, m, n in ((torch.int8, 37, 19), (torch.int32, 37, 19), (torch.float32, 37, 19),
                            (torch.int32, 37, 70), (torch.int32, 3, 6), (torch.int32, 42, 6)):
            a, b = codes(rng, (m, k)), codes(rng, (k, n))
            out = lut_matmul(a.to(dtype), b.to(dtype), engine)
            assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut)), (dtype, m, n)
        wide_a, wide_b = a + 256 * codes(rng, a.shape, -2**40, 2**40), b + 256 * codes(rng, b.shape, -2**20, 2**20)
        assert np.array_equal(lut_matmul(wide_a, wide_b.int(), engine).numpy(), matmul_oracle(a, b, lut))
        x, w = codes(rng, (2, 4, 6, 6)), codes(rng, (6, 2, 3, 3))
        out = lut_conv2d(x, w, engine, padding=1, groups=2, pad_value=9)
        assert np.array_equal(out.numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 1, 1, 1, 2, 9))
        assert engine.chosen_route(2, 72, 18, 3, "cpu") == route  # each strategy modelled fastest in turn


@pytest.mark.parametrize("code_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32])
def test_map_gathers_agree(code_dtype):
    """The compiled one-pass gather and torch's give table[byte(codes)] for every code dtype, codes
    beyond the byte range, and rows of 1, 2, 3 and 4 words (int8 words, int64 offsets, float maps)."""
    if len(KERNELS) == 1:
        pytest.skip("no C++ toolchain to build the CPU LUT kernel")
    rng = np.random.default_rng(30)
    wide = np.iinfo(np.int64 if code_dtype == torch.int64 else np.int32).max // 512
    raw = codes(rng, (7, 5, 3), -wide, wide) if code_dtype in (torch.int32, torch.int64) else codes(rng, (7, 5, 3))
    values = raw.to(code_dtype) if code_dtype != torch.uint8 else (raw & 255).to(torch.uint8)
    tables = [torch.as_tensor(rng.integers(-2**31, 2**31, 256), dtype=torch.int32),
              torch.as_tensor(rng.integers(-2**62, 2**62, 256)), torch.randn(256, 3), torch.randn(256, 2).double()]
    for table in tables:
        expected = table[(raw & 255).long()]
        for kernel in KERNELS:
            gather = lowrank.torch_gather_rows if kernel is None else kernel.gather_rows
            assert torch.equal(gather(values, table), expected)
            out = torch.empty(expected.numel() + 3, dtype=table.dtype)
            assert torch.equal(gather(values, table, out=out[:expected.numel()]), expected)


@pytest.mark.parametrize("code_scale", [0, 2])
def test_int8_plan_divides_by_its_denominator_exactly(code_scale):
    """Maps whose sums are multiples of their denominator (here 3 * (x' y + offset'), plus the code
    GEMM's multiple): both executors return the exact quotient, in one K chunk or several."""
    if not INT8_EXACT:
        pytest.skip("torch's int8 GEMM is not exact here")
    rng = np.random.default_rng(31)
    x, y = rng.integers(-42, 43, (256, 4)), rng.integers(-128, 128, (256, 4))
    offset = 3 * rng.integers(-10**6, 10**6, 256)
    maps = lowrank.Int8Maps((3 * x).astype(np.int8), y.astype(np.int8), offset, 3,
                            int((np.abs(3 * x) @ np.abs(y).T).max()), 3 * code_scale)
    table = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int64)  # a byte read as int8
    lut = x @ y.T + offset[None, :] // 3 + code_scale * np.outer(table, table)
    a, b = codes(rng, (37, 101)), codes(rng, (101, 6))
    expected = matmul_oracle(a, b, lut)
    for chunk, kernel in itertools.product((101, 10), KERNELS):
        out = lowrank.lowrank_gemm(a[None], b[None], types.SimpleNamespace(int8=maps), GemmPlan("int8", chunk, 0.0),
                                   kernel, torch.int64)
        assert np.array_equal(out[0].numpy(), expected), (chunk, kernel)
