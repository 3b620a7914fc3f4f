"""Multipliers: LUT objects, formula designs, LUT files.

``get_multiplier`` is the one entry point that turns a name or a file into a :class:`Multiplier`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from approxrun.errors import ApproxrunError
from approxrun.lut import OperandDomain
from approxrun.multipliers.designs import DESIGN_EXAMPLES, builtin_multiplier, is_builtin
from approxrun.multipliers.io import FORMATS, load_lut, save_lut
from approxrun.multipliers.multiplier import Cost, ErrorMetrics, Multiplier, compute_metrics

__all__ = ["Cost", "ErrorMetrics", "Multiplier", "compute_metrics", "builtin_multiplier", "load_lut",
           "save_lut", "load_multiplier", "get_multiplier", "resolve_multiplier", "FORMATS", "DESIGN_EXAMPLES"]


def load_multiplier(path: str | os.PathLike, fmt: str | None = None, signed: bool = True,
                    name: str | None = None, cost: Cost | None = None) -> Multiplier:
    """A multiplier from a LUT file (both operands of the given signedness, 8 bits)."""
    lut = load_lut(path, fmt, signed, signed)
    domain = OperandDomain(signed)
    return Multiplier(name or Path(path).stem, lut, domain, domain, cost=cost,
                      description=f"LUT file {path}")


def resolve_multiplier(spec: Mapping) -> Multiplier:
    """A multiplier from its config entry (``conf/multiplier/*.yaml``), a plain mapping:

    ``name`` (a built-in design, or the file's display name), ``signed`` (default true), ``path`` and
    ``format`` for a LUT file, and ``cost`` (value, kind, unit, source, area, delay) when known.
    A cost given here replaces the design's own (e.g. a published power figure).
    """
    name = spec.get("name")
    if not name:
        raise ApproxrunError("multiplier config: key 'name' is missing")
    signed = bool(spec.get("signed", True))
    cost = _cost(name, spec.get("cost"))
    if spec.get("path"):
        multiplier = load_multiplier(spec["path"], spec.get("format"), signed, name)
    else:
        multiplier = get_multiplier(name, signed)
    if cost is not None:
        multiplier.cost = cost
    return multiplier


def _cost(name: str, spec: Mapping | None) -> Cost | None:
    if not spec:
        return None
    try:
        return Cost(**dict(spec))
    except (TypeError, ValueError) as exc:
        raise ApproxrunError(f"multiplier {name!r}: bad cost entry {dict(spec)} ({exc})") from None


def get_multiplier(name: str, signed: bool = True) -> Multiplier:
    """Resolve a built-in design name or a LUT file path."""
    if is_builtin(name):
        return builtin_multiplier(name, signed)
    if Path(name).suffix.lower() in (".npy", ".txt", ".bin", ".lut"):
        return load_multiplier(name, signed=signed)
    raise ApproxrunError(f"unknown multiplier {name!r}: not a built-in design "
                         f"({', '.join(DESIGN_EXAMPLES)}, numbers are parameters) nor a LUT file")
