"""Exact low-rank LUT GEMMs: a LUT GEMM as one dense GEMM over a few factor maps.

For most approximate multipliers the error ``E = lut - exact product`` has a tiny rank ``r``
(DRUM: 2, truncation of ``k`` columns: ``k``, EvoApproxLib mul8s circuits: 1-4 as reported). An
exact integer factorization ``D * lut = x @ y.T`` turns the LUT GEMM into

    out[m, n] = sum_k lut[a_mk, b_kn] = sum_k sum_i x_i(a_mk) y_i(b_kn) / D,

a dense GEMM over ``K * (r + 1)`` columns of 256-entry maps gathered by byte index; it covers all
256x256 byte indices, so every code gives the LUT's own value. Exactness is proven per call from
the factors' bounds (see :mod:`.plans`), never hoped for.

The package follows the steps a table goes through:

- :mod:`.factor`: exact integer factorization (numpy only);
- :mod:`.tables`: the factored table and its forms (float maps, map-then-conv maps, packed int8 maps);
- :mod:`.calibration`: the machine's costs of every primitive and the route model built on them;
- :mod:`.measurement`: measuring those costs (about a second, cached per machine key);
- :mod:`.plans`: the exact plans of one GEMM shape and their modelled times;
- :mod:`.executors`: the torch code that runs a plan (GEMMs, convolutions, backward).

The owner of all of it for one table, and of the route choice, is
:class:`approxrun.ops.engine.LutEngine`.
"""

from approxrun.ops.lowrank.calibration import Calibration, machine_key
from approxrun.ops.lowrank.executors import (int8_conv2d, lowrank_backward, lowrank_call, lowrank_gemm,
                                             map_conv2d, one_group, torch_gather_rows)
from approxrun.ops.lowrank.factor import (MAX_FACTOR_RANK, Factors, factor_lut, factor_rational_table,
                                          modular_rank)
from approxrun.ops.lowrank.measurement import int8_gemm_is_exact, load_or_measure, measure
from approxrun.ops.lowrank.plans import PLAN_KINDS, GemmPlan, candidate_plans, map_conv_time
from approxrun.ops.lowrank.tables import ConvMaps, Int8Maps, LowRankTable

__all__ = ["Calibration", "int8_gemm_is_exact", "load_or_measure", "machine_key", "measure", "int8_conv2d",
           "lowrank_backward", "lowrank_call", "lowrank_gemm", "one_group", "map_conv2d", "torch_gather_rows",
           "MAX_FACTOR_RANK", "Factors", "factor_lut", "factor_rational_table", "modular_rank", "PLAN_KINDS",
           "GemmPlan", "candidate_plans", "map_conv_time", "ConvMaps", "Int8Maps", "LowRankTable"]
