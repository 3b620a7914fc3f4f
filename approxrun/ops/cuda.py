"""CUDA backend of the LUT ops: CuPy RawKernels built from the packaged sources in ``approxrun.kernels``.

The kernels (``kernels/*.cu``; their headers say where the LUT lives and how they tile) are
compiled lazily, once per device and source file (CuPy also keeps a disk cache), and launched on
torch's current stream; tensors cross to CuPy through DLPack, without copies.

Everything before the launch is plain torch and Python: the LUT image, the operand layouts
(activation codes transposed to [G, K, M padded to 16] uint8), the grids and the split-K choice.
A launch is a :class:`Launch` handed to a runner: :class:`CupyRunner` on a GPU, or the C++ SIMT
emulator of ``tests/emulation`` in the tests, which so exercise this module as the GPU does.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import numpy as np
import torch
from torch.nn.modules.utils import _pair

from approxrun.errors import ApproxrunError, one_line
from approxrun.lut import LUT_SIZE, code_to_index

__all__ = ["INSTALL_HINT", "Launch", "LutImage", "CupyRunner", "runner_for", "build_image", "plan_gemm",
           "index_gemm", "gemm_codes", "transposed_codes", "conv2d", "lut_gemm_backward", "kernel_source", "compile_options"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'approxrun[cuda]'"

# Launch geometry, passed to the compiler as -D defines: the one place these numbers live.
KERNEL_DEFINES = {
    "LUT_GEMM_THREADS": 256,
    "LUT_GEMM_ROWS_PER_THREAD": 16,
    "LUT_DEPTHWISE_THREADS": 256,
    "LUT_DEPTHWISE_ROWS_PER_THREAD": 4,
    "LUT_DEPTHWISE_TABLE_BYTES": 32768,
    "LUT_IM2COL_THREADS": 256,
    "LUT_IM2COL_ROWS_PER_THREAD": 4,
    "LUT_GRAD_THREADS": 256,
}
KERNEL_FILES = {
    "lut_gemm_narrow": "lut_gemm.cu",
    "lut_gemm_wide": "lut_gemm.cu",
    "lut_depthwise_narrow": "lut_conv.cu",
    "lut_depthwise_wide": "lut_conv.cu",
    "lut_im2col": "lut_conv.cu",
    "lut_grad_a": "lut_grad.cu",
    "lut_grad_b": "lut_grad.cu",
}

PARTS = 8  # 16-byte chunks per 128-byte shared-memory bank row: a GEMM row group's threads
GEMM_ROWS_PER_BLOCK = KERNEL_DEFINES["LUT_GEMM_THREADS"] // PARTS * KERNEL_DEFINES["LUT_GEMM_ROWS_PER_THREAD"]
NARROW_MAX_K_PER_BLOCK = 65536  # uint32 sums of 16-bit entries stay exact (kernels/lut_gemm.cu)
EPILOGUE_SLABS = 2  # a GEMM block's final reduction and writes cost about two slabs of lookups
M_ALIGN = 16  # activation rows are padded so that 16 codes load as one uint4
GRID_YZ_LIMIT = 65535
_INCLUDE = re.compile(r'^#include "([\w.]+)"$', re.MULTILINE)


def kernel_source(filename: str) -> str:
    """A packaged kernel source with its local includes inlined (so CuPy's cache key covers them)."""
    root = resources.files("approxrun.kernels")
    return _INCLUDE.sub(lambda match: root.joinpath(match.group(1)).read_text(),
                        root.joinpath(filename).read_text())


def compile_options() -> tuple[str, ...]:
    return ("-std=c++17", *(f"-D{name}={value}" for name, value in KERNEL_DEFINES.items()))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: tensors (contiguous, on the runner's device) and typed numpy scalars."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple

    def __post_init__(self):
        if self.grid[1] > GRID_YZ_LIMIT or self.grid[2] > GRID_YZ_LIMIT:
            raise ValueError(f"{self.kernel}: grid {self.grid} exceeds CUDA's limit of {GRID_YZ_LIMIT} "
                             "blocks in y and z; this shape is too large for the CUDA kernels")


class Runner(Protocol):
    sm_count: int

    def __call__(self, launch: Launch) -> None: ...


# ---------------------------------------------------------------------------------------------
# CuPy


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _import_cupy():
    """CuPy, or a one-line ApproxrunError saying what to install or which CUDA versions clash."""
    try:
        import cupy
    except ImportError as exc:
        raise ApproxrunError(f"CUDA tensors need the CuPy LUT kernels, but CuPy is not installed ({one_line(exc)}): "
                             f"{INSTALL_HINT}") from None
    except Exception as exc:  # installed but broken, e.g. CUDA libraries missing
        raise ApproxrunError(f"CuPy failed to load ({one_line(exc)}): reinstall it with {INSTALL_HINT} "
                             "(or the cupy-cudaXXx wheel matching your CUDA)") from None
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as exc:
        raise ApproxrunError(f"CuPy {cupy.__version__} cannot use the CUDA driver ({one_line(exc)}): check the "
                             f"NVIDIA driver, then {INSTALL_HINT}") from None
    if driver == 0:
        raise ApproxrunError(f"CuPy {cupy.__version__} finds no NVIDIA driver: install one for CUDA "
                             f"{_cuda_version(runtime)}, then {INSTALL_HINT}")
    if driver // 1000 < runtime // 1000:
        raise ApproxrunError(
            f"CUDA versions clash: CuPy {cupy.__version__} is built for CUDA {_cuda_version(runtime)}, the driver "
            f"supports CUDA {_cuda_version(driver)} (torch uses CUDA {torch.version.cuda}): pip install "
            f"cupy-cuda{driver // 1000}x (not the CuPy of {INSTALL_HINT}), or update the NVIDIA driver")
    return cupy


class CupyRunner:
    """Launches kernels with CuPy on one GPU, on torch's current stream; modules compiled on first use."""

    def __init__(self, device_index: int):
        self._cupy = _import_cupy()
        self.device_index = device_index
        self.sm_count = torch.cuda.get_device_properties(device_index).multi_processor_count
        self._modules: dict[str, object] = {}
        self._functions: dict[str, object] = {}
        self._streams: dict[int, object] = {}

    def _function(self, kernel: str):
        if kernel not in self._functions:
            filename = KERNEL_FILES[kernel]
            if filename not in self._modules:
                log.info("compiling %s for CUDA device %d (once per device; CuPy caches the binary on disk)",
                         filename, self.device_index)
                self._modules[filename] = self._cupy.RawModule(code=kernel_source(filename),
                                                               options=compile_options())
            self._functions[kernel] = self._modules[filename].get_function(kernel)
        return self._functions[kernel]

    def _stream(self):
        """CuPy's view of torch's current stream on this device (wrappers cached per stream handle)."""
        stream = torch.cuda.current_stream(self.device_index)
        if stream.cuda_stream not in self._streams:
            from_external = getattr(self._cupy.cuda.Stream, "from_external", None)  # CuPy >= 14
            self._streams[stream.cuda_stream] = (
                from_external(stream) if from_external is not None and hasattr(stream, "__cuda_stream__")
                else self._cupy.cuda.ExternalStream(stream.cuda_stream, self.device_index))
        return self._streams[stream.cuda_stream]

    def __call__(self, launch: Launch) -> None:
        cupy = self._cupy
        with cupy.cuda.Device(self.device_index), self._stream():
            args = []
            for arg in launch.args:
                if isinstance(arg, torch.Tensor):
                    if not arg.is_contiguous() or arg.device.index != self.device_index:
                        raise RuntimeError(f"{launch.kernel}: tensor arguments must be contiguous on cuda:"
                                           f"{self.device_index}")
                    # cached images and scratch made on another stream stay alive until this launch ends
                    arg.record_stream(torch.cuda.current_stream(self.device_index))
                    arg = cupy.from_dlpack(arg.detach())  # zero-copy; same stream, so no synchronisation
                args.append(arg)
            self._function(launch.kernel)(launch.grid, launch.block, tuple(args))


_runners: dict[int, CupyRunner] = {}


def runner_for(device: torch.device) -> CupyRunner:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _runners:
        _runners[index] = CupyRunner(index)
    return _runners[index]


# ---------------------------------------------------------------------------------------------
# LUT image


@dataclass(frozen=True)
class LutImage:
    """``table[b][a] = lut[a][b] - bias``: uint16 bits in an int16 tensor (narrow) or int32 (wide)."""

    table: torch.Tensor
    bias: int
    wide: bool


def build_image(lut: torch.Tensor) -> LutImage:
    """The kernels' image of a [256, 256] integer-valued LUT tensor (on the kernels' device).

    16-bit entries when the LUT's range (max - min) fits 16 bits, which every 8x8-bit product
    table does (signed, unsigned or mixed); 32-bit entries otherwise. Built once per table and
    device by its :class:`~approxrun.ops.engine.LutEngine`.
    """
    if lut.shape != (LUT_SIZE, LUT_SIZE):
        raise ValueError(f"lut must be 256x256, got shape {tuple(lut.shape)}")
    values = lut.detach().to(torch.float64)
    if not torch.equal(values, values.round()):
        raise ValueError("the CUDA LUT kernels need integer LUT entries (the ops contract); got fractions")
    low, high = int(values.min()), int(values.max())
    entries = values.t().to(torch.int64) - low
    if high - low < 1 << 16:  # uint16 entries, stored as int16 bit patterns
        return LutImage(((entries + 32768) % 65536 - 32768).to(torch.int16).contiguous(), low, wide=False)
    if high - low < 1 << 32:
        bias = 0 if -(1 << 31) <= low and high < 1 << 31 else low + (1 << 31)
        return LutImage((values.t().to(torch.int64) - bias).to(torch.int32).contiguous(), bias, wide=True)
    raise ValueError(f"LUT entries span {high - low}, more than the 32 bits the CUDA kernels hold")


# ---------------------------------------------------------------------------------------------
# GEMM


@dataclass(frozen=True)
class GemmPlan:
    """Tiling of one LUT GEMM (kernels/lut_gemm.cu): n-tile of 2**log2_chunks chunks, k split in splits."""

    log2_chunks: int
    n_tile: int
    k_per_slab: int
    splits: int
    k_per_split: int
    grid: tuple[int, int, int]


@functools.lru_cache(maxsize=1024)
def plan_gemm(groups: int, m: int, k: int, n: int, wide: bool, sm_count: int) -> GemmPlan:
    """n-tile: the fewest chunks covering n; k split to fill the GPU's SMs (one block each) in whole waves."""
    per_chunk = 4 if wide else 8
    log2_chunks = 0
    while per_chunk << log2_chunks < n and log2_chunks < 3:
        log2_chunks += 1
    n_tile = per_chunk << log2_chunks
    k_per_slab = PARTS >> log2_chunks
    slabs = math.ceil(k / k_per_slab)
    base = groups * math.ceil(m / GEMM_ROWS_PER_BLOCK) * math.ceil(n / n_tile)
    least = 1 if wide else math.ceil(k / NARROW_MAX_K_PER_BLOCK)

    def cost(splits: int) -> int:  # waves x slabs per block (plus the block's epilogue)
        return math.ceil(base * splits / sm_count) * (math.ceil(slabs / splits) + EPILOGUE_SLABS)

    # more than two waves' worth of splits never pays: each split adds an epilogue
    splits = min(range(least, max(least, min(slabs, least + 2 * sm_count)) + 1), key=lambda s: (cost(s), s))
    slabs_per_split = math.ceil(slabs / splits)
    splits = math.ceil(slabs / slabs_per_split)  # no empty splits
    grid = (math.ceil(m / GEMM_ROWS_PER_BLOCK), math.ceil(n / n_tile), groups * splits)
    return GemmPlan(log2_chunks, n_tile, k_per_slab, splits, slabs_per_split * k_per_slab, grid)


def depthwise_max_k(wide: bool) -> int:
    """The most k a depthwise block's shared table holds (kernels/lut_conv.cu)."""
    return KERNEL_DEFINES["LUT_DEPTHWISE_TABLE_BYTES"] // (LUT_SIZE * (4 if wide else 2))


def _padded(m: int) -> int:
    return max(M_ALIGN, math.ceil(m / M_ALIGN) * M_ALIGN)


def transposed_codes(a_idx: torch.Tensor) -> torch.Tensor:
    """[G, M, K] byte indices -> [G, K, M padded to 16] uint8 (padding rows hold code 0)."""
    groups, m, k = a_idx.shape
    a_t = torch.empty(groups, k, _padded(m), dtype=torch.uint8, device=a_idx.device)
    a_t[:, :, :m] = a_idx.transpose(1, 2)
    a_t[:, :, m:] = 0
    return a_t


def gemm_codes(a_t: torch.Tensor, b: torch.Tensor, m: int, image: LutImage, runner: Runner | None = None):
    """out[g, m, n] = sum_k lut[a_t[g, k, m]][b[g, k, n]] as float64, from the kernels' uint8 operands.

    ``a_t`` [G, K, M padded to 16] (:func:`transposed_codes`), ``b`` [G, K, N] contiguous.
    """
    runner = runner or runner_for(a_t.device)
    groups, k, m_padded = a_t.shape
    n = b.shape[2]
    _check_operands(a_t, b, image)
    kind = "wide" if image.wide else "narrow"
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(groups, m, n, dtype=torch.float64, device=a_t.device)
    if n == 1 and k <= depthwise_max_k(image.wide):
        threads, rows = KERNEL_DEFINES["LUT_DEPTHWISE_THREADS"], KERNEL_DEFINES["LUT_DEPTHWISE_ROWS_PER_THREAD"]
        out = torch.empty(groups, m, dtype=torch.float64, device=a_t.device)
        runner(Launch(f"lut_depthwise_{kind}", (math.ceil(m / (threads * rows)), groups, 1), (threads, 1, 1),
                      (a_t, b, image.table, out, np.int32(m), np.int32(m_padded), np.int32(k), np.int64(image.bias))))
        return out.unsqueeze(-1)
    if n == 1:
        log.debug("lut gemm: k=%d exceeds the depthwise kernel's table (%d); using the GEMM kernel", k,
                  depthwise_max_k(image.wide))
    plan = plan_gemm(groups, m, k, n, image.wide, runner.sm_count)
    log.debug("lut gemm %s: groups=%d m=%d k=%d n=%d n_tile=%d splits=%d grid=%s", kind, groups, m, k, n,
              plan.n_tile, plan.splits, plan.grid)
    accumulate = plan.splits > 1
    out = (torch.zeros if accumulate else torch.empty)(groups, m, n, dtype=torch.float64, device=a_t.device)
    runner(Launch(f"lut_gemm_{kind}", plan.grid, (KERNEL_DEFINES["LUT_GEMM_THREADS"], 1, 1),
                  (a_t, b, image.table, out, np.int32(m), np.int32(m_padded), np.int32(k), np.int32(n),
                   np.int32(plan.log2_chunks), np.int32(plan.splits), np.int32(plan.k_per_split),
                   np.int64(image.bias), np.int32(accumulate))))
    return out


def _check_operands(a_t: torch.Tensor, b: torch.Tensor, image: LutImage) -> None:
    """The kernels load 16 codes of ``a_t`` (and the table) as one uint4: a misaligned or strided
    operand would fault on the GPU and kill the CUDA context, so it is refused here."""
    if a_t.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"gemm_codes takes uint8 codes, got {a_t.dtype} and {b.dtype}")
    if a_t.dim() != 3 or b.dim() != 3 or a_t.shape[0] != b.shape[0] or a_t.shape[1] != b.shape[1]:
        raise ValueError(f"gemm_codes needs a_t [G, K, M] and b [G, K, N], got {tuple(a_t.shape)} and {tuple(b.shape)}")
    if a_t.shape[2] % M_ALIGN:
        raise ValueError(f"gemm_codes: a_t's row length {a_t.shape[2]} is not a multiple of {M_ALIGN}")
    for name, t in (("a_t", a_t), ("b", b), ("the LUT image", image.table)):
        if not t.is_contiguous():
            raise ValueError(f"gemm_codes: {name} must be contiguous")
        if t.data_ptr() % 16:
            raise ValueError(f"gemm_codes: {name} starts at an address not aligned to 16 bytes "
                             "(a sliced view); pass a fresh contiguous tensor")


def index_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, image: LutImage, runner: Runner | None = None):
    """The ops' gather GEMM on the GPU: a_idx [G, M, K], b_idx [G, K, N] byte indices -> float64 [G, M, N]."""
    runner = runner or runner_for(a_idx.device)
    b = b_idx.to(torch.uint8).contiguous()
    return gemm_codes(transposed_codes(a_idx), b, a_idx.shape[1], image, runner)


