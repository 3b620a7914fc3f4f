"""Quantizers keep codes in the operand domain; observers; the exact zero-point correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from approxrun.lut import OperandDomain
from approxrun.quant import (
    ActivationQuantizer,
    Observer,
    WeightQuantizer,
    affine_qparams,
    dequantize,
    fake_quantize,
    quantize_codes,
    symmetric_qparams,
    zero_point_corrected,
)
from conftest import random_lut

DOMAINS = [OperandDomain(signed, bits) for bits in range(2, 9) for signed in (True, False)]


def _heavy_tailed(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 0.7 + torch.randn(shape, generator=g).pow(3)


def _assert_codes_in(codes: torch.Tensor, domain: OperandDomain) -> None:
    assert torch.equal(codes, codes.round())
    assert codes.min() >= domain.qmin and codes.max() <= domain.qmax


@pytest.mark.parametrize("domain", DOMAINS, ids=str)
@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile", "mse"])
def test_activation_codes_lie_in_the_domain(domain, observer):
    quantizer = ActivationQuantizer(domain, observer)
    for seed in range(3):  # later batches exceed the observed range: codes are clamped
        codes, scale, zp, _ = quantizer(_heavy_tailed((64, 9), seed) * (seed + 1))
        _assert_codes_in(codes, domain)
        assert domain.qmin <= zp <= domain.qmax and zp == zp.round() and scale > 0
        assert dequantize(zp, scale, zp) == 0  # real 0 has a code: zero padding is exact


@pytest.mark.parametrize("domain", DOMAINS, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_codes_lie_in_the_domain(domain, per_channel):
    quantizer = WeightQuantizer(domain, per_channel)
    w = _heavy_tailed((5, 3, 2, 2))
    w[2] = 0.0  # an all-zero channel must not divide by zero
    codes, scale, zp, _ = quantizer(w)
    _assert_codes_in(codes, domain)
    assert scale.shape == ((5,) if per_channel else ())
    assert torch.isfinite(scale).all() and (scale > 0).all()
    if domain.signed:  # symmetric: zero point 0, codes in [-qmax, qmax]
        assert not zp.any() and codes.min() >= -domain.qmax
    else:
        assert ((zp >= domain.qmin) & (zp <= domain.qmax)).all()


def test_per_channel_weights_use_each_channel_range():
    domain = OperandDomain(True, 8)
    w = torch.stack([torch.linspace(-1, 1, 10), torch.linspace(-0.01, 0.01, 10)])
    codes, scale, _, _ = WeightQuantizer(domain, per_channel=True)(w)
    torch.testing.assert_close(scale, torch.tensor([1 / 127, 0.01 / 127]))
    assert codes[1].abs().max() == 127  # the small channel still uses the full code range
    per_tensor, _, _, _ = WeightQuantizer(domain, per_channel=False)(w)
    assert per_tensor[1].abs().max() <= 2


def test_fake_quantization_is_straight_through_inside_the_range():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.26, 0.9, 5.0], requires_grad=True)
    scale, zp = torch.tensor(0.1), torch.tensor(3.0)
    codes = quantize_codes(x, scale, zp, -8, 7)
    assert codes.tolist() == [-8, -1, 3, 6, 7, 7]  # -3 and 5 clamp; 0.9 -> 12 clamps too
    codes.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 10.0, 10.0, 10.0, 0.0, 0.0]))


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fake_quantization_equals_the_composite_ops(per_channel):
    """fake_quantize's fused path: the codes and values of quantize_codes / dequantize bit for bit,
    and their straight-through gradients, for odd shapes, nonzero zero points and clamped inputs."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 3, 7, generator=g) * 3 + 0.4).requires_grad_()
    if per_channel:
        scale, zp = torch.rand(5, 1, 1, generator=g) * 0.05 + 0.01, torch.randint(-9, 12, (5, 1, 1)).float()
    else:
        scale, zp = torch.tensor(0.021), torch.tensor(-5.0)
    codes, values = fake_quantize(x, scale, zp, -64, 63)
    expected = quantize_codes(x.detach(), scale, zp, -64, 63)
    assert torch.equal(codes, expected) and torch.equal(values, dequantize(expected, scale, zp))
    clamped = (torch.round(x.detach() / scale) + zp < -64) | (torch.round(x.detach() / scale) + zp > 63)
    assert 0 < clamped.sum() < clamped.numel()  # both sides of the range are exercised
    weights = torch.randn(x.shape, generator=g)
    (codes * weights).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(clamped, 0.0, weights / scale))
    x.grad = None
    _, values = fake_quantize(x, scale, zp, -64, 63)
    (values * weights).sum().backward()
    assert torch.equal(x.grad, torch.where(clamped, 0.0, weights))


