"""Exact low-rank LUT GEMMs against the float64 gather oracle over the LUT."""

import logging

import numpy as np
import pytest
import torch

from approxrun.lut import exact_lut
from approxrun.multipliers import get_multiplier
from approxrun.ops import get_strategy, lut_conv2d, lut_matmul, set_strategy, use_strategy
from approxrun.ops import lowrank
from approxrun.ops.gradients import gradient_tables


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


@pytest.fixture(autouse=True)
def default_strategy():
    yield
    set_strategy("auto")


@pytest.fixture
def lowrank_log(caplog):
    """The debug log of the strategy choices, to check that the low-rank path really ran."""
    with caplog.at_level(logging.DEBUG, logger="approxrun.ops.lowrank"):
        yield caplog


@pytest.mark.parametrize("rank", range(1, 9))
def test_random_low_rank_lut_is_factored_exactly(rank):
    lut = low_rank_lut(rank, seed=rank)
    table = lowrank.factorize_lut(lut)
    assert table is not None and table.rank == rank and table.exact_part == (True, True)
    x, y = table.x.astype(object), table.y.astype(object)
    assert np.array_equal(x.dot(y.T), lut.astype(object) * table.denominator)


@pytest.mark.parametrize("rank", range(1, 9))
def test_matmul_matches_oracle_for_random_ranks(rank, lowrank_log):
    rng = np.random.default_rng(100 + rank)
    lut = low_rank_lut(rank, seed=rank)
    for m, k, n in ((23, 115, 15), (1, 23, 1)):
        a, b = codes(rng, (m, k)), codes(rng, (k, n))
        with use_strategy("lowrank"):
            out = lut_matmul(a, b, lut)
        assert out.dtype == torch.int64 and f"low rank {rank}," in lowrank_log.text
        assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))


PATH_LOG = {torch.int8: "int8 GEMMs", torch.float32: "float32 GEMMs", torch.float64: "float64 GEMM"}


@pytest.fixture
def only_path(monkeypatch):
    """Restrict the planner to one GEMM path (by dtype), so that every exact path gets tested."""
    def restrict(dtype):
        if dtype == torch.int8 and not lowrank.int8_gemm_is_exact():
            pytest.skip("torch's int8 GEMM is not exact here")
        candidates = lowrank.candidate_plans
        monkeypatch.setattr(lowrank, "candidate_plans",
                            lambda *args: [p for p in candidates(*args) if p.dtype == dtype])
        monkeypatch.setattr(lowrank, "_by_content", type(lowrank._by_content)())  # fresh tables:
        monkeypatch.setattr(lowrank, "_by_tensor", {})  # no plans cached from other tests
    return restrict


@pytest.mark.parametrize("path", [torch.int8, torch.float32, torch.float64])
@pytest.mark.parametrize("rank, signed", [(1, (True, True)), (2, (False, False)), (2, (True, False))])
def test_large_k_matches_oracle(path, rank, signed, only_path, lowrank_log):
    """K = 4100: sums reach far beyond 2**24, so one float32 GEMM could not be exact."""
    only_path(path)
    rng = np.random.default_rng(7)
    lut = low_rank_lut(rank, seed=20 + rank, signed=signed)
    k = 4100
    assert k * np.abs(lut).max() >= 2**24
    lo_a, hi_a = (-128, 128) if signed[0] else (0, 256)
    lo_b, hi_b = (-128, 128) if signed[1] else (0, 256)
    a, b = codes(rng, (23, k), lo_a, hi_a), codes(rng, (k, 9), lo_b, hi_b)
    with use_strategy("lowrank"):
        out = lut_matmul(a, b, lut)
    assert PATH_LOG[path] in lowrank_log.text
    assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))


