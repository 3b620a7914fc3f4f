"""Multipliers: LUT objects, formula designs, LUT files, EvoApproxLib C models.

:func:`get_multiplier` (a name or a file) and :func:`resolve_multiplier` (a config entry) are the
entry points that turn a name into a :class:`Multiplier`; both go through the packaged catalogue
(``conf/multiplier``) for names that have an entry there (:mod:`approxrun.multipliers.resolver`).
"""

from approxrun.multipliers.designs import DESIGN_EXAMPLES, builtin_multiplier
from approxrun.multipliers.io import FORMATS, LUT_SUFFIXES, load_lut, save_lut
from approxrun.multipliers.multiplier import Cost, ErrorMetrics, Multiplier, compute_metrics
from approxrun.multipliers.resolver import (AUTO, MultiplierResolver, get_multiplier, load_multiplier,
                                            resolve_multiplier, run_multiplier_spec)

__all__ = ["Cost", "ErrorMetrics", "Multiplier", "compute_metrics", "builtin_multiplier", "load_lut",
           "save_lut", "load_multiplier", "get_multiplier", "resolve_multiplier", "MultiplierResolver", "FORMATS",
           "LUT_SUFFIXES", "DESIGN_EXAMPLES", "AUTO", "run_multiplier_spec"]
