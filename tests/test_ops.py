"""lut_matmul / lut_conv2d against the float64 gather oracle, and their gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from approxrun.lut import exact_lut, index_values
from approxrun.multipliers import Multiplier
from approxrun.ops import LutEngine, gather, lut_conv2d, lut_matmul, native
from approxrun.ops.im2col import grouped_rows, windows
from conftest import conv2d_oracle, matmul_oracle, random_codes, random_lut

GATHER_PATHS = ("direct", "table")
MATMUL_SHAPES = [(1, 1, 1), (1, 115, 23), (23, 115, 1), (115, 23, 23), (23, 1, 115), (23, 115, 115), (115, 9, 2)]


@pytest.fixture(params=GATHER_PATHS)
def gather_path(request, monkeypatch):
    """Force the CPU gather's direct path or its table path (table on the smaller outer side)."""
    monkeypatch.setattr(gather, "_use_direct", lambda m, n: request.param == "direct")
    return request.param


@pytest.fixture(params=["default tiles", "tiny tiles"])
def tiles(request, monkeypatch):
    """Default tile sizes, or tiny ones so that odd shapes cross many tile and chunk edges."""
    if request.param == "tiny tiles":
        monkeypatch.setattr(gather, "WIDE_ROW", 7)
        monkeypatch.setattr(gather, "TABLE_BYTES", 5 * 256 * 7 * 4)  # 5 k per float32 tile
        monkeypatch.setattr(gather, "CHUNK_INDICES", 256)
    return request.param


@pytest.mark.parametrize("m,k,n", MATMUL_SHAPES)
def test_matmul_matches_oracle(rng, gather_path, tiles, m, k, n):
    lut = random_lut(rng)
    a, b = random_codes(rng, (m, k)), random_codes(rng, (k, n))
    out = lut_matmul(a, b, lut)
    assert out.dtype == torch.int64 and out.shape == (m, n)
    np.testing.assert_array_equal(out.numpy(), matmul_oracle(a, b, lut))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_code_dtypes(rng, dtype):
    lut = random_lut(rng)
    signed = dtype != torch.uint8
    a, b = random_codes(rng, (23, 31), signed, dtype), random_codes(rng, (31, 5), signed, dtype)
    out = lut_matmul(a, b, lut)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), matmul_oracle(a, b, lut))
    # an unsigned byte and the signed code with the same byte read the same LUT entry
    as_signed = torch.where(a.long() > 127, a.long() - 256, a.long()) if not signed else a
    assert torch.equal(lut_matmul(as_signed, b, lut), out)


@pytest.mark.parametrize("low,high", [(2**31 - 2**20, 2**31 - 1), (-(2**31), 2**31 - 1), (2**20, 2**21),
                                      (2**24 + 1, 2**24 + 99)])
def test_large_sums_stay_exact(rng, gather_path, low, high):
    """K and LUT entries for which float32 partial sums would round (the float64 oracle is exact here)."""
    lut = random_lut(rng, low, high) | 1  # odd entries: float32 rounding would make them even
    a, b = random_codes(rng, (37, 700)), random_codes(rng, (700, 29))
    np.testing.assert_array_equal(lut_matmul(a, b, lut).numpy(), matmul_oracle(a, b, lut))
    x, w = random_codes(rng, (2, 3, 40, 30)), random_codes(rng, (3, 1, 3, 3))
    depthwise = lut_conv2d(x, w, lut, padding=1, groups=3, pad_value=-1)
    np.testing.assert_array_equal(depthwise.numpy(),
                                  conv2d_oracle(x, w, lut, padding=1, groups=3, pad_value=-1))


def test_lut_argument_forms(rng):
    lut = random_lut(rng)
    a, b = random_codes(rng, (9, 23)), random_codes(rng, (23, 4))
    expected = matmul_oracle(a, b, lut)
    for form in (lut, torch.tensor(lut), torch.tensor(lut, dtype=torch.int32), torch.tensor(lut, dtype=torch.float64),
                 Multiplier("random", lut)):
        np.testing.assert_array_equal(lut_matmul(a, b, form).numpy(), expected)
    with pytest.raises(ValueError, match="256x256"):
        lut_matmul(a, b, lut[:255])


