"""The LUT index convention (lut[activation byte][weight byte]) and that every path follows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from approxrun.layers import ApproxConv2d, ApproxLinear
from approxrun.lut import (
    OperandDomain,
    byte_to_numeric_order,
    code_to_index,
    exact_lut,
    index_values,
    numeric_to_byte_order,
)
from approxrun.multipliers import Multiplier
from approxrun.ops import lut_conv2d, lut_matmul
from conftest import random_codes, random_lut


def test_signed_codes_index_by_twos_complement_byte():
    codes = [0, 1, 127, -128, -127, -1]
    expected = [0, 1, 127, 128, 129, 255]
    assert code_to_index(np.array(codes)).tolist() == expected
    assert code_to_index(torch.tensor(codes, dtype=torch.int8)).tolist() == expected
    assert code_to_index(torch.tensor(codes, dtype=torch.float32)).tolist() == expected
    assert code_to_index(-1) == 255


def test_unsigned_codes_index_by_value():
    codes = torch.arange(256)
    assert torch.equal(code_to_index(codes.to(torch.uint8)), codes)
    assert torch.equal(code_to_index(codes), codes)


def test_index_values_invert_code_to_index():
    for signed in (True, False):
        values = index_values(signed)
        assert np.array_equal(code_to_index(values), np.arange(256))
    assert index_values(True)[128] == -128 and index_values(True)[255] == -1
    assert index_values(False)[255] == 255


def test_exact_lut_rows_are_operand_a():
    lut = exact_lut(signed_a=False, signed_b=True)
    assert lut[code_to_index(200), code_to_index(-3)] == -600
    assert lut[code_to_index(-3) & 0xFF, code_to_index(5)] == 253 * 5  # unsigned A reads byte 253
    signed = exact_lut()
    assert signed[code_to_index(-128), code_to_index(-128)] == 16384
    assert signed[code_to_index(-7), code_to_index(9)] == -63


@pytest.mark.parametrize("signed_a,signed_b", [(True, True), (False, True), (True, False), (False, False)])
def test_numeric_order_round_trip(rng, signed_a, signed_b):
    lut = random_lut(rng)
    numeric = byte_to_numeric_order(lut, signed_a, signed_b)
    assert np.array_equal(numeric_to_byte_order(numeric, signed_a, signed_b), lut)
    # numeric row r holds the smallest code + r of operand A
    first_a = -128 if signed_a else 0
    first_b = -128 if signed_b else 0
    assert numeric[0, 0] == lut[code_to_index(first_a), code_to_index(first_b)]
    assert numeric[255, 3] == lut[code_to_index(first_a + 255), code_to_index(first_b + 3)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_operand_domain_ranges(bits):
    signed, unsigned = OperandDomain(True, bits), OperandDomain(False, bits)
    assert (signed.qmin, signed.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)
    assert len(signed.values()) == len(unsigned.values()) == 2**bits


def test_operand_domain_rejects_bad_widths():
    with pytest.raises(ValueError):
        OperandDomain(True, 9)
    with pytest.raises(ValueError):
        OperandDomain(True, 0)
    with pytest.raises(ValueError):
        OperandDomain(True, 4).narrowed(6)
    assert OperandDomain(False, 8).narrowed(3) == OperandDomain(False, 3)


def test_matmul_and_conv_read_the_lut_the_same_way(rng):
    """A 1x1 convolution is a matmul: with an asymmetric LUT both must index lut[act][weight]."""
    lut = random_lut(rng)
    a = random_codes(rng, (23, 7))  # [M, K] activations
    b = random_codes(rng, (7, 5))  # [K, N] weights
    by_matmul = lut_matmul(a, b, lut)
    x = a.t().reshape(1, 7, 23, 1)  # channels = K, positions = M
    w = b.t().reshape(5, 7, 1, 1)
    by_conv = lut_conv2d(x, w, lut)[0, :, :, 0].t()
    assert torch.equal(by_matmul, by_conv)
    transposed = lut_matmul(a, b, lut.T.copy())
    assert not torch.equal(by_matmul, transposed)


def test_depthwise_and_grouped_paths_read_the_lut_the_same_way(rng):
    lut = random_lut(rng)
    x = random_codes(rng, (2, 4, 5, 6))
    w = random_codes(rng, (4, 1, 3, 3))
    depthwise = lut_conv2d(x, w, lut, groups=4)  # one output per group
    doubled = lut_conv2d(x, torch.cat([w, w], 1).reshape(8, 1, 3, 3), lut, groups=4)  # two per group
    assert torch.equal(depthwise, doubled[:, ::2])


def _activation_only_multiplier() -> Multiplier:
    """lut[i][j] = value of activation code i: the product ignores the weight entirely."""
    lut = np.repeat(index_values(True)[:, None], 256, axis=1)
    return Multiplier("act_only", lut)


def test_layers_pass_activations_as_operand_a():
    """With lut[a][w] = a the layer output is the sum of activation codes, whatever the weights."""
    multiplier = _activation_only_multiplier()
    torch.manual_seed(0)
    linear = ApproxLinear(6, 3, bias=False, multiplier=multiplier)
    conv = ApproxConv2d(6, 3, 1, bias=False, multiplier=multiplier)
    conv.weight.data.copy_(linear.weight.data.reshape(3, 6, 1, 1))
    x = torch.rand(4, 6) * 2 - 0.5
    for layer in (linear, conv):
        layer.set_mode("approx")
        layer.eval()
    y_linear = linear(x)
    y_conv = conv(x.reshape(4, 6, 1, 1)).reshape(4, 3)
    torch.testing.assert_close(y_linear, y_conv)
    codes, scale, zp, _ = linear.act_quant(x)
    w_codes, w_scale, w_zp, _ = linear.weight_quant(linear.weight)
    acc = codes.sum(1, keepdim=True)  # what the multiplier returns for every output
    expected = (acc - w_zp * codes.sum(1, keepdim=True) - zp * w_codes.sum(1) + 6 * zp * w_zp) * scale * w_scale
    torch.testing.assert_close(y_linear, expected.to(y_linear.dtype))
