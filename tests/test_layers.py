"""Approximate layers (modes, zero points, padding modes, noise), model conversion and state_dict."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import approxrun
from approxrun.layers import (
    ApproxConv2d,
    ApproxLayer,
    ApproxLinear,
    approx_layers,
    approximate,
    count_ops,
    freeze_quantizers,
    set_mode,
    set_multiplier,
)
from approxrun.lut import OperandDomain, exact_lut
from approxrun.multipliers import Multiplier, get_multiplier
from conftest import conv2d_oracle, matmul_oracle, random_lut

EXACT_MULTIPLIERS = {
    "int8xint8": Multiplier.exact(True, True),
    "uint8xint8": Multiplier.exact(False, True),
    "uint8xuint8": Multiplier.exact(False, False),
}


def _calibrated(layer: ApproxLayer, x: torch.Tensor) -> ApproxLayer:
    """Observe ``x`` once in training mode, then freeze the observer: every mode sees the same ranges."""
    layer.train()
    layer.set_mode("quant")
    with torch.no_grad():
        layer(x)
    layer.act_quant.observer.frozen.fill_(True)
    return layer


def _run(layer: ApproxLayer, mode: str, x: torch.Tensor):
    """Output and gradients (input, weight, bias) of one forward/backward in ``mode``."""
    layer.set_mode(mode)
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    bias_grad = None if layer.bias is None else layer.bias.grad.clone()
    return y.detach(), x.grad, layer.weight.grad.clone(), bias_grad


def _assert_modes_agree(layer: ApproxLayer, x: torch.Tensor) -> None:
    quant, approx = _run(layer, "quant", x), _run(layer, "approx", x)
    for q, a in zip(quant, approx):
        if q is not None:
            torch.testing.assert_close(a, q, rtol=1e-4, atol=1e-5)


def _shifted_input(*shape, seed=0) -> torch.Tensor:
    """Inputs whose range is not centred on 0, so the activation zero point is not trivial."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 3 - 0.6


