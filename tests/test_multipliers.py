"""Multiplier objects, error metrics and the built-in formula designs' self-checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from approxrun.errors import ApproxrunError
from approxrun.lut import OperandDomain, code_to_index, exact_lut
from approxrun.multipliers import (
    DESIGN_EXAMPLES,
    Cost,
    Multiplier,
    builtin_multiplier,
    compute_metrics,
    get_multiplier,
    resolve_multiplier,
)
from conftest import random_lut

EXACT_SETTINGS = ("exact", "truncated_0", "bam_0_0", "perforated_0_0", "perforated_3_0", "drum_8", "drum_9")
SIGN_MAGNITUDE = ("mitchell", "drum_4", "kulkarni", "roba")


def _product(multiplier: Multiplier, a: int, b: int) -> int:
    return int(multiplier.lut[code_to_index(a), code_to_index(b)])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("name", EXACT_SETTINGS)
def test_exact_settings_reproduce_the_exact_table(name, signed):
    multiplier = builtin_multiplier(name, signed)
    assert np.array_equal(multiplier.lut, exact_lut(signed, signed))
    assert multiplier.is_exact
    assert multiplier.metrics.wce == 0 and multiplier.metrics.ep_percent == 0


def test_signed_array_designs_use_an_exact_baugh_wooley_array():
    """Truncating nothing from the Baugh-Wooley array gives the exact signed product, -128 included."""
    multiplier = builtin_multiplier("truncated_0", signed=True)
    assert _product(multiplier, -128, -128) == 16384
    assert _product(multiplier, -128, 127) == -16256
    assert _product(multiplier, -1, -1) == 1


@pytest.mark.parametrize("signed", [True, False])
def test_mitchell_never_overestimates(signed):
    multiplier = builtin_multiplier("mitchell", signed)
    exact = exact_lut(signed, signed)
    approx = multiplier.lut
    assert (np.abs(approx) <= np.abs(exact)).all()
    assert (approx * exact >= 0).all()  # never the wrong sign
    nonzero = exact != 0
    worst = ((np.abs(exact) - np.abs(approx))[nonzero] / np.abs(exact[nonzero])).max()
    assert worst == pytest.approx(1 / 9)  # the published 11.1 % worst case (3 x 3 -> 8)
    assert _product(multiplier, 3, 3) == 8


def test_kulkarni_never_overestimates_unsigned():
    multiplier = builtin_multiplier("kulkarni", signed=False)
    exact = exact_lut(False, False)
    assert (multiplier.lut <= exact).all()
    assert _product(multiplier, 3, 3) == 7  # the 2x2 building block's only error
    assert _product(multiplier, 2, 3) == 6
    assert multiplier.metrics.wce > 0


def _relative_bias(multiplier: Multiplier) -> float:
    exact = exact_lut(multiplier.domain_a.signed, multiplier.domain_b.signed)
    return abs(multiplier.metrics.error_mean) / np.abs(exact).mean()


@pytest.mark.parametrize("signed", [True, False])
def test_drum_is_nearly_unbiased(signed):
    for name in ("drum_4", "drum_6"):
        assert _relative_bias(builtin_multiplier(name, signed)) < 0.01
    # one-sided designs of similar accuracy are clearly biased (for unsigned operands)
    if not signed:
        assert _relative_bias(builtin_multiplier("mitchell", signed)) > 0.03
        assert _relative_bias(builtin_multiplier("kulkarni", signed)) > 0.03


def test_drum_keeps_small_operands_exact_and_rounds_large_ones():
    drum = builtin_multiplier("drum_4", signed=False)
    assert _product(drum, 15, 15) == 225
    # 200 = 0b11001000 -> top 4 bits 1100, lowest kept bit forced to 1: 1101 << 4 = 208
    assert _product(drum, 200, 1) == 208


def test_roba_rounds_operands_to_powers_of_two():
    roba = builtin_multiplier("roba", signed=False)
    # 3 -> 4 (midpoint rounds up), 5 -> 4: 4*5 + 4*3 - 4*4
    assert _product(roba, 3, 5) == 16
    assert _product(roba, 8, 77) == 8 * 77  # a power of two is exact


def test_perforation_clears_partial_product_rows():
    perforated = builtin_multiplier("perforated_1_2", signed=False)
    assert _product(perforated, 100, 0b1111) == 100 * 0b1001
    signed = builtin_multiplier("perforated_0_1", signed=True)
    assert _product(signed, 7, -1) == 7 * -2  # -1 = 0xFF -> 0xFE = -2


@pytest.mark.parametrize("k", [2, 5, 7])
def test_truncation_only_drops_bits(k):
    truncated = builtin_multiplier(f"truncated_{k}", signed=False)
    exact = exact_lut(False, False)
    assert (truncated.lut <= exact).all()
    assert ((exact - truncated.lut) < 2 ** k * k).all()
    assert np.array_equal(builtin_multiplier(f"bam_0_{k}", signed=False).lut, truncated.lut)


def test_truncation_correction_reduces_the_bias():
    plain = builtin_multiplier("truncated_6", signed=False).metrics.error_mean
    corrected = builtin_multiplier("truncated_6_c", signed=False).metrics.error_mean
    assert plain < 0 and abs(corrected) < abs(plain)


@pytest.mark.parametrize("name", SIGN_MAGNITUDE)
def test_sign_magnitude_designs_are_odd(name):
    multiplier = builtin_multiplier(name, signed=True)
    unsigned = builtin_multiplier(name, signed=False)
    for a, b in [(5, 7), (100, 3), (127, 127), (128, 77)]:
        magnitude = int(unsigned.lut[a, b])
        if a < 128:
            assert _product(multiplier, a, b) == magnitude
            assert _product(multiplier, -a, b) == -magnitude
            assert _product(multiplier, -a, -b) == magnitude
        else:  # |-128| = 128 uses the unsigned design's 128 row
            assert _product(multiplier, -128, b) == -magnitude


@pytest.mark.parametrize("name", DESIGN_EXAMPLES)
@pytest.mark.parametrize("signed", [True, False])
def test_every_example_design_builds_with_metrics_and_honest_cost(name, signed):
    multiplier = get_multiplier(name, signed)
    assert multiplier.lut.shape == (256, 256) and multiplier.lut.dtype == np.int64
    assert multiplier.domain_a == multiplier.domain_b == OperandDomain(signed)
    metrics = multiplier.metrics.as_dict()
    assert all(math.isfinite(v) for v in metrics.values())
    if multiplier.cost is not None:
        assert multiplier.cost.kind == "proxy"
        assert "mW" not in multiplier.cost.unit and "proxy" in str(multiplier.cost)


def test_metrics_on_a_hand_made_one_bit_lut():
    """Operands 0/1: exact products 0,0,0,1; the LUT has errors +1 at (0,1) and +2 at (1,1)."""
    domain = OperandDomain(signed=False, bits=1)
    lut = exact_lut(False, False).copy()
    lut[0, 1] = 1
    lut[1, 1] = 3
    lut[200, 200] = 999  # outside the 1-bit domain: ignored
    metrics = compute_metrics(lut, domain, domain)
    assert metrics.mae == pytest.approx(0.75)
    assert metrics.mae_percent == pytest.approx(0.75 / 4 * 100)
    assert metrics.wce == 2 and metrics.wce_percent == pytest.approx(50.0)
    assert metrics.ep_percent == pytest.approx(50.0)
    assert metrics.mre_percent == pytest.approx(2 / 1 * 100)  # EvoApproxLib: over non-zero exact products only
    assert metrics.mse == pytest.approx(1.25)
    assert metrics.error_mean == pytest.approx(0.75)
    assert metrics.error_std == pytest.approx(math.sqrt(1.25 - 0.75**2))


def test_multiplier_properties_on_a_narrow_domain():
    domain = OperandDomain(signed=True, bits=4)
    lut = exact_lut().copy()
    lut[code_to_index(-100), code_to_index(3)] += 5  # outside the 4-bit domain
    multiplier = Multiplier("narrow", lut, domain, domain)
    assert multiplier.is_exact and multiplier.metrics.ep_percent == 0
    lut[code_to_index(-8), code_to_index(7)] += 5  # the caller's array stays writable ...
    assert multiplier.lut[code_to_index(-8), code_to_index(7)] == -56  # ... and the multiplier kept a copy
    changed = Multiplier("narrow", lut, domain, domain)
    assert not changed.is_exact and not changed.is_symmetric
    assert changed.metrics.wce == 5
    assert changed.error_table[code_to_index(-8), code_to_index(7)] == 5


def test_multiplier_rejects_bad_tables(rng):
    with pytest.raises(ValueError, match="shape"):
        Multiplier("bad", np.zeros((255, 256), dtype=np.int64))
    with pytest.raises(ValueError, match="dtype"):
        Multiplier("bad", np.zeros((256, 256)))
    with pytest.raises(ValueError, match="int32"):
        Multiplier("bad", np.full((256, 256), 2**31, dtype=np.int64))
    multiplier = Multiplier("random", random_lut(rng))
    assert not multiplier.lut.flags.writeable and not multiplier.is_symmetric


def test_unknown_names_are_user_errors():
    with pytest.raises(ApproxrunError, match="nonsense_3"):
        get_multiplier("nonsense_3")
    with pytest.raises(KeyError):
        builtin_multiplier("nonsense_3")
    with pytest.raises(ApproxrunError, match="name"):
        resolve_multiplier({"signed": True})


def test_resolve_multiplier_applies_a_configured_cost():
    multiplier = resolve_multiplier({"name": "drum_6", "signed": False,
                                     "cost": {"value": 0.3, "kind": "power", "unit": "mW", "source": "paper"}})
    assert multiplier.cost == Cost(0.3, "power", "mW", "paper")
    assert multiplier.domain_a == OperandDomain(False)
    with pytest.raises(ApproxrunError, match="drum_6"):
        resolve_multiplier({"name": "drum_6", "cost": {"value": 1, "kind": "watts", "unit": "W", "source": "x"}})
