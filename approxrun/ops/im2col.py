"""im2col for the LUT convolutions, on any dtype, and reusable scratch memory.

A LUT convolution is a grouped GEMM of window rows [G, B*Ho*Wo, C/G*kh*kw] (the K order is
(channel, kernel row, kernel column), as ``conv2d`` weights flatten) with weight columns
[G, C/G*kh*kw, O/G]. The windows are a strided view of the (already padded) input; one copy turns
them into rows. Scratch tensors are reused from a :class:`Workspace` (an engine's own, per thread):
on some machines touching fresh memory costs as much as the gathers that fill it.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["conv_output_size", "tap_slice", "windows", "grouped_rows", "grouped_columns", "Workspace", "scratch"]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def tap_slice(tap: int, out_size: int, stride: int, dilation: int) -> slice:
    """The input positions along one axis that kernel tap ``tap`` reads for ``out_size`` outputs."""
    return slice(tap * dilation, tap * dilation + (out_size - 1) * stride + 1, stride)


def windows(x: torch.Tensor, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """The windows of a padded input [B, C, H, W] as a view [G, B, Ho, Wo, C/G, kh, kw]."""
    x = x.contiguous()
    batch, channels, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    ho, wo = conv_output_size(height, kh, sh, 0, dh), conv_output_size(width, kw, sw, 0, dw)
    s_b, s_c, s_h, s_w = x.stride()
    per_group = channels // groups
    return x.as_strided((groups, batch, ho, wo, per_group, kh, kw),
                        (per_group * s_c, s_b, sh * s_h, sw * s_w, s_c, dh * s_h, dw * s_w))


def grouped_rows(x: torch.Tensor, kernel_size, stride, dilation, groups: int,
                 out: torch.Tensor | None = None, kernel=None) -> torch.Tensor:
    """Window rows [G, B*Ho*Wo, C/G*kh*kw] of a padded input [B, C, H, W] (differentiable), copied
    into ``out`` when given (a tensor of that many elements): by ``kernel``'s compiled im2col (a
    :class:`~approxrun.ops.native.NativeGemm`; CPU, int32 or int64 ``out``) where given."""
    if out is None and torch.is_grad_enabled() and x.requires_grad:
        return _WindowRows.apply(x, kernel_size, stride, dilation, groups)
    view = windows(x, kernel_size, stride, dilation, groups)
    groups_, batch, ho, wo, per_group, kh, kw = view.shape
    shape = (groups_, batch * ho * wo, per_group * kh * kw)
    if out is None:
        return view.reshape(shape)
    if kernel is not None and x.device.type == "cpu" and out.dtype in (torch.int32, torch.int64):
        return kernel.unfold_rows(x, kernel_size, stride, dilation, groups, out).view(shape)
    return out.view(view.shape).copy_(view).view(shape)


class _WindowRows(torch.autograd.Function):
    """``grouped_rows`` whose backward adds each kernel tap's gradients into the input by one strided
    slice add (autograd through the window view scatters by ``index_add_`` instead: LeNet5's second
    layer at batch 128, 1.4 against 2.6 ms; ``F.fold`` took 2.3-3.4)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, dilation, groups: int):
        ctx.geometry = (x.shape, kernel_size, stride, dilation, groups)
        return grouped_rows(x, kernel_size, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad_rows):
        (batch, channels, height, width), (kh, kw), (sh, sw), (dh, dw), groups = ctx.geometry
        ho, wo = conv_output_size(height, kh, sh, 0, dh), conv_output_size(width, kw, sw, 0, dw)
        taps = grad_rows.reshape(groups, batch, ho, wo, channels // groups, kh, kw).permute(1, 0, 4, 5, 6, 2, 3)
        grad_x = grad_rows.new_zeros(batch, groups, channels // groups, height, width)
        for i in range(kh):
            for j in range(kw):
                grad_x[..., tap_slice(i, ho, sh, dh), tap_slice(j, wo, sw, dw)] += taps[..., i, j, :, :]
        return grad_x.view(batch, channels, height, width), None, None, None, None


def grouped_columns(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv weights [O, C/G, kh, kw] as GEMM columns [G, C/G*kh*kw, O/G] per group."""
    return w.reshape(groups, w.shape[0] // groups, -1).transpose(1, 2)


class Workspace:
    """Reusable scratch tensors by name, grown on demand, one set per thread: a tensor's contents
    last until that thread's next request under the same name. An engine owns one (its gathered
    maps, unfolded rows and indices), so the memory lives and goes with the engine; a copy or a
    pickle of it starts empty."""

    def __init__(self):
        self._threads = threading.local()

    def __reduce__(self):
        return Workspace, ()

    def tensor(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        buffers = self._threads.__dict__.setdefault("buffers", {})
        key = (name, dtype, str(device))
        if key not in buffers or buffers[key].numel() < numel:
            buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffers[key][:numel].view(shape)


def scratch(workspace: Workspace | None, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``workspace``'s tensor under ``name`` (see :class:`Workspace`), or a fresh one without a workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.tensor(name, shape, dtype, device)
