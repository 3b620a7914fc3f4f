"""Exact plans for one LUT GEMM shape and their modelled time on this machine.

A plan is exact by construction, proven per call from the factorization's bounds: int8 GEMMs
whose int32 sums stay below 2**31 over ``k_chunk`` K columns; the compiled int16 plan (maps below
2**15 multiplied in pairs, int32 sums below 2**31 over ``k_chunk`` columns); float32 GEMMs over
``k_chunk`` columns whose partial sums are integers below 2**24 (chunks summed in float64, exact
below 2**53); or one float64 GEMM whose worst-case rounding error stays below 0.5. The time of
each plan and of the gather comes from the machine's
:class:`~approxrun.ops.lowrank.calibration.Calibration`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from approxrun.ops.gather import FLOAT32_EXACT
from approxrun.ops.lowrank.calibration import Calibration
from approxrun.ops.lowrank.tables import INT16_LIMIT, LowRankTable

__all__ = ["PLAN_KINDS", "GemmPlan", "candidate_plans", "map_conv_time", "float32_matmul_is_ieee",
           "byte_pairs_readable", "INT32_EXACT"]

FLOAT64_EXACT = 2**53
INT32_EXACT = 2**31  # int8 GEMMs and the int16 plan sum in int32
UNIT_ROUNDOFF = 2.0**-53
PLAN_KINDS = ("int8", "int16", "float32", "float64")


@dataclass(frozen=True)
class GemmPlan:
    """How one LUT GEMM runs exactly: ``kind`` GEMMs over ``k_chunk`` K columns, summed in
    int64/float64 (float64: one GEMM, rounded); ``time`` is the modelled seconds. ``form``: the
    factorization a float plan multiplies (one of the table's :attr:`~LowRankTable.forms`; None:
    the table itself); int8 plans run the table's int8 maps. ``compiled``: a plan run by the
    compiled kernel (:meth:`~approxrun.ops.native.NativeGemm.map_gemm`), not torch's GEMMs: float32,
    or int16 (compiled only)."""

    kind: str
    k_chunk: int
    time: float
    form: LowRankTable | None = None
    compiled: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.kind)

    def __str__(self) -> str:
        width = "" if self.form is None else f", {self.form.width} map columns"
        if self.kind == "float64":
            return "float64 GEMM, rounded" + width
        if self.compiled:
            return f"compiled {self.kind} map GEMM over {self.k_chunk} K columns{width}"
        return f"{self.kind} GEMMs over {self.k_chunk} K columns{width}"


def float32_matmul_is_ieee(device: torch.device) -> bool:
    """False under TF32/bf16 matmul settings, which would round the integer factors."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32
    mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return mkldnn in ("none", "ieee")


def byte_pairs_readable() -> bool:
    """Whether two int8 codes read as one uint16 give ``low | high << 8`` (a little-endian machine,
    and a torch with uint16 views and copies)."""
    if sys.byteorder != "little" or not hasattr(torch, "uint16"):
        return False
    try:
        pair = torch.tensor([1, 2], dtype=torch.uint8).view(torch.uint16)
        return int(torch.empty(1, dtype=torch.int32).copy_(pair)) == 0x0201
    except (RuntimeError, TypeError):
        return False


def float64_error_bound(table: LowRankTable, k: int) -> float:
    """Worst-case |computed - exact| of the float64 GEMM: factor rounding (2u) plus accumulation
    (gamma_n for any summation order of n = K * width products), times sum |x| |y| <= K * bound / D."""
    n = k * table.width
    if n * UNIT_ROUNDOFF >= 0.5:
        return math.inf
    gamma = n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)
    magnitude = k * table.term_bound / table.denominator
    return (2 * UNIT_ROUNDOFF + gamma * (1 + 2 * UNIT_ROUNDOFF)) * magnitude * (1 + 1e-9)