def test_bad_shapes_and_empty_operands(rng):
    lut = random_lut(rng)
    with pytest.raises(ValueError, match="lut_matmul"):
        lut_matmul(random_codes(rng, (3, 4)), random_codes(rng, (5, 2)), lut)
    with pytest.raises(ValueError, match="lut_matmul"):
        lut_matmul(random_codes(rng, (3, 4, 1)), random_codes(rng, (4, 2)), lut)
    assert lut_matmul(random_codes(rng, (0, 4)), random_codes(rng, (4, 2)), lut).shape == (0, 2)
    assert not lut_matmul(random_codes(rng, (3, 0)), random_codes(rng, (0, 2)), lut).any()


CONV_CASES = {
    "3x3": dict(x=(2, 3, 7, 6), w=(4, 3, 3, 3)),
    "stride2-pad1": dict(x=(1, 3, 9, 8), w=(5, 3, 3, 3), stride=2, padding=1, pad_value=7),
    "mixed-options": dict(x=(2, 2, 11, 9), w=(3, 2, 2, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                          pad_value=-3),
    "dilation2": dict(x=(1, 2, 9, 9), w=(2, 2, 3, 3), padding=2, dilation=2, pad_value=100),
    "groups2-3x1": dict(x=(2, 4, 6, 5), w=(6, 2, 3, 1), groups=2, padding=(1, 0), pad_value=-128),
    "groups3-one-out": dict(x=(1, 6, 5, 5), w=(3, 2, 3, 3), groups=3, padding=1, pad_value=5),
    "depthwise": dict(x=(2, 5, 7, 7), w=(5, 1, 3, 3), groups=5, padding=1, pad_value=11),
    "depthwise-x2": dict(x=(1, 5, 6, 7), w=(10, 1, 3, 3), groups=5, stride=2, padding=1, pad_value=-9),
    "depthwise-5x5-dilated": dict(x=(2, 4, 9, 8), w=(4, 1, 5, 5), groups=4, stride=2, padding=3, dilation=2,
                                  pad_value=-128),
    "1x1-odd": dict(x=(3, 4, 7, 5), w=(23, 4, 1, 1)),
    "groups2-wide": dict(x=(1, 4, 4, 4), w=(230, 2, 3, 3), groups=2, padding=1, pad_value=1),  # M < N per group
    "kernel-equals-input": dict(x=(2, 3, 4, 1), w=(2, 3, 4, 1)),
}


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv2d_matches_oracle(rng, case):
    spec = dict(CONV_CASES[case])
    x, w = random_codes(rng, spec.pop("x")), random_codes(rng, spec.pop("w"))
    lut = random_lut(rng)
    out = lut_conv2d(x, w, lut, **spec)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), conv2d_oracle(x, w, lut, **spec))


def test_conv2d_unsigned_codes_and_pad_code(rng):
    lut = random_lut(rng)
    x = random_codes(rng, (2, 3, 6, 6), signed=False, dtype=torch.uint8)
    w = random_codes(rng, (4, 3, 3, 3), signed=False, dtype=torch.uint8)
    out = lut_conv2d(x, w, lut, padding=1, pad_value=200)
    np.testing.assert_array_equal(out.numpy(), conv2d_oracle(x, w, lut, padding=1, pad_value=200))


def test_conv2d_batch_chunks(rng):
    lut = random_lut(rng)
    engine = LutEngine(lut, unfold_elements=500)  # a few images per unfold chunk
    x, w = random_codes(rng, (7, 2, 5, 5)), random_codes(rng, (3, 2, 3, 3))
    out = lut_conv2d(x, w, engine, padding=1, pad_value=3)
    np.testing.assert_array_equal(out.numpy(), conv2d_oracle(x, w, lut, padding=1, pad_value=3))