@pytest.mark.parametrize("rank", [3, 8])
def test_large_k_rational_factors_match_oracle(rank, only_path, lowrank_log):
    """Random errors of rank >= 3 factor with rational coefficients: the float64 path rounds."""
    only_path(torch.float64)
    rng = np.random.default_rng(8)
    lut = low_rank_lut(rank, seed=20 + rank)
    assert lowrank.factorize_lut(lut).denominator > 1
    a, b = codes(rng, (1, 23, 4100)) & 0xFF, codes(rng, (1, 4100, 9)) & 0xFF
    out = lowrank.try_lowrank_gemm(a, b, torch.as_tensor(lut, dtype=torch.float64), "lowrank")
    assert out is not None and "float64 GEMM" in lowrank_log.text
    assert np.array_equal(out[0].numpy(), matmul_oracle(a[0], b[0], lut))


def test_plans_keep_every_partial_sum_exact():
    drum = lowrank.factorize_lut(get_multiplier("drum_4"))
    plans = {p.dtype: p for p in lowrank.candidate_plans(drum, 1, 64, 4096, 64, torch.device("cpu"))}
    assert plans[torch.float32].k_chunk * drum.term_bound < 2**24 and plans[torch.float32].k_chunk < 4096
    assert plans[torch.float64].k_chunk == 4096
    if lowrank.int8_gemm_is_exact():
        assert plans[torch.int8].k_chunk * drum.int8.bound < 2**31
    rational = lowrank.factorize_lut(low_rank_lut(5, seed=5))
    assert rational.denominator > 1  # random factors are rational: the digits hold D * lut
    assert lowrank.plan_gemm(rational, 1, 64, 4096, 64, torch.device("cpu")) is not None


@pytest.mark.parametrize("name, signed, width, code_gemm", [
    ("drum_4", True, 4, False),  # the whole LUT is rank 1, u(a) u(b), split into int8 columns
    ("drum_4", False, 4, False), ("bam_2_6", True, 8, False),
    ("truncated_4", True, 4, True),  # exact product from the codes themselves, 4 error columns
    ("exact", False, 4, False)])  # unsigned operands: centred columns and an offset
def test_int8_maps_reproduce_the_table(name, signed, width, code_gemm):
    multiplier = get_multiplier(name, signed)
    maps = lowrank.factorize_lut(multiplier).int8
    assert maps.x.dtype == maps.y.dtype == np.int8 and maps.width == width
    assert bool(maps.code_scale) == code_gemm
    values = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int64)  # a byte read as int8
    total = (maps.x.astype(np.int64) @ maps.y.T.astype(np.int64) + maps.offset[None, :]
             + maps.code_scale * np.outer(values, values))
    assert np.array_equal(total, multiplier.lut * maps.denominator)
    assert maps.bound == (np.abs(maps.x.astype(np.int64)) @ np.abs(maps.y.T.astype(np.int64))).max()


@pytest.mark.parametrize("name, signed", [("drum_4", True), ("truncated_4", True), ("kulkarni", False),
                                          ("exact", False)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.int64])
def test_int8_plan_matches_oracle_for_code_dtypes_and_blocks(name, signed, dtype, monkeypatch, only_path,
                                                             lowrank_log):
    """int8/uint8 codes with an even K gather byte pairs; other dtypes and odd K one code at a
    time; small blocks and int32 limits force several row blocks and K chunks."""
    only_path(torch.int8)
    rng = np.random.default_rng(14)
    multiplier = get_multiplier(name, signed)
    lo, hi = (-128, 128) if signed else (0, 256)
    dtype = torch.uint8 if dtype == torch.int8 and not signed else dtype
    for m, k, n in ((37, 150, 16), (23, 151, 5), (1, 2, 1), (9, 7, 1), (64, 700, 3)):
        a, b = codes(rng, (m, k), lo, hi), codes(rng, (k, n), lo, hi)
        expected = matmul_oracle(a, b, multiplier.lut)
        for map_bytes, int32_limit in ((lowrank.MAP_BYTES, lowrank.INT32_EXACT), (4096, 2**22)):
            monkeypatch.setattr(lowrank, "MAP_BYTES", map_bytes)
            monkeypatch.setattr(lowrank, "INT32_EXACT", int32_limit)
            with use_strategy("lowrank"):
                out = lut_matmul(a.to(dtype), b.to(dtype), multiplier)
                transposed = lut_matmul(a.to(dtype), b.to(dtype).t().contiguous().t(), multiplier)
            assert np.array_equal(out.numpy(), expected), (m, k, n, map_bytes)
            assert np.array_equal(transposed.numpy(), expected)
    assert "int8 GEMMs" in lowrank_log.text


