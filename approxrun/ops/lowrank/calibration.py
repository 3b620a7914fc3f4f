"""What the router's primitives cost on this machine: the figures, their model and their key.

The router compares the gather path with the low-rank plans by modelled time; every coefficient of
the model is a :class:`Calibration` figure measured at run time (:mod:`.measurement`, about a second),
on the machine and with the settings the process runs with: the gather's cost per lookup, per row
and per table entry, the direct gather's cost per lookup, float32 / float64 / int8 GEMM rates at a
few widths, gathers of float maps and packed int8 words, output updates, unfolding of convolution
windows and the fixed cost of each route's call. Nothing is fitted to one machine.

The figures are cached per machine key (CPU model and instruction-set flags, the library ISA
settings in the environment, torch version, thread count) under ``$APPROXRUN_CACHE/calibration``
(default ``~/.cache/approxrun/calibration``); ``approxrun-lut calibrate`` shows them. Tests inject
their own :class:`Calibration`.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Calibration", "map_gemm_columns", "machine_key", "cpu_description", "calibration_dir"]

CACHE_ENV = "APPROXRUN_CACHE"
FORMAT = 14  # bump when the measured figures change meaning (or the kernels they time change speed)
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512vbmi", "amx_tile", "amx_int8")
GEMM_WIDTHS = (8, 32, 128)  # N of the timed GEMMs; other widths interpolate on log N


def cpu_description() -> dict:
    """CPU model and the instruction-set flags that matter for the LUT routes (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def machine_key() -> dict:
    """What the figures depend on: CPU, library ISA limits, torch version and build, threads."""
    return {"cpu": cpu_description(), "machine": platform.machine(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "isa_env": {name: os.environ[name] for name in ISA_ENV if name in os.environ}, "format": FORMAT}


def calibration_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "approxrun") / "calibration"


def map_gemm_columns(n: int, lanes: int) -> int:
    """The columns the compiled float32 plan computes for N of them (``kernels/lut_cpu_maps.cpp``):
    N padded to one vector of ``lanes``, or to pairs of vectors beyond one vector's width."""
    block = lanes * (1 if n <= lanes else 2)
    return -(-n // block) * block


@dataclass(frozen=True)
class Calibration:
    """Seconds per unit of work of each primitive (see the module); ``gemm`` maps a dtype name to
    seconds per multiply-add at each of :data:`GEMM_WIDTHS`."""

    gather_lookup: float
    gather_row: float
    gather_table: float
    direct_lookup: float
    gemm: dict
    map_entry: float
    word_index: float
    pair_index: float
    int8_call: float
    accumulate: float
    int8_exact: bool
    backward_lookup: float = math.inf  # the gradient-table gathers of a LUT-gradient backward, per product
    native_lookup: float = math.inf  # the compiled CPU LUT GEMM (approxrun.ops.native); inf: not built here
    native_table_entry: float = math.inf  # its table strategy: per table entry built (256 K N of them)
    native_row_add: float = math.inf  # and per 8-lane add of a table row into a row of sums (M K N / 8)
    native_table_bytes: int = 0  # and its budget for a tile of k's tables where K's exceed half the L2 (0: that)
    native_permute_group: float = math.inf  # its in-register strategy (inf: not built): per 64-lane lookup
    native_permute_code: float = math.inf  # and, lanes over rows, per code of a transposed on the way
    native_map_entry: float = math.inf  # the compiled float32 low-rank plan (inf: not built): per map read
    native_map_mac: float = math.inf  # and per multiply-add of its register blocks (N padded to its vectors)
    native_map_lanes: int = 8  # float32 lanes of those vectors
    native_pair_entry: float = math.inf  # the compiled int16 plan (inf: not built): per read of a pair word
    native_pair_mac: float = math.inf  # and per multiply-add of pair words (two map columns each)
    native_backward: float = math.inf  # the compiled LUT-gradient backward (inf: not built), per product
    native_backward_a: float = math.inf  # the same with only grad_a wanted (a weight frozen)
    native_backward_b: float = math.inf  # and with only grad_b wanted (a network's first layer)
    lowrank_backward_entry: float = math.inf  # the low-rank backward's torch ops, per entry of a and factor column
    unfold_entry: float = 0.0  # a convolution's window rows unfolded as int32 codes, per element written
    call_overhead: dict = field(default_factory=dict)  # route family -> fixed seconds per call
    machine: dict = field(default_factory=dict)
    measured_busy: bool = False  # measured while the machine was busy (measured again once it is quiet)

    def gemm_mac(self, dtype: str, n: int) -> float:
        """Seconds per multiply-add of a ``dtype`` GEMM with ``n`` output columns (log-linear in n
        between the timed widths, flat outside them)."""
        rates = self.gemm[dtype]
        logs = [math.log(w) for w in GEMM_WIDTHS]
        return float(np.interp(math.log(max(1, n)), logs, rates))

    def gather_direct(self, m: int, n: int) -> bool:
        """Whether :func:`approxrun.ops.gather.grouped_lut_gemm` should gather every product directly
        (no tables) for this shape: by the measured costs (K cancels out)."""
        table = m * n * self.gather_lookup + max(m, n) * self.gather_row + 256 * min(m, n) * self.gather_table
        return min(m, n) == 1 or m * n * self.direct_lookup < table

    def gather_time(self, groups: int, m: int, k: int, n: int) -> float:
        """Modelled time of :func:`approxrun.ops.gather.grouped_lut_gemm` (the strategy it is given)."""
        if self.gather_direct(m, n):
            return groups * m * k * n * self.direct_lookup + self.overhead("torch")
        return groups * (m * k * n * self.gather_lookup + max(m, n) * k * self.gather_row
                         + 256 * k * min(m, n) * self.gather_table) + self.overhead("torch")

    def native_time(self, groups: int, m: int, k: int, n: int, tables: bool) -> float:
        """Modelled time of the compiled kernel: per product, or (tables) per table entry and per
        8-lane row add (the row tiles pad N to a multiple of 8)."""
        if tables:
            return (groups * k * (256 * n * self.native_table_entry + m * -(-n // 8) * self.native_row_add)
                    + self.overhead("native"))
        return groups * m * k * n * self.native_lookup + self.overhead("native")

    def permute_time(self, groups: int, m: int, k: int, n: int, transposed: bool) -> float:
        """Modelled time of the compiled in-register strategy: per lookup of 64 lanes (lanes over the
        columns of b, or with ``transposed`` over the rows of a, whose codes are transposed first)."""
        if transposed:
            return (groups * k * (n * -(-m // 64) * self.native_permute_group + m * self.native_permute_code)
                    + self.overhead("native"))
        return groups * m * k * -(-n // 64) * self.native_permute_group + self.overhead("native")

    def overhead(self, route: str) -> float:
        """Fixed seconds of one call of a route family beyond its per-element costs (Python,
        dispatch, thread wake-ups): ``torch`` and ``native`` gathers, the ``int8``, ``float32``,
        ``float64`` and ``compiled`` float32 plans; 0 where not measured."""
        return self.call_overhead.get(route, 0.0)

    def table_backward_time(self, groups: int, m: int, k: int, n: int, needs: tuple[bool, bool],
                            compiled: bool) -> float:
        """Modelled time of a LUT-gradient backward through the gradient tables: the compiled reads
        (per product, for the gradients ``needs`` asks for) or torch's gathers (per product and
        histogram entry)."""
        products = groups * m * k * n
        if not compiled:
            return products * (m + 256) / m * self.backward_lookup
        per_product = (self.native_backward if needs[0] and needs[1] else
                       self.native_backward_a if needs[0] else self.native_backward_b if needs[1] else 0.0)
        return products * per_product

    def lowrank_backward_time(self, groups: int, m: int, k: int, n: int, columns: int) -> float:
        """Modelled time of the low-rank LUT-gradient backward with ``columns`` factor columns on the
        wanted sides: per entry of a and column, a float64 GEMM over N and the map reads."""
        return groups * m * k * columns * (n * self.gemm_mac("float64", n) + self.lowrank_backward_entry)

    def unfold_time(self, groups: int, m: int, k: int, n: int) -> float:
        """What an unfolded convolution costs beyond its GEMM of [G, M, K] x [G, K, N]: the window
        rows written (G*M*K) and its output copied into the convolution's (G*M*N, float64)."""
        return groups * (m * k * self.unfold_entry + m * n * self.accumulate)

    def map_gemm_time(self, groups: int, m: int, k: int, n: int, width: int, pairs: bool = False) -> float:
        """Modelled time of the compiled low-rank plan with ``width`` map columns (``pairs``: the
        int16 plan, two columns per word): the map reads of both operands, the multiply-adds of its
        padded columns (:func:`map_gemm_columns`) and the call's fixed cost."""
        padded = map_gemm_columns(n, self.native_map_lanes)
        entry, mac = (self.native_pair_entry, self.native_pair_mac) if pairs else (self.native_map_entry,
                                                                                   self.native_map_mac)
        words = -(-width // 2) if pairs else width
        return groups * words * ((m * k + k * n) * entry + m * k * padded * mac) + self.overhead("compiled")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls(**data)