@pytest.mark.skipif(native.load() is None, reason="needs a C++ toolchain")
@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_compiled_im2col_equals_the_window_view(rng, case):
    """The compiled im2col writes the values of the strided window view, for every conv option and
    each input it is given: codes held in floats, narrow integer codes, packed int32 / int64 words."""
    spec = CONV_CASES[case]
    kernel_size, groups = spec["w"][2:], spec.get("groups", 1)
    stride, dilation, padding = (_pair(spec.get(key, default)) for key, default in
                                 (("stride", 1), ("dilation", 1), ("padding", 0)))
    batch, channels, height, width = spec["x"]
    padded = (batch, channels, height + 2 * padding[0], width + 2 * padding[1])
    for source, out_dtype in [(torch.float32, torch.int32), (torch.int16, torch.int64), (torch.uint8, torch.int32),
                              (torch.int32, torch.int32), (torch.int64, torch.int64)]:
        x = torch.as_tensor(rng.integers(-2**31, 2**31, size=padded)).to(source)
        if source == torch.float32:
            x = x.remainder(256) - 128
        expected = grouped_rows(x, kernel_size, stride, dilation, groups)
        out = torch.full((expected.numel() + 5,), -1, dtype=out_dtype)
        rows = grouped_rows(x, kernel_size, stride, dilation, groups, out=out[:expected.numel()], kernel=native.load())
        assert torch.equal(rows, expected.to(out_dtype)), (source, out_dtype)
        assert (out[expected.numel():] == -1).all()  # nothing written past the rows


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_window_rows_backward_equals_autograd_through_the_view(rng, case):
    """grouped_rows' own backward (a strided slice add per kernel tap) gives the gradient autograd
    computes through the window view, for every conv option (integer upstream values: exact sums)."""
    spec = CONV_CASES[case]
    kernel_size, groups = spec["w"][2:], spec.get("groups", 1)
    stride, dilation, padding = (_pair(spec.get(key, default)) for key, default in
                                 (("stride", 1), ("dilation", 1), ("padding", 0)))
    batch, channels, height, width = spec["x"]
    x = torch.zeros((batch, channels, height + 2 * padding[0], width + 2 * padding[1]), dtype=torch.float64,
                    requires_grad=True)
    rows = grouped_rows(x, kernel_size, stride, dilation, groups)
    upstream = torch.as_tensor(rng.integers(-50, 50, size=rows.shape), dtype=torch.float64)
    (grad,) = torch.autograd.grad(rows, x, upstream)
    (expected,) = torch.autograd.grad(windows(x, kernel_size, stride, dilation, groups).reshape(rows.shape), x,
                                      upstream)
    assert rows.grad_fn is not None and torch.equal(grad, expected)


def test_conv2d_rejects_inconsistent_shapes(rng):
    lut = random_lut(rng)
    x = random_codes(rng, (1, 4, 5, 5))
    with pytest.raises(ValueError, match="groups"):
        lut_conv2d(x, random_codes(rng, (3, 2, 3, 3)), lut, groups=2)
    with pytest.raises(ValueError, match="too small"):
        lut_conv2d(x, random_codes(rng, (2, 4, 7, 7)), lut)
    with pytest.raises(ValueError, match="lut_conv2d"):
        lut_conv2d(x[0], random_codes(rng, (2, 4, 3, 3)), lut)


def _float_codes(rng, shape):
    return random_codes(rng, shape, dtype=torch.float32).requires_grad_(True)


def test_matmul_straight_through_gradients(rng, gather_path):
    lut = random_lut(rng)
    a, b = _float_codes(rng, (23, 19)), _float_codes(rng, (19, 7))
    out = lut_matmul(a, b, lut)
    assert out.dtype == torch.float64
    np.testing.assert_array_equal(out.detach().numpy(), matmul_oracle(a, b, lut))
    upstream = torch.randn(23, 7, dtype=torch.float64)
    out.backward(upstream)
    # the gradients of the exact product, computed in float32 like the codes
    torch.testing.assert_close(a.grad.double(), upstream @ b.detach().double().t(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b.grad.double(), a.detach().double().t() @ upstream, rtol=1e-5, atol=1e-3)


def test_conv_straight_through_gradients_include_the_pad_code(rng):
    lut = random_lut(rng)
    x, w = _float_codes(rng, (2, 4, 6, 5)), _float_codes(rng, (6, 2, 3, 3))
    out = lut_conv2d(x, w, lut, stride=(1, 2), padding=1, groups=2, pad_value=9)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    x2, w2 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    exact = F.conv2d(F.pad(x2, (1, 1, 1, 1), value=9.0), w2, stride=(1, 2), groups=2)
    exact.backward(upstream)
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-5, atol=1e-3)


def _smooth_lut() -> np.ndarray:
    """round(0.9 a b + 0.001 a^2 b) over signed codes: a smooth, nonlinear, asymmetric multiplier."""
    a = index_values(True)[:, None].astype(np.float64)
    b = index_values(True)[None, :].astype(np.float64)
    return np.round(0.9 * a * b + 0.001 * a * a * b).astype(np.int64)