def _float_time(cal: Calibration, kind: str, groups: int, m: int, k: int, n: int, width: int, chunk: int) -> float:
    """Map gathers (float64 entries cost twice), the GEMM, the chunk sums and the call's fixed cost."""
    entry = cal.map_entry * (2 if kind == "float64" else 1)
    return groups * ((m * k + k * n) * width * entry + m * k * n * width * cal.gemm_mac(kind, n)
                     + -(-k // chunk) * m * n * cal.accumulate) + cal.overhead(kind)


def _int8_time(cal: Calibration, groups: int, m: int, k: int, n: int, width: int, chunk: int, paired: bool,
               code_gemm: bool) -> float:
    """Packed-word gathers (byte pairs: one per two indices), the int8 GEMM(s), the chunk sums and
    the call's fixed cost."""
    rows = m * k * (cal.pair_index / 2 if paired else cal.word_index) + k * n * cal.word_index
    gemms = m * k * n * (width + code_gemm) * cal.gemm_mac("int8", n)
    calls = -(-k // chunk) * (1 + code_gemm)
    return groups * (rows + gemms + calls * (m * n * cal.accumulate + cal.int8_call)) + cal.overhead("int8")


def _pair_plan(form: LowRankTable, groups: int, m: int, k: int, n: int, calibration: Calibration) -> GemmPlan | None:
    """The exact compiled int16 plan of one factorization, or None where its maps exceed int16."""
    chunk = min(k, (INT32_EXACT - 1) // max(1, form.term_bound))
    if chunk < 1 or form.map_bound >= INT16_LIMIT or k * form.term_bound >= FLOAT64_EXACT:
        return None
    time = calibration.map_gemm_time(groups, m, k, n, form.width, pairs=True)
    return GemmPlan("int16", chunk, time, form, compiled=True)


def _float_plan(form: LowRankTable, kind: str, groups: int, m: int, k: int, n: int, device: torch.device,
                calibration: Calibration | None, compiled: bool = False) -> GemmPlan | None:
    """The exact ``kind`` plan of one factorization (``compiled``: float32 by the compiled kernel),
    or None where no chunking makes it exact."""
    if kind == "float64":
        if float64_error_bound(form, k) >= 0.5:
            return None
        time = 1e-12 if calibration is None else _float_time(calibration, kind, groups, m, k, n, form.width, k)
        return GemmPlan(kind, k, time, form)
    chunk = min(k, (FLOAT32_EXACT - 1) // max(1, form.term_bound))
    if chunk < 1 or k * form.term_bound >= FLOAT64_EXACT or not (compiled or float32_matmul_is_ieee(device)):
        return None  # not exact: sums beyond float32 or float64 integers, or torch's GEMMs rounding to TF32
    if compiled:
        return GemmPlan(kind, chunk, calibration.map_gemm_time(groups, m, k, n, form.width), form, compiled=True)
    time = 0.0 if calibration is None else _float_time(calibration, kind, groups, m, k, n, form.width, chunk)
    return GemmPlan(kind, chunk, time, form)


def candidate_plans(table: LowRankTable, groups: int, m: int, k: int, n: int, device: torch.device,
                    calibration: Calibration | None, byte_codes: bool = False,
                    kinds: tuple[str, ...] = PLAN_KINDS, compiled: bool = False) -> list[GemmPlan]:
    """Every exact plan of ``kinds`` for a [G, M, K] x [G, K, N] LUT GEMM with its modelled time
    (0 without a calibration, on CUDA: see :meth:`~approxrun.ops.engine.LutEngine`), the cheapest
    form of each. ``byte_codes``: the rows side holds int8/uint8 codes, which the int8 plan gathers
    in pairs; ``compiled``: the compiled plans run here (a CPU calibration is given: each compiled
    plan where it has figures for it)."""
    plans = []
    cal = calibration
    int8 = table.int8 if "int8" in kinds and device.type == "cpu" else None
    if int8 is not None and cal is not None and cal.int8_exact and k * int8.sum_bound < FLOAT64_EXACT:
        chunk = min(k, (INT32_EXACT - 1) // max(1, int8.bound, 128 * 128 if int8.code_scale else 0))
        paired = byte_codes and k % 2 == 0 and int8.width == 4 and byte_pairs_readable()
        time = _int8_time(cal, groups, m, k, n, int8.width, chunk, paired, bool(int8.code_scale))
        plans.append(GemmPlan("int8", chunk, time))
    for kind, compiled_kind in (("float32", False), ("float32", True), ("int16", True), ("float64", False)):
        if kind not in kinds or (compiled_kind and not (compiled and cal is not None)):
            continue
        if compiled_kind and not math.isfinite(cal.native_pair_mac if kind == "int16" else cal.native_map_mac):
            continue  # not built here
        options = [plan for form in table.forms
                   if (plan := _pair_plan(form, groups, m, k, n, cal) if kind == "int16"
                       else _float_plan(form, kind, groups, m, k, n, device, cal, compiled_kind))]
        if options:
            plans.append(min(options, key=lambda p: (p.time, p.form.width, p.form.term_bound)))
    return plans


def map_conv_time(cal: Calibration, input_elements: int, groups: int, m: int, k: int, n: int, width: int) -> float:
    """Map-then-conv: the maps of every input element once, then a float32 convolution as a GEMM."""
    return input_elements * width * cal.map_entry + groups * m * k * n * width * cal.gemm_mac("float32", n)
