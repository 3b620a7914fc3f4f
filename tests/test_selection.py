"""Selection math (approxrun.selection) against running the layer with the LUT on the same data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from approxrun.errors import ApproxrunError
from approxrun.layers import ApproxConv2d, ApproxLinear, record_operands
from approxrun.lut import code_to_index, exact_lut
from approxrun.multipliers import get_multiplier
from approxrun.multipliers.multiplier import Cost, Multiplier
from approxrun.selection import (choose, exact_candidate, exact_outputs, layer_sample, library_cost_kind, predicted_error_std,
                                 select_multipliers, tolerated_std)


def _random_error_multiplier(signed: bool, seed: int) -> Multiplier:
    """Exact product plus random errors whose mean depends on both operands, never symmetric."""
    rng = np.random.default_rng(seed)
    idx = np.arange(256)
    error = rng.integers(-300, 301, size=(256, 256)) + 40 * (idx[:, None] % 5) - 25 * (idx[None, :] % 3)
    assert not np.array_equal(error, error.T)
    return Multiplier("random", exact_lut(signed, signed) + error, *(2 * [Multiplier.exact(signed, signed).domain_a]),
                      cost=Cost(0.5, "proxy", "rel", "test"))


def _layer(kind: str, signed: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small calibrated layer and inputs whose activation zero point is nonzero."""
    torch.manual_seed(0)
    quantized_for = Multiplier.exact(signed, signed)
    if kind == "linear":
        layer = ApproxLinear(115, 23, multiplier=quantized_for)
        x = torch.relu(torch.randn(160, 115)) + 0.2 * torch.randn(160, 115)
    elif kind == "conv":
        layer = ApproxConv2d(3, 7, 3, stride=2, padding=1, multiplier=quantized_for)
        x = torch.relu(torch.randn(12, 3, 11, 11)) - 0.3
    else:  # grouped
        layer = ApproxConv2d(4, 8, 3, padding=1, groups=2, multiplier=quantized_for)
        x = torch.relu(torch.randn(8, 4, 9, 9)) - 0.3
    layer.train()
    layer.set_mode("quant")
    layer(x)  # calibrate the activation observer
    layer.eval()
    return layer, x


def _measure(layer, x, multiplier: Multiplier):
    """(std of the approx-minus-quant output, exact output without bias, the recorded operands)."""
    exact = layer.multiplier
    with torch.no_grad():
        with record_operands(layer) as records:
            quantized = layer(x)
        layer.set_multiplier(multiplier)
        layer.set_mode("approx")
        approximated = layer(x)
    layer.set_multiplier(exact)
    layer.set_mode("quant")
    return (approximated - quantized).double().std(correction=0).item(), quantized, records[""]


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
@pytest.mark.parametrize("design", ["random_signed", "random_unsigned", "perforated_0_2", "drum_4"])
def test_predicted_std_within_10_percent_of_running_the_layer(kind, design):
    signed = design != "random_unsigned"
    multiplier = _random_error_multiplier(signed, 7) if design.startswith("random") else get_multiplier(design)
    layer, x = _layer(kind, signed)
    measured, _, records = _measure(layer, x, multiplier)
    assert float(records[0].zp_a) != 0
    if not signed:
        assert float(records[0].zp_w) != 0  # unsigned weights are affine
    sample = layer_sample(records, rows=400, generator=torch.Generator().manual_seed(0))
    assert measured > 0
    assert predicted_error_std(sample, multiplier) == pytest.approx(measured, rel=0.10)


def test_output_std_is_the_exact_layer_output_without_bias():
    layer, x = _layer("conv", True)
    _, quantized, records = _measure(layer, x, get_multiplier("drum_4"))
    sample = layer_sample(records, rows=100)
    without_bias = quantized - layer.bias.reshape(1, -1, 1, 1)
    assert sample.output_std == pytest.approx(without_bias.double().std(correction=0).item(), rel=1e-5)
    assert tolerated_std(sample, -0.2) == pytest.approx(0.2 * sample.output_std)


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
def test_recorded_operands_reproduce_the_quantized_layer_output(kind):
    """Row/column layout of the recording: exact products of the recorded codes = the layer output."""
    layer, x = _layer(kind, True)
    _, quantized, records = _measure(layer, x, get_multiplier("drum_4"))
    exact = exact_outputs(records[0])  # [G, M, N/G], rows ordered (image, output position)
    groups, rows, per_group = exact.shape
    if kind == "linear":
        expected = (quantized - layer.bias).reshape(1, rows, per_group)
    else:
        batch = quantized.shape[0]
        expected = (quantized - layer.bias.reshape(1, -1, 1, 1)).reshape(batch, groups, per_group, -1)
        expected = expected.permute(1, 0, 3, 2).reshape(groups, rows, per_group)
    torch.testing.assert_close(exact, expected.double(), rtol=1e-5, atol=1e-5)