@pytest.mark.parametrize("name, signed", [("drum_4", False), ("truncated_6_c", True), ("kulkarni", True)])
def test_int8_plan_matches_oracle_with_k_chunks(name, signed, monkeypatch, only_path, lowrank_log):
    """A small int32 limit forces several K chunks per GEMM; the sums must still be exact."""
    only_path(torch.int8)
    monkeypatch.setattr(lowrank, "INT32_EXACT", 2**22)
    rng = np.random.default_rng(12)
    multiplier = get_multiplier(name, signed)
    lo, hi = (-128, 128) if signed else (0, 256)
    a, b = codes(rng, (23, 1500), lo, hi), codes(rng, (1500, 9), lo, hi)
    table = lowrank.factorize_lut(multiplier)
    plan = lowrank.plan_gemm(table, 1, 23, 1500, 9, torch.device("cpu"))
    assert plan.dtype == torch.int8 and plan.k_chunk < 1500
    with use_strategy("lowrank"):
        out = lut_matmul(a, b, multiplier)
    assert "int8 GEMMs" in lowrank_log.text
    assert np.array_equal(out.numpy(), matmul_oracle(a, b, multiplier.lut))


def test_no_exact_plan_falls_back_to_gather():
    """Errors near 2**30 with rational factors: no integer digits, and for K = 4096 the float64
    rounding bound fails; for K = 256 it holds."""
    rng = np.random.default_rng(4)
    lut = exact_lut() + rng.integers(-2**14, 2**14, (256, 3)) @ rng.integers(-2**14, 2**14, (256, 3)).T
    table = lowrank.factorize_lut(lut)
    assert table.rank == 3 and table.int8 is None
    assert lowrank.plan_gemm(table, 1, 3, 4096, 2, torch.device("cpu")) is None
    assert lowrank.plan_gemm(table, 1, 3, 256, 2, torch.device("cpu")).dtype == torch.float64
    a, b = codes(rng, (3, 4096)), codes(rng, (4096, 2))
    with use_strategy("lowrank"):
        assert lowrank.try_lowrank_gemm(a[None] & 0xFF, b[None] & 0xFF, torch.as_tensor(lut)) is None
        out = lut_matmul(a, b, lut)
        out_short = lut_matmul(a[:, :256], b[:256], lut)
    assert np.array_equal(out.numpy(), matmul_oracle(a, b, lut))
    assert np.array_equal(out_short.numpy(), matmul_oracle(a[:, :256], b[:256], lut))


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("stride, padding, dilation, groups, pad_value", [
    (1, 1, 1, 1, -3), (2, 2, 2, 2, 5), (1, 0, 1, 1, 0)])