def conv2d(x: torch.Tensor, w: torch.Tensor, image: LutImage, stride=1, padding=0, dilation=1, groups: int = 1,
           pad_value: int = 0, runner: Runner | None = None) -> torch.Tensor:
    """LUT convolution forward of codes x [B, C, H, W] and w [O, C/groups, kh, kw] -> float64 [B, O, Ho, Wo].

    lut_im2col writes the GEMM's transposed activation indices straight from the input's byte
    indices (padding -> the index of ``pad_value``), so no unfolded float or int64 copy exists.
    """
    runner = runner or runner_for(x.device)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    if channels % groups or out_channels % groups or channels // groups != group_channels:
        raise ValueError(f"conv2d: input {tuple(x.shape)} and weight {tuple(w.shape)} do not fit groups={groups}")
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    k, m = group_channels * kh * kw, batch * out_h * out_w
    x_idx = code_to_index(x).to(torch.uint8).contiguous()
    b = (code_to_index(w).to(torch.uint8).reshape(groups, out_channels // groups, k).transpose(1, 2).contiguous())
    a_t = torch.empty(groups, k, _padded(m), dtype=torch.uint8, device=x.device)
    threads, rows = KERNEL_DEFINES["LUT_IM2COL_THREADS"], KERNEL_DEFINES["LUT_IM2COL_ROWS_PER_THREAD"]
    runner(Launch("lut_im2col", (k, math.ceil(a_t.shape[2] / (threads * rows)), groups), (threads, 1, 1),
                  (x_idx, a_t, *map(np.int32, (batch, channels, height, width, groups, kh, kw, *stride, *padding,
                                               *dilation, out_h, out_w, a_t.shape[2],
                                               int(code_to_index(int(pad_value))))))))
    out = gemm_codes(a_t, b, m, image, runner)  # [G, B * Ho * Wo, O / G]
    return out.reshape(groups, batch, out_h * out_w, -1).permute(1, 0, 3, 2).reshape(batch, out_channels, out_h,
                                                                                     out_w)


def lut_gemm_backward(grad_out: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, da: torch.Tensor,
                      db: torch.Tensor, runner: Runner | None = None):
    """LUT-derived gradients (ops/gradients.py) on the GPU -> (grad_a [G, M, K], grad_b [G, K, N]) float64."""
    runner = runner or runner_for(a_idx.device)
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    device = a_idx.device
    if m == 0 or n == 0 or k == 0:
        return (torch.zeros(groups, m, k, dtype=torch.float64, device=device),
                torch.zeros(groups, k, n, dtype=torch.float64, device=device))
    threads = KERNEL_DEFINES["LUT_GRAD_THREADS"]
    a_t = transposed_codes(a_idx)
    b = b_idx.to(torch.uint8).contiguous()
    grad_out = grad_out.to(torch.float64).contiguous()
    sizes = (np.int32(m), np.int32(a_t.shape[2]), np.int32(k), np.int32(n))
    grad_a_t = torch.empty(groups, k, m, dtype=torch.float64, device=device)
    runner(Launch("lut_grad_a", (math.ceil(m / threads), k, groups), (threads, 1, 1),
                  (a_t, b, grad_out, da.to(torch.float64).t().contiguous(), grad_a_t, *sizes)))
    column_blocks = math.ceil(k * n / threads)
    splits = max(1, min(math.ceil(m / 64), math.ceil(4 * runner.sm_count / (column_blocks * groups))))
    rows_per_split = math.ceil(m / splits)
    splits = math.ceil(m / rows_per_split)
    partial = torch.empty(splits, groups, k, n, dtype=torch.float64, device=device)
    runner(Launch("lut_grad_b", (column_blocks, splits, groups), (threads, 1, 1),
                  (a_t, b, grad_out, db.to(torch.float64).contiguous(), partial, *sizes, np.int32(rows_per_split))))
    return grad_a_t.transpose(1, 2), partial.sum(0)