def _reference_pooled_std(records, multiplier: Multiplier, rows: int) -> float:
    """The reference's pooling: per-row histogram x global weight histogram, s_i and mu_i per row."""
    a = code_to_index(records[0].activations[0].long()).numpy()[:rows]
    w = code_to_index(records[0].weights[0].long()).numpy()
    p_w = np.bincount(w.ravel(), minlength=256) / w.size
    p_x = np.stack([np.bincount(row, minlength=256) / row.size for row in a])
    e = multiplier.error_table
    mu = p_x @ e @ p_w
    s2 = p_x @ (e**2) @ p_w - mu**2
    k = a.shape[1]
    return math.sqrt(k * s2.mean() + k**2 * mu.var()) * float(records[0].scale_a * records[0].scale_w)


def test_reference_pooling_overpredicts_where_the_mean_error_depends_on_the_activation():
    """Why selection.py does not pool as the reference does (see its module docstring)."""
    torch.manual_seed(1)
    layer = ApproxLinear(115, 23)
    x = torch.randn(300, 115)
    layer.train()
    layer.set_mode("quant")
    layer(x)
    layer.eval()
    multiplier = get_multiplier("perforated_0_2")  # error -x * (w & 3): mean error proportional to x
    measured, _, records = _measure(layer, x, multiplier)
    assert _reference_pooled_std(records, multiplier, 300) > 1.2 * measured
    assert predicted_error_std(layer_sample(records, rows=300), multiplier) == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("sigma", [0.0, 1e-6, 0.3, -0.4])
def test_exact_multiplier_always_fits(sigma):
    layer, x = _layer("linear", True)
    _, _, records = _measure(layer, x, get_multiplier("drum_4"))
    sample = layer_sample(records, rows=200)
    exact = get_multiplier("exact")
    assert predicted_error_std(sample, exact) == 0.0
    assert predicted_error_std(sample, exact) <= tolerated_std(sample, sigma)
    candidates = [get_multiplier(n) for n in ("drum_4", "truncated_8", "exact")]
    choice, = select_multipliers({"fc": sample}, {"fc": sigma}, {"fc": 1.0}, candidates, 0.425)
    assert choice.fits("exact")
    if sigma == 0.0:
        assert choice.chosen == "exact" and choice.relative_cost == 1.0


def test_choose_takes_the_cheapest_fitting_candidate():
    predicted = {"exact": 0.0, "a": 0.05, "b": 0.2, "c": 0.05}
    costs = {"exact": 1.0, "a": 0.6, "b": 0.3, "c": 0.6}
    assert choose(predicted, 0.25, costs, "exact") == "b"
    assert choose(predicted, 0.1, costs, "exact") == "a"  # tie on cost: smaller std, then name
    assert choose({"a": 0.3}, 0.1, {"a": 0.5}, "exact") == "exact"


def test_library_with_mixed_or_missing_costs_is_refused():
    proxy = get_multiplier("drum_4")
    power = Multiplier("published", exact_lut(), cost=Cost(0.2, "power", "mW", "catalogue"))
    with pytest.raises(ApproxrunError, match="mixes power .* and proxy") as info:
        library_cost_kind("mixed", [proxy, power])
    assert "\n" not in str(info.value)
    with pytest.raises(ApproxrunError, match="no cost known for mitchell"):
        library_cost_kind("nocost", [proxy, get_multiplier("mitchell")])
    assert library_cost_kind("builtin", [proxy, get_multiplier("exact")]) == "proxy"
    with pytest.raises(ApproxrunError, match="no exact multiplier"):
        exact_candidate("approximate_only", [proxy])
