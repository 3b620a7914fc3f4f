"""The compiled kernel's in-register strategy (AVX-512 VBMI byte permutes over a LUT's byte planes)
against the float64 gather oracle: both lane orientations, K across its 16-bit chunks, odd shapes,
several groups, every code dtype, LUTs spanning the full 2**16 range; and its route through the engine."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from approxrun.lut import exact_lut
from approxrun.ops import LutEngine, lut_conv2d, lut_matmul, native
from approxrun.ops.engine import NATIVE_PERMUTE, NATIVE_PERMUTE_ROWS
from approxrun.ops.lowrank import Calibration

from test_lowrank import AVX2_ONLY, codes, conv_oracle, matmul_oracle

KERNEL = native.load()
needs_permutes = pytest.mark.skipif(KERNEL is None or not KERNEL.permutes,
                                    reason="the in-register strategy needs a C++ toolchain and AVX-512 VBMI")


def full_span_lut(rng, low: int) -> np.ndarray:
    """Asymmetric values spanning exactly [low, low + 2**16 - 1], both ends present."""
    lut = rng.integers(low, low + 2**16, (256, 256))
    lut[3, 250], lut[251, 7] = low, low + 2**16 - 1
    return lut


def grouped_oracle(a, b, lut):
    return np.stack([matmul_oracle(a[g], b[g], lut) for g in range(a.shape[0])])


@pytest.mark.skipif(not (shutil.which("c++") and shutil.which("ninja")), reason="needs a C++ compiler and ninja")
def test_kernel_builds_with_its_strategies():
    """Where a compiler is there the kernel must build (a broken source would otherwise only fall back
    to torch ops and skip its tests), with the in-register strategy wherever the CPU has AVX-512 VBMI
    and no instruction-set ceiling applies."""
    assert KERNEL is not None
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if {"avx512vbmi", "avx512bw"} <= flags and native.target_flag() == "-march=native":
        assert KERNEL.permutes


def test_byte_planes_only_for_a_16_bit_span():
    rng = np.random.default_rng(40)
    planes = native.byte_planes(full_span_lut(rng, -2**15))
    assert planes is not None and planes.low == -2**15
    assert native.byte_planes(full_span_lut(rng, -2**15) * 2) is None  # spans 2**17
    assert native.byte_planes(exact_lut(True, True).astype(np.float64) + 0.5) is None  # not integers


@needs_permutes
@pytest.mark.parametrize("low", [-2**15, 0, -70000])
@pytest.mark.parametrize("transposed", [False, True])
def test_permute_matches_oracle(low, transposed):
    """K = 300 crosses a 256-k chunk; N = 70 and 129 pad the lanes of b's columns, M = 37 and 300 those
    of a's rows (blocks of 256); two groups."""
    rng = np.random.default_rng(41)
    lut = full_span_lut(rng, low)
    planes = native.byte_planes(lut)
    lut32 = torch.as_tensor(lut.astype(np.int32))
    for (groups, m, k, n), dtype in zip(((2, 37, 300, 70), (1, 300, 5, 129), (3, 1, 1, 1), (1, 257, 64, 3)),
                                        (torch.int8, torch.int32, torch.float32, torch.int64)):
        a, b = codes(rng, (groups, m, k)), codes(rng, (groups, k, n))
        expected = grouped_oracle(a, b, lut)
        out = KERNEL.permute(a.to(dtype), b.to(dtype), planes, transposed, torch.int64)
        assert np.array_equal(out.numpy(), expected), (groups, m, k, n)
        assert np.array_equal(KERNEL.permute(a, b, planes, transposed).numpy(), expected)  # float64 out
        assert torch.equal(out, KERNEL(a, b, lut32, wide_sums=True, out_dtype=torch.int64))
    wide_a = a + 256 * codes(rng, a.shape, -2**40, 2**40)  # only a code's byte counts
    assert np.array_equal(KERNEL.permute(wide_a, b.int(), planes, transposed).numpy(), expected)
    left, right = codes(rng, (1, 9, 300)), codes(rng, (1, 64, 300)).transpose(1, 2)  # non-contiguous b
    assert np.array_equal(KERNEL.permute(left, right, planes, transposed).numpy(), grouped_oracle(left, right, lut))


def permute_first(orientation: str) -> Calibration:
    """A machine on which the in-register strategy is modelled fastest, with lanes over b's columns, or
    over a's rows (its transposing free)."""
    fast = {"native_permute_group": 1e-9, "native_permute_code": 1e-15 if orientation == "rows" else 1.0}
    return Calibration(**{**AVX2_ONLY.as_dict(), "native_lookup": 1e-9, "native_table_entry": 1e-9,
                          "native_row_add": 1e-9, **fast})


@needs_permutes
def test_engine_routes_through_permutes():
    """Chosen by the injected figures, each orientation runs through lut_matmul and lut_conv2d exactly;
    a LUT spanning more than 2**16, or K at the int32 lanes' limit, is never given the route."""
    rng = np.random.default_rng(42)
    lut = full_span_lut(rng, -2**15)
    for orientation, route in (("columns", NATIVE_PERMUTE), ("rows", NATIVE_PERMUTE_ROWS)):
        engine = LutEngine(lut, strategy="gather", calibration=permute_first(orientation))
        assert engine.chosen_route(1, 96, 40, 70, "cpu") == route
        a, b = codes(rng, (96, 40)), codes(rng, (40, 70))
        assert np.array_equal(lut_matmul(a.int(), b.int(), engine).numpy(), matmul_oracle(a, b, lut))
        x, w = codes(rng, (2, 4, 7, 5)), codes(rng, (6, 2, 3, 3))
        out = lut_conv2d(x, w, engine, stride=2, padding=1, groups=2, pad_value=-7)
        assert np.array_equal(out.numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 2, 1, 1, 2, -7))
        assert engine.chosen_route(1, 96, native.SPAN16_MAX_K, 70, "cpu") != route
    wide = LutEngine(lut * 2, strategy="gather", calibration=permute_first("rows"))
    assert wide.chosen_route(1, 96, 40, 70, "cpu") not in (NATIVE_PERMUTE, NATIVE_PERMUTE_ROWS)