@pytest.mark.parametrize("multiplier", EXACT_MULTIPLIERS, ids=list(EXACT_MULTIPLIERS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_exact_lut_approx_equals_quant(multiplier, per_channel):
    torch.manual_seed(0)
    layer = ApproxLinear(23, 7, multiplier=EXACT_MULTIPLIERS[multiplier], per_channel=per_channel)
    x = _shifted_input(2, 3, 23)  # leading dims
    _calibrated(layer, x)
    assert layer.act_quant(x)[2] != 0
    _assert_modes_agree(layer, x)


CONV_LAYERS = {
    "zeros": dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    "reflect": dict(in_channels=3, out_channels=4, kernel_size=(3, 2), padding=(1, 2), padding_mode="reflect"),
    "circular": dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, dilation=2, padding_mode="circular"),
    "replicate-stride": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1,
                             padding_mode="replicate"),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=(1, 3), padding=(0, 1), groups=2, bias=False),
    "depthwise": dict(in_channels=5, out_channels=5, kernel_size=3, padding=1, groups=5),
    "depthwise-x2-reflect": dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=1, groups=3,
                                 padding_mode="reflect"),
    "same-uneven": dict(in_channels=3, out_channels=4, kernel_size=(4, 3), padding="same", dilation=(1, 2)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on the uneven 'same' padding
@pytest.mark.parametrize("multiplier", ["int8xint8", "uint8xuint8"])
@pytest.mark.parametrize("case", CONV_LAYERS, ids=list(CONV_LAYERS))
def test_conv_exact_lut_approx_equals_quant(case, multiplier):
    torch.manual_seed(1)
    layer = ApproxConv2d(**CONV_LAYERS[case], multiplier=EXACT_MULTIPLIERS[multiplier],
                         per_channel=multiplier == "uint8xuint8")
    x = _shifted_input(2, layer.in_channels, 7, 6)
    _calibrated(layer, x)
    _assert_modes_agree(layer, x)


def _centred_conv(codes_a, za, codes_w, zw, layer):
    """Exact convolution of (a - za) and (w - zw) in float64: the quantized product with no multiplier."""
    zw = zw.reshape(-1, 1, 1, 1) if zw.dim() else zw
    return F.conv2d((codes_a - za).double(), (codes_w - zw).double(), stride=layer.stride,
                    dilation=layer.dilation, groups=layer.groups)


@pytest.mark.parametrize("case", ["zeros", "reflect", "groups", "depthwise-x2-reflect", "circular",
                                  "replicate-stride"])
@pytest.mark.parametrize("lut_kind", ["random", "drum_4", "truncated_4", "unsigned drum_4"])
def test_conv_approx_mode_matches_an_independent_oracle(rng, case, lut_kind):
    """approx = scale * (LUT conv - exact conv + centred exact conv), with an asymmetric random LUT
    (the gather) or low-rank designs (map-then-conv, int8 GEMMs); signed weights have zero point 0,
    unsigned ones (affine, per channel) nonzero zero points."""
    torch.manual_seed(2)
    signed = not lut_kind.startswith("unsigned")
    name = lut_kind.split()[-1]
    lut = random_lut(rng, -(2**14), 2**14) if name == "random" else get_multiplier(name, signed).lut
    domain = OperandDomain(signed)
    layer = ApproxConv2d(**CONV_LAYERS[case], multiplier=Multiplier(name, lut, domain, domain),
                         per_channel=not signed)
    x = _shifted_input(2, layer.in_channels, 7, 6)
    _calibrated(layer, x).set_mode("approx")
    with torch.no_grad():
        y = layer(x)
        codes_a, scale_a, za, _ = layer.act_quant(x)
        codes_w, scale_w, zw, _ = layer.weight_quant(layer.weight)
    assert za != 0 and (signed or zw.count_nonzero() > 0)  # the zero-point corrections are exercised
    pad = layer._reversed_padding_repeated_twice
    padded = F.pad(codes_a, pad, value=float(za)) if layer.padding_mode == "zeros" else \
        F.pad(codes_a, pad, mode=layer.padding_mode)
    options = dict(stride=layer.stride, dilation=layer.dilation, groups=layer.groups)
    by_lut = conv2d_oracle(padded.long(), codes_w.long(), lut, **options)
    exact = conv2d_oracle(padded.long(), codes_w.long(), exact_lut(signed, signed), **options)
    acc = by_lut - exact + _centred_conv(padded, za, codes_w, zw, layer).numpy()
    expected = acc * float(scale_a) * scale_w.double().numpy().reshape(1, -1, 1, 1)
    if layer.bias is not None:
        expected = expected + layer.bias.detach().double().numpy().reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lut_kind", ["random", "drum_4", "kulkarni"])
def test_linear_approx_mode_matches_an_independent_oracle(rng, lut_kind):
    torch.manual_seed(3)
    lut = random_lut(rng, -(2**14), 2**14) if lut_kind == "random" else get_multiplier(lut_kind, False).lut
    layer = ApproxLinear(23, 5, multiplier=Multiplier(lut_kind, lut, OperandDomain(False), OperandDomain(False)),
                         per_channel=True)
    x = _shifted_input(4, 23)
    _calibrated(layer, x).set_mode("approx")
    with torch.no_grad():
        y = layer(x)
        codes_a, scale_a, za, _ = layer.act_quant(x)
        codes_w, scale_w, zw, _ = layer.weight_quant(layer.weight)
    assert za != 0 and zw.count_nonzero() == zw.numel()
    a, w = codes_a.double(), codes_w.double().t()  # [M, K], [K, N]
    approx_error = matmul_oracle(a.long(), w.long(), lut) - (a @ w).numpy()
    centred = ((a - za) @ (w - zw[None, :])).numpy()
    expected = (approx_error + centred) * float(scale_a) * scale_w.double().numpy() + layer.bias.detach().numpy()
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_lut_gradient_layer_with_exact_multiplier_equals_straight_through():
    torch.manual_seed(4)
    x = _shifted_input(6, 11)
    results = []
    for grad in ("ste", "lut"):
        torch.manual_seed(4)
        layer = _calibrated(ApproxLinear(11, 3, grad=grad), x)
        results.append(_run(layer, "approx", x))
    for ste, lut in zip(*results):
        torch.testing.assert_close(lut, ste, rtol=1e-5, atol=1e-6)


def test_noise_mode_statistics_and_sigma_gradient():
    torch.manual_seed(5)
    layer = ApproxLinear(64, 32, bias=False, initial_noise=0.3)
    x = torch.randn(4096, 64)
    _calibrated(layer, x)
    with torch.no_grad():
        clean = layer(x)
        layer.set_mode("noise")
        noisy = layer(x)
    noise = noisy - clean
    assert noise.mean().abs() < 0.01 * clean.std()
    assert (noise.std() / clean.std()).item() == pytest.approx(0.3, rel=0.03)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), clean)  # no noise in eval
    layer.train()
    layer(x).pow(2).mean().backward()
    assert layer.sigma.grad is not None and layer.sigma.grad != 0


def test_modes_and_dtypes():
    layer = ApproxLinear(5, 2)
    x = torch.randn(3, 5)
    float_out = layer(x)
    torch.testing.assert_close(float_out, F.linear(x, layer.weight, layer.bias))
    for mode in ("quant", "noise", "approx"):
        layer.set_mode(mode)
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="mode"):
        layer.set_mode("exact")


def test_fan_in_and_opcount():
    conv = ApproxConv2d(6, 4, (3, 2), stride=2, groups=2)
    assert conv.fan_in == 3 * 3 * 2 and conv.opcount is None
    conv(torch.randn(1, 6, 9, 8))  # output 4 x 4
    assert conv.opcount == conv.fan_in * 4 * 4 * 4
    linear = ApproxLinear(10, 3)
    assert linear.fan_in == 10 and linear.opcount == 30
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    approximate(model)
    assert count_ops(model, torch.randn(1, 3, 6, 6)) == {"0": 27 * 4 * 16, "2": 64 * 2}


