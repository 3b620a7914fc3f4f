"""Exact LUT operations on integer codes: the contract layers, users and other backends rely on.

``lut_matmul(a, b, lut)``: out[m, n] = sum_k lut[byte(a[m, k])][byte(b[k, n])].
``lut_conv2d(x, w, lut, ...)``: the same product inside a 2-D convolution; padded positions hold
``pad_value`` (the layer passes the activation zero point, the code of real 0).

Integer inputs give an int64 result without autograd. Floating inputs (codes held in floats, as
the layers use them) give a float64 result that is differentiable: ``grad="ste"`` (default) gives
the gradients of the exact product, ``grad="lut"`` gradients from the LUT's smoothed finite
differences (:mod:`approxrun.ops.gradients`).
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from approxrun.lut import LUT_SIZE, code_to_index
from approxrun.multipliers.multiplier import Multiplier
from approxrun.ops import cuda as cuda_backend
from approxrun.ops.gather import depthwise_lut_gemm, grouped_lut_gemm
from approxrun.ops.gradients import gradient_tables, grouped_lut_gemm_backward
from approxrun.ops.im2col import conv_output_size, grouped_columns, grouped_rows, scratch
from approxrun.ops.lowrank import (STRATEGIES, get_strategy, set_strategy, try_lowrank_backward,
                                   try_lowrank_conv2d, try_lowrank_gemm, use_strategy)

__all__ = ["lut_matmul", "lut_conv2d", "GRAD_MODES", "STRATEGIES", "set_strategy", "get_strategy", "use_strategy"]

log = logging.getLogger(__name__)
GRAD_MODES = ("ste", "lut")
UNFOLD_ELEMENTS = 1 << 21  # batch block of an unfolded convolution input (8 MB of int32 codes)

_tensor_cache: "weakref.WeakKeyDictionary[Multiplier, dict]" = weakref.WeakKeyDictionary()


def _tables(lut, device, with_gradients: bool):
    """(lut, da, db) as float64 tensors on ``device``; cached per Multiplier object."""
    if isinstance(lut, Multiplier):
        entry = _tensor_cache.setdefault(lut, {})
        key = (str(device), with_gradients)
        if key not in entry:
            entry[key] = _build_tables(lut.lut, lut.domain_a.signed, lut.domain_b.signed, device,
                                       with_gradients)
        return entry[key]
    values = lut.detach().cpu().numpy() if isinstance(lut, torch.Tensor) else np.asarray(lut)
    if values.shape != (LUT_SIZE, LUT_SIZE):
        raise ValueError(f"lut must be 256x256, got shape {values.shape}")
    return _build_tables(values, True, True, device, with_gradients)


def _build_tables(values, signed_a, signed_b, device, with_gradients):
    lut = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    if not with_gradients:
        return lut, None, None
    da, db = gradient_tables(values, signed_a, signed_b)
    return lut, torch.as_tensor(da, device=device), torch.as_tensor(db, device=device)


def _check_grad(grad: str) -> None:
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")


def _code_gemm(a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
    """Grouped LUT GEMM of code tensors; one output per group (depthwise) takes the gather path.

    Low-rank LUTs run as dense GEMMs when ``strategy`` (default: :func:`set_strategy`) picks them.
    """
    lowrank_out = try_lowrank_gemm(a, b, lut, strategy)  # torch GEMMs, CPU or CUDA
    if lowrank_out is not None:
        return lowrank_out
    if a.is_cuda:  # CuPy LUT kernels; without CuPy, a one-line install error
        return cuda_backend.index_gemm(code_to_index(a), code_to_index(b), lut)
    if b.shape[2] == 1 and a.shape[0] > 1:
        log.debug("lut gemm: depthwise gather path for %d groups", a.shape[0])
        return depthwise_lut_gemm(code_to_index(a), code_to_index(b)[:, :, 0], lut).unsqueeze(-1)
    return grouped_lut_gemm(a, b, lut)  # takes the bytes of a chunk by chunk


class _GroupedLutGemm(torch.autograd.Function):
    """out[g] = a[g] (LUT-product) b[g] on code tensors held in floats."""

    @staticmethod
    def forward(ctx, a, b, lut, da, db):
        out = _code_gemm(a, b, lut)
        ctx.save_for_backward(a, b)
        ctx.tables = (da, db)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        da, db = ctx.tables
        if da is None:  # straight-through: gradients of the exact product
            grad_out = grad_out.to(a.dtype)
            return grad_out @ b.transpose(1, 2), a.transpose(1, 2) @ grad_out, None, None, None
        a_idx, b_idx = code_to_index(a), code_to_index(b)
        grads = try_lowrank_backward(grad_out, a_idx, b_idx, da, db)  # torch GEMMs, CPU or CUDA
        if grads is None:  # gradient-table gathers: CuPy kernels on CUDA
            backward = cuda_backend.lut_gemm_backward if a.is_cuda else grouped_lut_gemm_backward
            grads = backward(grad_out, a_idx, b_idx, da, db)
        grad_a, grad_b = grads
        return grad_a.to(a.dtype), grad_b.to(b.dtype), None, None, None


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, lut, grad: str) -> torch.Tensor:
    _check_grad(grad)
    integer = not (a.is_floating_point() or b.is_floating_point())
    tables = _tables(lut, a.device, with_gradients=grad == "lut" and not integer)
    if integer:
        return _code_gemm(a, b, tables[0]).round_().to(torch.int64)
    return _GroupedLutGemm.apply(a, b, *tables)


def lut_matmul(a: torch.Tensor, b: torch.Tensor, lut, grad: str = "ste") -> torch.Tensor:
    """Exact LUT matrix product of code tensors a [M, K] and b [K, N].

    ``lut`` is a :class:`Multiplier`, or a 256x256 array/tensor in the byte-indexed convention
    (signed operands assumed for ``grad="lut"``).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lut_matmul needs a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    return _grouped_gemm(a.unsqueeze(0), b.unsqueeze(0), lut, grad)[0]


