"""The compiled CPU kernels (C++/OpenMP), built on first use with torch's cpp_extension and cached.

- two exact LUT GEMM strategies over integer codes and a 256x256 int32 image, int32 sums (int64 when
  a sum could leave the int32 range), rows in parallel: one LUT read per product (small shapes, such
  as a linear layer at batch 128), or tables of products per tile of k and vector row adds (large
  shapes; a random LUT's fastest route; 16-bit products two to a word where the LUT's values span
  less than 2**16);
- on CPUs with AVX-512 VBMI, an in-register strategy for LUTs whose values span at most 2**16: a LUT
  row's two byte planes sit in eight registers and byte permutes look up 64 products at once, lanes
  over the columns of b or (``transposed``, narrow N) over the rows of a;
- an im2col of a convolution's input into int32 or int64 window rows;
- one-pass map gathers ``table[byte(codes)]`` for the low-rank plans, and the int8 low-rank plan in
  one call (gathers, torch's int8 GEMMs, offsets and the exact division), so small shapes pay no
  per-op overhead;
- the float32 low-rank plan in one call: maps read by code and multiplied in registers (FMAs over
  exact integer partial sums), no mapped copy of the rows in memory; where int8 GEMMs are slow
  (AVX2-only CPUs) this is the fast exact route for low-rank LUTs;
- the LUT-derived gradients (``quant.grad=lut``) of any LUT: each product's gradient-table entries
  read in place, where torch's ops gather an [M, K, N] copy first (15-70x faster, measured).

Codes are read as they are (any integer dtype, or integers held in floats); results are written as
float64 or int64. The build needs a C++ compiler; without one the routes are simply absent
(:func:`load` returns None) and the torch ops remain. The sources live in ``kernels/lut_cpu.cpp``,
``kernels/lut_cpu_permute.cpp``, ``kernels/lut_cpu_maps.cpp`` and ``kernels/lut_cpu_backward.cpp``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from approxrun.lut import code_to_index

__all__ = ["NativeGemm", "BytePlanes", "byte_planes", "load", "READ_DTYPES"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BytePlanes:
    """A LUT as ``low + u`` with ``0 <= u < 2**16``, u's bytes in planes: ``rows[v]`` holds the low
    then the high bytes of ``u[v, :]`` (uint8 [256, 512]), ``columns[w]`` those of ``u[:, w]``."""

    rows: torch.Tensor
    columns: torch.Tensor
    low: int


def byte_planes(values: np.ndarray) -> BytePlanes | None:
    """The byte planes of an integer LUT whose values span at most 2**16, else None."""
    if not np.issubdtype(values.dtype, np.integer) or int(values.max()) - int(values.min()) >= 2**16:
        return None
    low = int(values.min())
    u = (values.astype(np.int64) - low).astype(np.uint16)

    def planes(rows: np.ndarray) -> torch.Tensor:  # torch's allocator aligns to 64 bytes: no load splits a line
        planes = np.concatenate([(rows & 255).astype(np.uint8), (rows >> 8).astype(np.uint8)], axis=1)
        return torch.empty(planes.shape, dtype=torch.uint8).copy_(torch.from_numpy(planes))

    return BytePlanes(planes(u), planes(np.ascontiguousarray(u.T)), low)


# K below which the int32 lanes of the strategies over 16-bit offset LUT values (the in-register
# permutes, pair tables) hold their sums: K * (2**16 - 1) < 2**31
SPAN16_MAX_K = 2**15


class NativeGemm:
    """The compiled module and the int32 LUT images it reads (one per engine, see LutEngine). Its
    GEMMs take codes a [G, M, K] and b [G, K, N], or a [M, K] and b [K, N] (one group, a 2-D result)."""

    def __init__(self, module):
        self._module = module
        self.permutes = bool(module.permute_available())  # the in-register strategy was built (AVX-512 VBMI)
        self.map_lanes = int(module.map_gemm_lanes())  # float32 lanes of map_gemm's vectors (8 or 16)
        self.map_pairs = bool(module.map_gemm_pairs())  # whether map_gemm takes int16 map pairs
        self.l2_bytes = int(module.l2_cache_bytes())  # a core's L2 cache, as the kernel reads it

    def __call__(self, a: torch.Tensor, b: torch.Tensor, lut_image: torch.Tensor, wide_sums: bool,
                 out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """out[g, m, n] = sum_k lut[byte(a[g, m, k])][byte(b[g, k, n])] of codes a [G, M, K] and
        b [G, K, N], float64 or int64, one LUT read per product (``lut_image``: int32 [256, 256];
        ``wide_sums``: accumulate in int64)."""
        return self._module.lut_gemm(_readable(a), _readable(b), lut_image, wide_sums, _result(a, b, out_dtype))

    def tables(self, a: torch.Tensor, b: torch.Tensor, lut_columns: torch.Tensor, wide_sums: bool,
               out_dtype: torch.dtype = torch.float64, planes: BytePlanes | None = None,
               table_bytes: int | None = None) -> torch.Tensor:
        """The same GEMM by tables of products per tile of k and vector row adds (large shapes), the
        tables built from ``lut_columns``: the int32 image transposed, contiguous (``lut_columns[w][v]
        = lut[v][w]``). Given the LUT's ``planes`` (its values span less than 2**16) and K below
        :data:`SPAN16_MAX_K`, the tables hold 16-bit values offset by ``planes.low``, two per word
        (half the bytes: 1.1-1.3x faster, measured). ``table_bytes``: the budget of one tile of k's
        tables where all of K's exceed half the L2 (default: half the L2; the calibration measures
        the best, :attr:`Calibration.native_table_bytes`)."""
        low = planes.low if planes is not None and a.shape[-1] < SPAN16_MAX_K else None
        budget = self.l2_bytes // 2 if table_bytes is None else table_bytes
        return self._module.lut_gemm_table(_readable(a), _readable(b), lut_columns, wide_sums, low, budget,
                                           _result(a, b, out_dtype))

    def permute(self, a: torch.Tensor, b: torch.Tensor, planes: BytePlanes, transposed: bool,
                out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The same GEMM by the in-register strategy (``self.permutes`` only; K below
        :data:`SPAN16_MAX_K`): lanes over the columns of b, or with ``transposed`` over the rows of a."""
        return self._module.lut_gemm_permute(_readable(a), _readable(b), planes.rows, planes.columns, planes.low,
                                             transposed, _result(a, b, out_dtype))

    def gather_rows(self, codes: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``table[byte(codes)]``: rows of ``table`` [256, ...] (rows of 4-byte words) at the codes'
        bytes, shape ``codes.shape + table.shape[1:]``, written into ``out`` when given."""
        shape = (*codes.shape, *table.shape[1:])
        out = torch.empty(shape, dtype=table.dtype) if out is None else out.view(shape)
        return self._module.gather_rows(_readable(codes).contiguous(), table, out)

    def unfold_rows(self, x: torch.Tensor, kernel_size, stride, dilation, groups: int,
                    out: torch.Tensor) -> torch.Tensor:
        """im2col: the window rows [G, B*Ho*Wo, C/G*kh*kw] of a padded input x [B, C, H, W] (codes
        of a read dtype, or packed map words) written into ``out`` (int32 or int64, that many
        elements) and returned; the values of :func:`~approxrun.ops.im2col.grouped_rows`, several
        times faster than torch's strided copy for small kernels."""
        (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
        return self._module.unfold_rows(_readable(x).contiguous(), kh, kw, sh, sw, dh, dw, groups, out)

    def int8_lowrank_gemm(self, a: torch.Tensor, b: torch.Tensor, maps, chunk: int, block_rows: int,
                          scratch: torch.Tensor, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The int8 low-rank plan in one call (see :class:`~approxrun.ops.lowrank.tables.Int8Maps`):
        [G, M, N] (float64 or int64) of codes a [G, M, K], b [G, K, N]; int8 GEMMs over ``chunk`` K
        columns, rows in blocks of ``block_rows`` through ``scratch`` (int8, block_rows * K * width bytes)."""
        x_words, y_words, offset = maps.tensors(a.device)
        return self._module.int8_lowrank_gemm(_readable(a), _readable(b), x_words, y_words, offset, chunk,
                                              maps.code_scale, maps.denominator, block_rows, scratch,
                                              _result(a, b, out_dtype))

    def map_gemm(self, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int,
                 denominator: int, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The compiled low-rank plan in one call: [G, M, N] = sum over k and i of x[byte(a), i] *
        y[byte(b), i] / denominator, mapped and multiplied in registers. Maps [256, W]: integer
        float32 (the caller proves every partial sum over ``chunk`` K columns an integer below
        2**24), or where ``map_pairs`` int32 words of int16 map pairs (below 2**31)."""
        return self._module.map_gemm(_readable(a), _readable(b), x, y, chunk, denominator, _result(a, b, out_dtype))

    def lut_backward(self, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, da: torch.Tensor,
                     db: torch.Tensor, needs: tuple[bool, bool] = (True, True)):
        """(grad_a, grad_b) float64 of the LUT GEMM of codes a [G, M, K], b [G, K, N] for the output
        gradient ``grad_out`` [G, M, N], through the gradient tables ``da``, ``db`` (float64 [256, 256]):
        every product's table entries read in place; None where ``needs`` says not wanted."""
        grad_a, grad_b = (torch.empty(t.shape, dtype=torch.float64) if need else None for t, need in zip((a, b), needs))
        unused = torch.empty(0, dtype=torch.float64)
        self._module.lut_backward(grad_out.to(torch.float64).contiguous(), _readable(a), _readable(b), da, db,
                                  needs[0], needs[1], unused if grad_a is None else grad_a,
                                  unused if grad_b is None else grad_b)
        return grad_a, grad_b


READ_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64)


def _result(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [G, M, N] tensor a GEMM of a [G, M, K] and b [G, K, N] writes ([M, N] for a [M, K] and b [K, N])."""
    return torch.empty(*a.shape[:-1], b.shape[-1], dtype=dtype)


def _readable(codes: torch.Tensor) -> torch.Tensor:
    """Codes the kernels read as they are (they take each code's byte on the way); others (half
    floats) as byte indices."""
    return codes if codes.dtype in READ_DTYPES else code_to_index(codes)


FUNCTIONS = ["lut_gemm", "lut_gemm_table", "l2_cache_bytes", "lut_gemm_permute", "permute_available", "gather_rows",
             "unfold_rows", "int8_lowrank_gemm", "map_gemm", "map_gemm_lanes", "map_gemm_pairs", "lut_backward"]
SOURCES = ("lut_cpu.cpp", "lut_cpu_permute.cpp", "lut_cpu_maps.cpp",  # one translation unit, in this order
           "lut_cpu_backward.cpp")
ISA_CEILINGS = {"default": "-march=x86-64", "avx2": "-march=x86-64-v3"}  # ATEN_CPU_CAPABILITY -> -march
# Loops start on 64-byte lines: the per-row loops of the tables strategy are a few instructions, and
# where one landed decided its speed (AVX2 build, (73728, 25, 6): 0.94 ms after an unrelated edit
# elsewhere in the file, 0.65 ms before it and with this flag either way).
COMPILE_FLAGS = ("-O3", "-fopenmp", "-falign-loops=64")


def target_flag() -> str:
    """The compiler's target: this CPU, or on x86-64 the ceiling torch's own CPU kernels obey
    (``ATEN_CPU_CAPABILITY=default|avx2``), so that an instruction-set limit holds for this kernel too."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ISA_CEILINGS:
        return ISA_CEILINGS[capability]
    return "-march=native"


def _build_dir(target: str) -> tuple[Path, str]:
    from approxrun.ops.lowrank.calibration import calibration_dir, machine_key
    key = machine_key()
    digest = hashlib.sha256(json.dumps([key["cpu"], key["torch"], target], sort_keys=True).encode()).hexdigest()[:12]
    return calibration_dir().parent / "native" / digest, f"approxrun_lut_cpu_{digest}"


@functools.cache
def load() -> NativeGemm | None:
    """The compiled kernel (compiled once per CPU, torch version and target into the approxrun
    cache, then loaded), or None when it cannot be built here (no compiler, no OpenMP). Loaded once
    per process: an extension module is process state by nature (``sys.modules``)."""
    from torch.utils.cpp_extension import load_inline
    target = target_flag()
    folder, name = _build_dir(target)
    source = "\n".join(resources.files("approxrun.kernels").joinpath(file).read_text() for file in SOURCES)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.so")):
            log.info("compiling the CPU LUT kernel (%s) into %s (once per CPU and torch version)", target, folder)
        module = load_inline(name, cpp_sources=source, functions=FUNCTIONS, build_directory=str(folder),
                             extra_cflags=[*COMPILE_FLAGS, target], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or a broken toolchain: the torch gathers stay
        log.info("CPU LUT kernel not available (%s); using the torch gathers", " ".join(str(exc).split())[:200])
        return None
    return NativeGemm(module)