def test_conv_matches_oracle(rank, stride, padding, dilation, groups, pad_value, lowrank_log):
    rng = np.random.default_rng(rank * 10 + groups)
    lut = low_rank_lut(rank, seed=30 + rank)
    x, w = codes(rng, (2, 6, 9, 11)), codes(rng, (4, 6 // groups, 3, 2))
    with use_strategy("lowrank"):
        out = lut_conv2d(x, w, lut, stride, padding, dilation, groups, pad_value=pad_value)
    expected = conv_oracle(x.numpy(), w.numpy(), lut, stride, padding, dilation, groups, pad_value)
    assert f"low rank {rank}," in lowrank_log.text
    assert np.array_equal(out.numpy(), expected)


@pytest.mark.parametrize("path", [torch.int8, torch.float32, torch.float64])
def test_conv_paths_match_oracle(path, only_path, conv_route, lowrank_log):
    """Every GEMM plan inside a convolution (unfolded rows: the maps-first routes are off)."""
    conv_route[1]("unfold")
    only_path(path)
    rng = np.random.default_rng(13)
    lut = get_multiplier("drum_4", signed=False).lut
    x, w = codes(rng, (2, 4, 9, 8), 0, 256), codes(rng, (6, 2, 3, 3), 0, 256)
    with use_strategy("lowrank"):
        out = lut_conv2d(x, w, lut, stride=2, padding=2, groups=2, pad_value=200)
    assert PATH_LOG[path] in lowrank_log.text
    assert np.array_equal(out.numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 2, 2, 1, 2, 200))


@pytest.fixture
def conv_route(monkeypatch):
    """Count the convolution routes taken; ``only(route)`` disables the routes tried before it:
    "map" (map-then-conv), "int8" (im2col of packed int8 maps) or "unfold" (unfold, then GEMMs)."""
    taken = {"map": 0, "int8": 0}

    def spy(route, fn):
        def run(*args):
            out = fn(*args)
            taken[route] += out is not None
            return out
        return run

    monkeypatch.setattr(lowrank, "map_conv2d", spy("map", lowrank.map_conv2d))
    monkeypatch.setattr(lowrank, "int8_conv2d", spy("int8", lowrank.int8_conv2d))

    def only(route):
        if route in ("int8", "unfold"):
            monkeypatch.setattr(lowrank, "map_conv2d", lambda *args: None)
        if route == "unfold":
            monkeypatch.setattr(lowrank, "int8_conv2d", lambda *args: None)
    return taken, only


@pytest.mark.parametrize("route", ["map", "int8", "unfold"])
@pytest.mark.parametrize("name, signed", [("drum_4", True), ("kulkarni", False), ("truncated_4", True)])
@pytest.mark.parametrize("stride, padding, dilation, groups, pad_value", [
    (1, 2, 1, 1, -3), (2, 1, 2, 2, 5), (1, 1, 1, 6, 0)])
def test_conv_routes_match_oracle(route, name, signed, stride, padding, dilation, groups, pad_value,
                                  conv_route, only_path):
    taken, only = conv_route
    only(route)
    if route == "int8":
        only_path(torch.int8)
    rng = np.random.default_rng(15)
    multiplier = get_multiplier(name, signed)
    lo, hi = (-128, 128) if signed else (0, 256)
    pad_value = pad_value & 0xFF if not signed else pad_value
    x, w = codes(rng, (3, 6, 11, 9), lo, hi), codes(rng, (12, 6 // groups, 3, 2), lo, hi)
    expected = conv_oracle(x.numpy(), w.numpy(), multiplier.lut, stride, padding, dilation, groups, pad_value)
    for dtype in (torch.float32, torch.int64):
        with use_strategy("lowrank"):
            out = lut_conv2d(x.to(dtype), w.to(dtype), multiplier, stride, padding, dilation, groups,
                             pad_value=pad_value)
        assert np.array_equal(out.numpy(), expected)
    code_gemm = lowrank.factorize_lut(multiplier).int8.code_scale != 0  # not an int8 conv: unfold instead
    assert taken["map"] == (2 if route == "map" else 0)
    assert taken["int8"] == (2 if route == "int8" and not code_gemm else 0)


def test_map_conv_refuses_unproven_cases(monkeypatch, conv_route, only_path):
    """Sums that could reach 2**24, or a conv backend that might use Winograd/FFT: no map-then-conv,
    and the int8 route gives the same exact result."""
    taken, _ = conv_route
    only_path(torch.int8)
    rng = np.random.default_rng(16)
    multiplier = get_multiplier("drum_4")
    table = lowrank.factorize_lut(multiplier)
    x, w = codes(rng, (2, 100, 6, 6)), codes(rng, (3, 100, 3, 3))
    assert 100 * 9 * table.conv_maps.bound >= 2**24
    expected = conv_oracle(x.numpy(), w.numpy(), multiplier.lut, 1, 1, 1, 1, 4)
    with use_strategy("lowrank"):
        assert np.array_equal(lut_conv2d(x, w, multiplier, padding=1, pad_value=4).numpy(), expected)
    assert taken == {"map": 0, "int8": 1}
    small_x, small_w = x[:, :4], w[:, :4]
    with use_strategy("lowrank"):
        lut_conv2d(small_x, small_w, multiplier, padding=1, pad_value=4)
        assert taken["map"] == 1
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")  # float32 products may round through bfloat16
        try:
            lut_conv2d(small_x, small_w, multiplier, padding=1, pad_value=4)
        finally:
            torch.set_float32_matmul_precision(precision)
        assert taken == {"map": 1, "int8": 2}
        monkeypatch.setattr(torch._C, "_select_conv_backend", lambda *args: "_ConvBackend.NnpackSpatial")
        out = lut_conv2d(small_x, small_w, multiplier, padding=1, pad_value=4)
    assert taken == {"map": 1, "int8": 3}
    assert np.array_equal(out.numpy(), conv_oracle(small_x.numpy(), small_w.numpy(), multiplier.lut, 1, 1, 1, 1, 4))


@pytest.mark.parametrize("strategy", ["lowrank", "auto"])
def test_depthwise_conv_matches_oracle(strategy, lowrank_log):
    rng = np.random.default_rng(11)
    lut = get_multiplier("drum_4").lut
    x, w = codes(rng, (2, 5, 7, 7)), codes(rng, (5, 1, 3, 3))
    with use_strategy(strategy):
        out = lut_conv2d(x, w, lut, padding=1, groups=5, pad_value=-7)
    assert strategy == "auto" or "G=5 M=98 K=9 N=1" in lowrank_log.text
    assert np.array_equal(out.numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 1, 1, 1, 5, -7))


@pytest.mark.parametrize("name, rank", [("drum_4", 2), ("drum_6", 2), ("truncated_2", 2),
                                        ("truncated_4", 4), ("kulkarni", 1), ("roba", 1),
                                        ("perforated_0_2", 1), ("exact", 0)])
@pytest.mark.parametrize("signed", [True, False])
def test_builtin_design_ranks(name, rank, signed):
    multiplier = get_multiplier(name, signed)
    table = lowrank.factorize_lut(multiplier)
    assert table.rank == rank and table.exact_part == (signed, signed)
    assert table.denominator == 1  # integer factors: the float32 path applies
    error = table.x[:, 1:].astype(object).dot(table.y[:, 1:].T.astype(object))
    assert np.array_equal(error, multiplier.error_table.astype(np.int64))


def test_mitchell_is_high_rank_and_falls_back():
    mitchell = get_multiplier("mitchell")
    assert lowrank.factorize_lut(mitchell) is None
    assert lowrank.modular_rank(mitchell.error_table.astype(np.int64)) > lowrank.MAX_FACTOR_RANK


def test_full_rank_lut_falls_back_to_gather():
    rng = np.random.default_rng(5)
    lut = rng.integers(-2000, 2000, (256, 256))
    assert lowrank.factorize_lut(lut) is None
    a, b = codes(rng, (23, 40)), codes(rng, (40, 7))
    for strategy in ("auto", "lowrank"):
        lut_tensor = torch.as_tensor(lut)
        assert lowrank.try_lowrank_gemm(a[None] & 0xFF, b[None] & 0xFF, lut_tensor, strategy) is None
        with use_strategy(strategy):
            assert np.array_equal(lut_matmul(a, b, lut).numpy(), matmul_oracle(a, b, lut))


def test_strategy_setting_and_overrides(lowrank_log):
    rng = np.random.default_rng(6)
    lut = torch.tensor(get_multiplier("drum_4").lut, dtype=torch.float64)
    a, b = codes(rng, (1, 64, 128)) & 0xFF, codes(rng, (1, 128, 32)) & 0xFF
    assert get_strategy() == "auto"
    assert lowrank.try_lowrank_gemm(a, b, lut) is not None
    assert "low rank 2" in lowrank_log.text
    set_strategy("gather")
    assert lowrank.try_lowrank_gemm(a, b, lut) is None
    assert lowrank.try_lowrank_gemm(a, b, lut, strategy="lowrank") is not None
    with use_strategy("auto", lookup_cost=1e-6):  # lookups nearly free: the cost model keeps the gather
        assert lowrank.try_lowrank_gemm(a, b, lut) is None
    assert get_strategy() == "gather"
    with pytest.raises(ValueError, match="strategy"):
        set_strategy("fast")
    with pytest.raises(ValueError, match="lookup_cost"):
        set_strategy("auto", lookup_cost=0)


def test_factorization_is_cached_per_content_and_tensor_version():
    multiplier = get_multiplier("drum_6")
    table = lowrank.factorize_lut(multiplier)
    assert lowrank.factorize_lut(multiplier.lut.copy()) is table
    tensor = torch.tensor(multiplier.lut, dtype=torch.float64)
    assert lowrank.factorize_lut(tensor) is table
    tensor.copy_(torch.as_tensor(exact_lut(), dtype=torch.float64))  # in-place change: new version
    assert lowrank.factorize_lut(tensor).rank == 0


@pytest.mark.parametrize("name", ["drum_4", "truncated_4"])
def test_lut_gradients_match_gather_backward(name):
    multiplier = get_multiplier(name)
    da, db = gradient_tables(multiplier.lut, True, True)
    for table in (da, db):
        factors = lowrank.factorize_table(torch.as_tensor(table))
        x, y = factors.x.astype(object), factors.y.astype(object)
        assert np.allclose(x.dot(y.T).astype(float) / factors.denominator, table, rtol=1e-14, atol=0)
    rng = np.random.default_rng(8)
    a_codes, b_codes = codes(rng, (19, 45)).double(), codes(rng, (45, 7)).double()
    grad_out = torch.as_tensor(rng.standard_normal((19, 7)))
    results = {}
    for strategy in ("gather", "lowrank"):
        a, b = a_codes.clone().requires_grad_(), b_codes.clone().requires_grad_()
        with use_strategy(strategy):
            out = lut_matmul(a, b, multiplier, grad="lut")
            out.backward(grad_out)
        results[strategy] = (out.detach(), a.grad, b.grad)
    (out_g, grad_a_g, grad_b_g), (out_l, grad_a_l, grad_b_l) = results["gather"], results["lowrank"]
    assert torch.equal(out_g, out_l)
    torch.testing.assert_close(grad_a_l, grad_a_g, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(grad_b_l, grad_b_g, rtol=1e-12, atol=1e-9)
    assert not torch.equal(grad_a_g, grad_out @ b_codes.T)  # the LUT gradient differs from the STE one


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [2, 6])
def test_cuda_lowrank_matches_oracle(rank):
    rng = np.random.default_rng(9)
    lut = low_rank_lut(rank, seed=40 + rank)
    a, b = codes(rng, (37, 4100)), codes(rng, (4100, 21))
    x, w = codes(rng, (2, 4, 8, 8)), codes(rng, (6, 2, 3, 3))
    with use_strategy("lowrank"):
        out = lut_matmul(a.cuda(), b.cuda(), lut)
        conv = lut_conv2d(x.cuda(), w.cuda(), lut, padding=1, groups=2, pad_value=3)
    assert np.array_equal(out.cpu().numpy(), matmul_oracle(a, b, lut))
    assert np.array_equal(conv.cpu().numpy(), conv_oracle(x.numpy(), w.numpy(), lut, 1, 1, 1, 2, 3))