def lut_conv2d(x: torch.Tensor, w: torch.Tensor, lut, stride=1, padding=0, dilation=1, groups: int = 1,
               pad_value: int = 0, grad: str = "ste") -> torch.Tensor:
    """Exact LUT convolution of codes x [B, C, H, W] with codes w [O, C/groups, kh, kw].

    Padded positions hold the code ``pad_value``. Without an autograd graph, low-rank LUTs gather
    their maps before any unfold (:func:`approxrun.ops.lowrank.try_lowrank_conv2d`); otherwise the
    input is unfolded (im2col) in batch blocks that keep memory bounded, and each group is a LUT GEMM.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"lut_conv2d needs x [B, C, H, W] and w [O, C/groups, kh, kw], "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    if channels % groups or out_channels % groups or channels // groups != group_channels:
        raise ValueError(f"lut_conv2d: {channels} input channels, {out_channels} output channels and "
                         f"weight {tuple(w.shape)} do not fit groups={groups}")
    ho = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    if ho <= 0 or wo <= 0:
        raise ValueError(f"lut_conv2d: input {height}x{width} is too small for kernel {kh}x{kw}")
    integer = not (x.is_floating_point() or w.is_floating_point())
    pad = (padding[1], padding[1], padding[0], padding[0])
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _differentiable_conv2d(F.pad(x, pad, value=float(pad_value)), w, lut, stride, dilation, groups, grad)
    xp = F.pad(x, pad, value=pad_value if not x.is_floating_point() else float(pad_value)) if any(padding) else x
    lut_values = _tables(lut, x.device, False)[0]
    out = try_lowrank_conv2d(xp, w, lut_values, stride, dilation, groups)  # maps gathered before any unfold
    if out is None:
        out = _unfolded_conv2d(xp, w, lut_values, stride, dilation, groups)
    return out.round_().to(torch.int64) if integer else out


def _unfolded_conv2d(xp: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, stride, dilation,
                     groups: int) -> torch.Tensor:
    """The convolution as LUT GEMMs of window rows, unfolded as int32 codes into scratch memory in
    batch blocks (no autograd graph): float64 [B, O, Ho, Wo]."""
    batch, channels, height, width = xp.shape
    out_channels, _, kh, kw = w.shape
    ho = conv_output_size(height, kh, stride[0], 0, dilation[0])
    wo = conv_output_size(width, kw, stride[1], 0, dilation[1])
    columns = grouped_columns(w, groups)  # [G, K, O/G]
    out = torch.empty(batch, out_channels, ho, wo, dtype=torch.float64, device=xp.device)
    by_group = out.view(batch, groups, out_channels // groups, ho * wo)
    block = max(1, UNFOLD_ELEMENTS // (channels * kh * kw * ho * wo))
    for b0 in range(0, batch, block):
        nb = min(batch, b0 + block) - b0
        rows = grouped_rows(xp[b0:b0 + nb], (kh, kw), stride, dilation, groups,
                            out=scratch("lut conv rows", (nb * channels * kh * kw * ho * wo,), torch.int32, xp.device))
        product = _code_gemm(rows, columns, lut)  # [G, nb*L, O/G]
        by_group[b0:b0 + nb].copy_(product.view(groups, nb, ho * wo, -1).permute(1, 0, 3, 2))
    return out


def _differentiable_conv2d(xp: torch.Tensor, w: torch.Tensor, lut, stride, dilation, groups: int,
                           grad: str) -> torch.Tensor:
    """The convolution through the differentiable grouped LUT GEMM, in batch chunks."""
    batch = xp.shape[0]
    out_channels, _, kh, kw = w.shape
    ho = conv_output_size(xp.shape[2], kh, stride[0], 0, dilation[0])
    wo = conv_output_size(xp.shape[3], kw, stride[1], 0, dilation[1])
    columns = grouped_columns(w.to(xp.dtype), groups)
    chunk = max(1, UNFOLD_ELEMENTS // (xp.shape[1] * kh * kw * ho * wo))
    outs = []
    for b0 in range(0, batch, chunk):
        rows = grouped_rows(xp[b0:b0 + chunk], (kh, kw), stride, dilation, groups)  # [G, b*L, K]
        out = _grouped_gemm(rows, columns, lut, grad)  # [G, b*L, O/G]
        nb = rows.shape[1] // (ho * wo)
        outs.append(out.reshape(groups, nb, ho * wo, -1).permute(1, 0, 3, 2).reshape(nb, out_channels, ho, wo))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
