"""A compiled CPU LUT GEMM (C++/OpenMP), built on first use with torch's cpp_extension and cached.

Two strategies over byte operands and a 256x256 int32 image, int32 sums (int64 when a sum could
leave the int32 range), rows in parallel: one LUT read per product (small shapes, such as a linear
layer at batch 128, where the torch-op gathers pay more for their index tensors than for the
lookups), or tables of products per tile of k and contiguous row adds (large shapes). The
build needs a C++ compiler; without one the route is simply absent (:func:`load` returns None)
and the torch gathers remain. The source lives in ``kernels/lut_cpu.cpp``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import resources
from pathlib import Path

import torch

from approxrun.lut import code_to_index

__all__ = ["NativeGemm", "load"]

log = logging.getLogger(__name__)


class NativeGemm:
    """The compiled module and the int32 LUT images it reads (one per engine, see LutEngine)."""

    def __init__(self, module):
        self._module = module

    def __call__(self, a: torch.Tensor, b: torch.Tensor, lut_image: torch.Tensor, wide_sums: bool,
                 tables: bool = False) -> torch.Tensor:
        """out[g, m, n] = sum_k lut[byte(a[g, m, k])][byte(b[g, k, n])] of codes a [G, M, K] and
        b [G, K, N], float64 (``lut_image``: int32 [256, 256]; ``wide_sums``: accumulate in int64;
        ``tables``: build per-k tables of products, then add table rows, for large shapes)."""
        gemm = self._module.lut_gemm_table if tables else self._module.lut_gemm
        return gemm(_bytes(a), _bytes(b), lut_image, wide_sums)


def _bytes(codes: torch.Tensor) -> torch.Tensor:
    """The codes' bytes as uint8: a view of byte codes, one narrowing cast of other integer codes
    (a cast to uint8 keeps the value modulo 256: the byte), the masked index of codes in floats."""
    if codes.dtype in (torch.int8, torch.uint8):
        return codes.view(torch.uint8)
    if not codes.is_floating_point():
        return codes.to(torch.uint8)
    return code_to_index(codes).to(torch.uint8)


def _build_dir() -> tuple[Path, str]:
    from approxrun.ops.lowrank.calibration import calibration_dir, machine_key
    key = machine_key()
    digest = hashlib.sha256(json.dumps([key["cpu"], key["torch"]], sort_keys=True).encode()).hexdigest()[:12]
    return calibration_dir().parent / "native" / digest, f"approxrun_lut_cpu_{digest}"


@functools.cache
def load() -> NativeGemm | None:
    """The compiled kernel (compiled once per CPU and torch version into the approxrun cache, then
    loaded), or None when it cannot be built here (no compiler, no OpenMP). Loaded once per process:
    an extension module is process state by nature (``sys.modules``)."""
    from torch.utils.cpp_extension import load_inline
    folder, name = _build_dir()
    source = resources.files("approxrun.kernels").joinpath("lut_cpu.cpp").read_text()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.so")):
            log.info("compiling the CPU LUT kernel into %s (once per CPU and torch version)", folder)
        module = load_inline(name, cpp_sources=source, functions=["lut_gemm", "lut_gemm_table"], build_directory=str(folder),
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                             verbose=False)
    except Exception as exc:  # no compiler or a broken toolchain: the torch gathers stay
        log.info("CPU LUT kernel not available (%s); using the torch gathers", " ".join(str(exc).split())[:200])
        return None
    return NativeGemm(module)