def test_lut_gradients_match_finite_differences_of_the_op(rng):
    """grad='lut' follows the LUT's slope: compared with central differences of lut_matmul itself."""
    lut = _smooth_lut()
    m, k, n, h = 9, 6, 5, 3
    a_codes = torch.as_tensor(rng.integers(-120, 120, (m, k)), dtype=torch.float64)
    b_codes = torch.as_tensor(rng.integers(-120, 120, (k, n)), dtype=torch.float64)
    a, b = a_codes.clone().requires_grad_(True), b_codes.clone().requires_grad_(True)
    upstream = torch.randn(m, n, dtype=torch.float64)
    lut_matmul(a, b, lut, grad="lut").backward(upstream)

    fd_a, fd_b = torch.zeros(m, k, dtype=torch.float64), torch.zeros(k, n, dtype=torch.float64)
    for kk in range(k):  # column kk of a only reaches out through the products a[:, kk] * b[kk, :]
        step = torch.zeros(m, k, dtype=torch.float64)
        step[:, kk] = h
        slope = (lut_matmul(a_codes + step, b_codes, lut) - lut_matmul(a_codes - step, b_codes, lut)) / (2 * h)
        fd_a[:, kk] = (slope * upstream).sum(1)
        step = torch.zeros(k, n, dtype=torch.float64)
        step[kk] = h
        slope = (lut_matmul(a_codes, b_codes + step, lut) - lut_matmul(a_codes, b_codes - step, lut)) / (2 * h)
        fd_b[kk] = (slope * upstream).sum(0)
    # each LUT entry is rounded (error <= 0.5), so each slope is off by at most 1/(2h) + 1/4
    tol_a = upstream.abs().sum(1, keepdim=True) * (0.5 / h + 0.25)
    tol_b = upstream.abs().sum(0, keepdim=True) * (0.5 / h + 0.25)
    assert ((a.grad - fd_a).abs() <= tol_a).all()
    assert ((b.grad - fd_b).abs() <= tol_b).all()
    ste_a = upstream @ b_codes.t()  # the exact product's gradient misses the 0.9 and the a^2 term
    assert (a.grad - fd_a).abs().mean() < 0.2 * (ste_a - fd_a).abs().mean()


def test_lut_gradients_match_the_analytic_slope(rng):
    lut = _smooth_lut()
    a = torch.as_tensor(rng.integers(-126, 126, (15, 4)), dtype=torch.float32).requires_grad_(True)
    b = torch.as_tensor(rng.integers(-126, 126, (4, 3)), dtype=torch.float32).requires_grad_(True)
    lut_matmul(a, b, lut, grad="lut").sum().backward()
    av, bv = a.detach().double()[:, :, None], b.detach().double()[None]
    expected_a = (0.9 * bv + 0.002 * av * bv).sum(2)
    expected_b = (0.9 * av + 0.001 * av * av).sum(0).expand(4, 3)
    torch.testing.assert_close(a.grad.double(), expected_a, atol=3 * 0.3, rtol=0)
    torch.testing.assert_close(b.grad.double(), expected_b, atol=15 * 0.3, rtol=0)


@pytest.mark.parametrize("signed_a,signed_b", [(True, True), (False, True)])
def test_lut_gradients_of_the_exact_lut_equal_straight_through(rng, signed_a, signed_b):
    multiplier = Multiplier.exact(signed_a, signed_b)
    low_a = 0 if not signed_a else -128
    a_codes = torch.as_tensor(rng.integers(low_a, low_a + 256, (2, 3, 6, 6)), dtype=torch.float32)
    w_codes = random_codes(rng, (4, 3, 3, 3), dtype=torch.float32)
    upstream = None
    grads = {}
    for grad in ("ste", "lut"):
        x, w = a_codes.clone().requires_grad_(True), w_codes.clone().requires_grad_(True)
        out = lut_conv2d(x, w, multiplier, padding=1, pad_value=low_a + 3, grad=grad)
        upstream = torch.randn_like(out) if upstream is None else upstream
        out.backward(upstream)
        grads[grad] = (x.grad, w.grad)
    torch.testing.assert_close(grads["lut"], grads["ste"], rtol=1e-5, atol=1e-3)
    assert np.array_equal(multiplier.lut, exact_lut(signed_a, signed_b))


def test_integer_inputs_do_not_track_gradients(rng):
    out = lut_matmul(random_codes(rng, (3, 4)), random_codes(rng, (4, 2)), random_lut(rng), grad="lut")
    assert out.dtype == torch.int64 and not out.requires_grad
    with pytest.raises(ValueError, match="grad"):
        lut_matmul(random_codes(rng, (3, 4)), random_codes(rng, (4, 2)), random_lut(rng), grad="exact")
