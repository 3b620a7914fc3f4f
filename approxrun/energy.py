"""Opcount shares and relative energy: the one place that defines them.

A layer's opcount is its number of multiplications per sample (Linear: in*out; Conv2d:
kh*kw*(Cin/groups)*Cout*Hout*Wout, see the layers). Relative energy of a network is
sum_l share_l * cost_l / cost_exact, with published power (mW) relative to the exact multiplier's
power, or a proxy that is already relative to the exact multiplier.
"""

from __future__ import annotations

from approxrun.errors import ApproxrunError
from approxrun.multipliers.bundled import EXACT_CIRCUITS, Bundle
from approxrun.multipliers.multiplier import Multiplier


def opcount_shares(opcounts: dict[str, int]) -> dict[str, float]:
    total = sum(opcounts.values())
    return {name: count / total for name, count in opcounts.items()} if total else {}


def relative_cost(multiplier: Multiplier, exact_power_mw: float) -> float | None:
    """The multiplier's cost relative to the exact multiplier (None when no cost is known)."""
    cost = multiplier.cost
    if cost is None:
        return None
    return cost.value / exact_power_mw if cost.kind == "power" else cost.value


def relative_energy(shares: dict[str, float], multipliers: dict[str, Multiplier],
                    exact_power_mw: float) -> float | None:
    """sum_l share_l * relative cost of layer l's multiplier; None if any cost is unknown or kinds mix."""
    kinds = {m.cost.kind for m in multipliers.values() if m.cost is not None}
    if len(kinds) > 1:
        return None
    total = 0.0
    for name, share in shares.items():
        cost = relative_cost(multipliers[name], exact_power_mw)
        if cost is None:
            return None
        total += share * cost
    return total


def reference_power(configured: float | None, multiplier: Multiplier) -> float:
    """Power (mW) of the exact multiplier that relative energy divides by: ``energy.exact_power_mw``
    when set, else the published power of the exact EvoApproxLib circuit of the multiplier's kind
    (mul8s_1KV8 for signed operands, mul8u_1JFF for unsigned)."""
    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, (int, float)) or configured <= 0:
            raise ApproxrunError(f"energy.exact_power_mw={configured!r}: expected null or a power in mW > 0")
        return float(configured)
    exact = EXACT_CIRCUITS[multiplier.domain_a.signed or multiplier.domain_b.signed]
    entry = Bundle.packaged().lookup(exact)
    if entry is None:
        raise ApproxrunError(f"energy.exact_power_mw is null and the bundled catalogue lacks {exact}; set it")
    return float(entry["published"]["pdk45_pwr_mw"])