def test_affine_range_always_contains_zero():
    domain = OperandDomain(False, 8)
    scale, zp = affine_qparams(torch.tensor(2.0), torch.tensor(4.0), domain)  # widened to [0, 4]
    assert zp == 0 and scale == pytest.approx(4 / 255)
    scale, zp = affine_qparams(torch.tensor(-4.0), torch.tensor(-2.0), domain)
    assert zp == 255
    scale, zp = affine_qparams(torch.tensor(0.0), torch.tensor(0.0), domain)  # a dead input
    assert scale > 0 and zp == 0
    with pytest.raises(ValueError, match="signed"):
        symmetric_qparams(torch.tensor(1.0), domain)


def test_minmax_observer_keeps_running_extremes():
    observer = Observer("minmax")
    domain = OperandDomain(False)
    observer.update(torch.tensor([-1.0, 2.0]), domain)
    observer.update(torch.tensor([-0.5, 3.0]), domain)
    observer.update(torch.tensor([-2.0, 1.0]), domain)
    assert (observer.min_val.item(), observer.max_val.item()) == (-2.0, 3.0)


def test_ema_observer_moves_by_its_momentum():
    observer = Observer("ema", momentum=0.25)
    domain = OperandDomain(False)
    observer.update(torch.tensor([0.0, 4.0]), domain)
    observer.update(torch.tensor([-4.0, 8.0]), domain)
    assert observer.min_val.item() == pytest.approx(-1.0)
    assert observer.max_val.item() == pytest.approx(5.0)


def test_percentile_observer_ignores_rare_outliers():
    x = torch.linspace(-1, 1, 100_001)
    x[7] = 1000.0
    observer = Observer("percentile", percentile=99.9)
    observer.update(x, OperandDomain(True))
    assert observer.max_val < 1.0 and observer.min_val > -1.0
    assert observer.max_val > 0.99


def test_mse_observer_clips_to_lower_error_than_min_max():
    domain = OperandDomain(True, 4)
    x = _heavy_tailed((20_000,))
    mse, minmax = Observer("mse"), Observer("minmax")
    mse.update(x, domain)
    minmax.update(x, domain)
    assert x.min() * 1.0001 <= mse.min_val and mse.max_val <= x.max()

    def error(observer):
        scale, zp = affine_qparams(observer.min_val, observer.max_val, domain)
        return (dequantize(quantize_codes(x, scale, zp, domain.qmin, domain.qmax), scale, zp) - x).pow(2).mean()

    assert error(mse) < error(minmax)


def test_unknown_observer_is_rejected():
    with pytest.raises(ValueError, match="observer"):
        Observer("histogram")


def test_frozen_observer_and_eval_mode_stop_updates():
    quantizer = ActivationQuantizer(OperandDomain(False), "minmax")
    quantizer(torch.tensor([0.0, 1.0]))
    quantizer.eval()
    quantizer(torch.tensor([0.0, 10.0]))  # eval: uses the calibrated range
    assert quantizer.observer.max_val == 1.0
    quantizer.train()
    quantizer.observer.frozen.fill_(True)
    _, scale, _, _ = quantizer(torch.tensor([0.0, 10.0]))
    assert quantizer.observer.max_val == 1.0 and scale == pytest.approx(1 / 255)
    quantizer.observer.frozen.fill_(False)
    quantizer(torch.tensor([0.0, 10.0]))
    assert quantizer.observer.max_val == 10.0


