"""The compiled float32 low-rank plan (maps read by code and multiplied in registers) against the
float64 gather oracle: odd shapes around its register blocks, K chunks, several groups, every code
dtype, a strided b, denominators; and its route through the engine."""

import logging

import numpy as np
import pytest
import torch

from approxrun.multipliers import get_multiplier
from approxrun.ops import LutEngine, lut_matmul, native
from approxrun.ops.lowrank import Calibration, LowRankTable, candidate_plans

from test_lowrank import AMX_LIKE, codes, low_rank_lut, matmul_oracle

KERNEL = native.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="needs a C++ toolchain")


def grouped_oracle(a, b, lut):
    return np.stack([matmul_oracle(a[g], b[g], lut) for g in range(a.shape[0])])


def run(a, b, form: LowRankTable, chunk: int, out_dtype=torch.float64) -> torch.Tensor:
    x, y = form.maps("cpu", torch.float32)
    return KERNEL.map_gemm(a, b, x, y, chunk, form.denominator, out_dtype)


@needs_kernel
@pytest.mark.parametrize("n", [1, 6, 8, 9, 16, 17, 33, 70])
def test_map_gemm_matches_oracle_around_register_blocks(n):
    """N on both sides of one vector (8 or 16 lanes) and of two; M = 1, 13 and 37 leave partial row
    blocks; K = 300 in chunks of 1, 7 and all of K; two groups; the whole-table form of DRUM (width
    1), an asymmetric rank-2 error plus the exact product (width 3) and asymmetric integer maps of
    widths 2, 4 and 5 (the kernel's versions for fixed widths and the one for any width)."""
    rng = np.random.default_rng(50 + n)
    tables = [get_multiplier("drum_4").engine.lowrank.forms[-1], LutEngine(low_rank_lut(2, seed=n)).lowrank]
    tables += [LowRankTable.of(rng.integers(-128, 128, (256, w)), rng.integers(-90, 60, (256, w)), 1) for w in (2, 4, 5)]
    for form in tables:
        lut = (np.asarray(form.x, dtype=np.int64) @ np.asarray(form.y, dtype=np.int64).T) // form.denominator
        for m in (1, 13, 37):
            a, b = codes(rng, (2, m, 300)), codes(rng, (2, 300, n))
            expected = grouped_oracle(a.numpy(), b.numpy(), lut)
            for chunk in (1, 7, 300):
                assert np.array_equal(run(a, b, form, chunk).numpy(), expected), (form.width, m, n, chunk)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int64, torch.float32])
def test_map_gemm_reads_every_code_dtype_and_strides(dtype):
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
            out = run(a, b, form, 150, out_dtype)
            assert out.dtype == out_dtype and np.array_equal(out.numpy(), expected), (n, out_dtype)


@needs_kernel
def test_map_gemm_divides_by_the_denominator_exactly():
    """denominator * table == x @ y.T with x a multiple of the denominator: results are the exact
    integer quotients, in int64 and float64."""
    rng = np.random.default_rng(52)
    u, v = rng.integers(-40, 41, (256, 2)), rng.integers(-60, 61, (256, 2))
    form = LowRankTable.of(7 * u, v, 7)
    a, b = codes(rng, (3, 9, 41)), codes(rng, (3, 41, 20))
    expected = grouped_oracle(a.numpy(), b.numpy(), u @ v.T)
    for out_dtype in (torch.int64, torch.float64):
        assert np.array_equal(run(a, b, form, 41, out_dtype).numpy(), expected)


@needs_kernel
def test_map_gemm_rejects_bad_maps():
    a, b = torch.zeros(1, 2, 3, dtype=torch.int32), torch.zeros(1, 3, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32 maps"):
        KERNEL.map_gemm(a, b, torch.zeros(256, 2, dtype=torch.float64), torch.zeros(256, 2), 3, 1)
    with pytest.raises(RuntimeError, match="chunk"):
        KERNEL.map_gemm(a, b, torch.zeros(256, 1), torch.zeros(256, 1), 0, 1)


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