def test_narrower_quantizers_use_fewer_codes():
    layer = ApproxLinear(8, 4, bits_a=3, bits_b=4, multiplier=get_multiplier("drum_4", signed=False))
    assert layer.act_quant.domain == OperandDomain(False, 3)
    assert layer.weight_quant.domain == OperandDomain(False, 4)
    layer.set_mode("approx")
    layer(_shifted_input(5, 8))
    codes = layer.act_quant(_shifted_input(5, 8)).codes
    assert codes.max() <= 7
    layer.set_multiplier(Multiplier.exact())
    assert layer.act_quant.domain == OperandDomain(True, 3)
    with pytest.raises(ValueError, match="bits"):
        ApproxLinear(8, 4, bits_a=9)


def _small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3, padding_mode="reflect"), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 4),
    )


def test_conversion_keeps_weights_and_skips_what_it_is_told():
    torch.manual_seed(6)
    model = _small_model()
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    original_linear = model[5]
    approximate(model, skip=["5"])
    assert model[5] is original_linear and type(model[5]) is nn.Linear
    assert [name for name, _ in approx_layers(model)] == ["0", "2"]
    torch.testing.assert_close(model(x), before)  # float mode is the original model
    approximate(model)  # converting again only converts what is left
    assert [name for name, _ in approx_layers(model)] == ["0", "2", "5"]


def test_resnet18_skip_patterns():
    model = approximate(torchvision.models.resnet18(), skip=["conv1", "fc", "layer4.*"])
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert type(model.layer4[0].conv1) is nn.Conv2d and type(model.layer4[0].downsample[0]) is nn.Conv2d
    assert isinstance(model.layer3[1].conv2, ApproxConv2d)
    assert len(approx_layers(model)) == 20 - 1 - 5  # 20 convs, minus conv1 and layer4's five
    assert [n for n, _ in approx_layers(model, ["layer1.*"])] == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]


def test_set_mode_and_multiplier_for_some_layers():
    model = approximate(_small_model())
    set_mode(model, "quant")
    set_mode(model, "approx", names=["2"])
    assert [layer.mode for _, layer in approx_layers(model)] == ["quant", "approx", "quant"]
    unsigned = get_multiplier("mitchell", signed=False)
    set_multiplier(model, unsigned, names=["0", "5"])
    assert model[0].multiplier is unsigned and model[2].multiplier.name == "exact"
    assert model[5].act_quant.domain == OperandDomain(False) and model[5].weight_quant.domain == OperandDomain(False)


@pytest.mark.parametrize("builder", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_runs_forward_and_backward_in_approx_mode(builder):
    torch.manual_seed(7)
    model = approximate(getattr(torchvision.models, builder)(num_classes=10), multiplier=get_multiplier("drum_4"))
    if builder == "mobilenet_v2":
        assert any(layer.groups > 1 and layer.groups == layer.in_channels
                   for _, layer in approx_layers(model) if isinstance(layer, ApproxConv2d))
    x = torch.randn(2, 3, 16, 16)  # the last stages run at 1x1
    set_mode(model, "quant")
    model.train()
    quant = model(x).detach()
    set_mode(model, "approx")
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert not torch.allclose(y, quant)  # the approximate multiplier was used
    F.cross_entropy(y, torch.tensor([1, 2])).backward()
    for _, layer in approx_layers(model):
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_state_dict_round_trips_into_a_freshly_converted_model():
    torch.manual_seed(8)
    multiplier = get_multiplier("drum_6")
    model = approximate(_small_model(), multiplier=multiplier, observer="minmax")
    set_mode(model, "approx")
    set_mode(model, "noise", names=["5"])
    model.train()
    for seed in range(3):
        model(_shifted_input(4, 3, 5, 5, seed=seed))
    freeze_quantizers(model)
    with torch.no_grad():
        model[2].sigma.fill_(0.37)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)

    fresh = approximate(_small_model(), multiplier=multiplier, observer="minmax")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (name, old), (_, new) in zip(approx_layers(model), approx_layers(fresh)):
        assert new.mode == old.mode, name
        assert torch.equal(new.sigma, old.sigma)
        for buffer in ("min_val", "max_val", "initialized", "frozen"):
            assert torch.equal(getattr(new.act_quant.observer, buffer), getattr(old.act_quant.observer, buffer))
    assert fresh[2].sigma.item() == pytest.approx(0.37) and fresh[5].mode == "noise"
    model.eval()
    fresh.eval()
    x = _shifted_input(3, 3, 5, 5, seed=9)
    assert torch.equal(fresh(x), model(x))


def test_public_api_exports_the_layers():
    assert approxrun.ApproxLinear is ApproxLinear and approxrun.approximate is approximate
    assert set(approxrun.MODES) == {"float", "quant", "noise", "approx"}