def test_uninitialized_observer_calibrates_even_in_eval_mode():
    quantizer = ActivationQuantizer(OperandDomain(True), "ema").eval()
    quantizer(torch.tensor([-1.0, 3.0]))
    assert bool(quantizer.observer.initialized) and quantizer.observer.max_val == 3.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_zero_point_correction_matches_brute_force(rng, per_channel):
    """sum (a - za)(w - zw) from the multiplier's sum a*w; an approximate multiplier's error passes through."""
    m, k, n = 13, 23, 5
    a = rng.integers(0, 256, (m, k))  # unsigned activations, zero point 37
    w = rng.integers(0, 256, (k, n))  # unsigned (affine) weights
    za = 37
    zw = rng.integers(0, 256, n) if per_channel else np.int64(200)
    brute = ((a[:, :, None] - za) * (w[None] - zw)).sum(1)
    exact_acc = a @ w
    lut = random_lut(rng)
    approx_acc = lut[a[:, :, None], w[None]].sum(1)  # unsigned codes index the LUT directly

    def corrected(acc):
        return zero_point_corrected(torch.as_tensor(acc, dtype=torch.float64),
                                    torch.as_tensor(a.sum(1, keepdims=True), dtype=torch.float64),
                                    torch.as_tensor(w.sum(0), dtype=torch.float64), k,
                                    torch.tensor(float(za), dtype=torch.float64),
                                    torch.as_tensor(zw, dtype=torch.float64)).numpy()

    np.testing.assert_array_equal(corrected(exact_acc), brute)
    np.testing.assert_array_equal(corrected(approx_acc) - brute, approx_acc - exact_acc)


# --------------------------------------------------------------------------- activation schemes, PACT

def test_symmetric_activations_put_relu_outputs_on_codes_from_zero():
    from approxrun.lut import OperandDomain
    from approxrun.quant import ActivationQuantizer

    x = torch.relu(torch.linspace(-3, 5, 801))
    for signed, top in ((True, 127), (False, 255)):
        quantizer = ActivationQuantizer(OperandDomain(signed), "minmax", "symmetric")
        codes, scale, zp, _ = quantizer(x)
        assert float(zp) == 0 and codes.min() == 0 and codes.max() == top
        assert float(scale) == pytest.approx(5 / top)
    affine, _, zp, _ = ActivationQuantizer(OperandDomain(True), "minmax", "affine")(x)
    assert float(zp) == -128 and affine.min() == -128  # the ReLU zero on the lowest code


def test_symmetric_activations_with_negative_inputs():
    from approxrun.lut import OperandDomain
    from approxrun.quant import ActivationQuantizer

    x = torch.linspace(-2, 4, 601)
    codes, scale, zp, _ = ActivationQuantizer(OperandDomain(True), "minmax", "symmetric")(x)
    assert float(zp) == 0 and codes.min() == -64 and codes.max() == 127
    # unsigned operand: zero point 0 would clip the negative half away, so it keeps a zero point
    codes, scale, zp, _ = ActivationQuantizer(OperandDomain(False), "minmax", "symmetric")(x)
    assert float(zp) > 0 and codes.min() == 0 and codes.max() == 255


def test_pact_learns_its_clipping_range():
    from approxrun.lut import OperandDomain
    from approxrun.quant import ActivationQuantizer

    quantizer = ActivationQuantizer(OperandDomain(True), "pact", "symmetric")
    first = torch.relu(torch.linspace(-1, 2, 301))
    codes, scale, _, _ = quantizer(first)
    assert float(quantizer.alpha.detach()) == pytest.approx(2.0)
    assert float(scale.detach()) == pytest.approx(2 / 127, rel=1e-5)
    larger = torch.linspace(0, 4, 401, requires_grad=True)
    codes, scale, zp, _ = quantizer(larger)
    assert codes.max() == 127  # values above alpha are clipped
    ((codes - zp) * scale).sum().backward()
    assert quantizer.alpha.grad is not None and float(quantizer.alpha.grad) > 0  # clipped inputs pull alpha up
    assert "pact" in repr(quantizer)
