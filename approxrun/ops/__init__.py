"""Exact LUT operations on integer codes: the contract layers, users and other backends rely on.

``lut_matmul(a, b, lut)``: out[m, n] = sum_k lut[byte(a[m, k])][byte(b[k, n])].
``lut_conv2d(x, w, lut, ...)``: the same product inside a 2-D convolution; padded positions hold
``pad_value`` (the layer passes the activation zero point, the code of real 0).

The table's engine (:mod:`approxrun.ops.engine`) owns its derived forms and picks the route.
Integer inputs give an int64 result without autograd. Floating inputs (codes held in floats, as
the layers use them) give a float64 result that is differentiable: ``grad="ste"`` (default) gives
the gradients of the exact product, ``grad="lut"`` gradients from the LUT's smoothed finite
differences (:mod:`approxrun.ops.gradients`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from approxrun.ops.convolution import engine_conv2d
from approxrun.ops.engine import ROUTE_KINDS, STRATEGIES, LutEngine
from approxrun.ops.im2col import conv_output_size, grouped_columns, grouped_rows
from approxrun.ops.lowrank import one_group
from approxrun.ops.registry import DEFAULT_ENGINES, EngineRegistry

__all__ = ["lut_matmul", "lut_conv2d", "GRAD_MODES", "STRATEGIES", "ROUTE_KINDS", "LutEngine", "EngineRegistry",
           "DEFAULT_ENGINES", "engine_for"]

GRAD_MODES = ("ste", "lut")


def engine_for(lut, signed_a: bool = True, signed_b: bool = True, engines: EngineRegistry | None = None) -> LutEngine:
    """The :class:`LutEngine` of ``lut``: the engine itself, a Multiplier's own, or the one ``engines``
    (default :data:`DEFAULT_ENGINES`) keeps for a raw 256x256 array or tensor of that content."""
    return (DEFAULT_ENGINES if engines is None else engines).engine_for(lut, signed_a, signed_b)


def _check_grad(grad: str) -> None:
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")


class _GroupedLutGemm(torch.autograd.Function):
    """out[g] = a[g] (LUT-product) b[g] on code tensors held in floats."""

    @staticmethod
    def forward(ctx, a, b, engine, lut_gradients):
        out = engine.gemm(a, b)
        ctx.save_for_backward(a, b)
        ctx.engine, ctx.lut_gradients = engine, lut_gradients
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if not ctx.lut_gradients:  # straight-through: gradients of the exact product
            grad_out = grad_out.to(a.dtype)
            return (grad_out @ b.transpose(1, 2) if needs[0] else None,
                    a.transpose(1, 2) @ grad_out if needs[1] else None, None, None)
        grad_a, grad_b = ctx.engine.backward(grad_out, a, b, needs)
        return (None if grad_a is None else grad_a.to(a.dtype), None if grad_b is None else grad_b.to(b.dtype),
                None, None)


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, engine: LutEngine, grad: str) -> torch.Tensor:
    """The LUT GEMM of a [G, M, K] and b [G, K, N]; integer codes may also come as one group's 2-D
    a [M, K] and b [K, N] (a 2-D result: no views around the engine's call)."""
    _check_grad(grad)
    if not (a.is_floating_point() or b.is_floating_point()):
        if engine.integral:  # every route's sums are exact integers
            return engine.gemm(a, b, torch.int64)
        return engine.gemm(a, b).round_().to(torch.int64)
    return one_group(_GroupedLutGemm.apply, a, b, engine, grad == "lut")


def lut_matmul(a: torch.Tensor, b: torch.Tensor, lut, grad: str = "ste", *, signed_a: bool = True,
               signed_b: bool = True, engines: EngineRegistry | None = None) -> torch.Tensor:
    """Exact LUT matrix product of code tensors a [M, K] and b [K, N].

    ``lut`` is a :class:`LutEngine`, a :class:`~approxrun.multipliers.Multiplier` (its engine), or a
    256x256 array/tensor in the byte-indexed convention (its engine found by content in ``engines``;
    ``signed_a``/``signed_b`` order the operands for ``grad="lut"``).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lut_matmul needs a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    return _grouped_gemm(a, b, engine_for(lut, signed_a, signed_b, engines), grad)


def lut_conv2d(x: torch.Tensor, w: torch.Tensor, lut, stride=1, padding=0, dilation=1, groups: int = 1,
               pad_value: int = 0, grad: str = "ste", *, signed_a: bool = True, signed_b: bool = True,
               engines: EngineRegistry | None = None) -> torch.Tensor:
    """Exact LUT convolution of codes x [B, C, H, W] with codes w [O, C/groups, kh, kw].

    Padded positions hold the code ``pad_value``; ``lut`` as in :func:`lut_matmul`. Without an
    autograd graph the engine picks the route (low-rank maps gathered before any unfold, the CUDA
    im2col kernel, or an unfold in bounded batch blocks); with one, the input is unfolded in batch
    chunks and each group is a differentiable LUT GEMM.
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
    _check_grad(grad)
    engine = engine_for(lut, signed_a, signed_b, engines)
    integer = not (x.is_floating_point() or w.is_floating_point())
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        pad = (padding[1], padding[1], padding[0], padding[0])
        return _differentiable_conv2d(F.pad(x, pad, value=float(pad_value)), w, engine, stride, dilation, groups, grad)
    out = engine_conv2d(engine, x, w, stride, dilation, groups, pad_value, padding)
    return out.round_().to(torch.int64) if integer else out


def _differentiable_conv2d(xp: torch.Tensor, w: torch.Tensor, engine: LutEngine, stride, dilation, groups: int,
                           grad: str) -> torch.Tensor:
    """The convolution through the differentiable grouped LUT GEMM, in batch chunks."""
    batch = xp.shape[0]
    out_channels, _, kh, kw = w.shape
    ho = conv_output_size(xp.shape[2], kh, stride[0], 0, dilation[0])
    wo = conv_output_size(xp.shape[3], kw, stride[1], 0, dilation[1])
    columns = grouped_columns(w.to(xp.dtype), groups)
    chunk = max(1, engine.unfold_block(xp.device) // (xp.shape[1] * kh * kw * ho * wo))
    outs = []
    for b0 in range(0, batch, chunk):
        rows = grouped_rows(xp[b0:b0 + chunk], (kh, kw), stride, dilation, groups)  # [G, b*L, K]
        out = _grouped_gemm(rows, columns, engine, grad)  # [G, b*L, O/G]
        nb = rows.shape[1] // (ho * wo)
        outs.append(out.reshape(groups, nb, ho * wo, -1).permute(1, 0, 3, 2).reshape(nb, out_channels, ho, wo))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
