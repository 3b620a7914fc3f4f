"""The routes of an exact LUT convolution without autograd, each picked with the table's
:class:`~approxrun.ops.engine.LutEngine` and its route model:

- low rank, maps gathered per input element rather than per unfolded one: map-then-conv (a float32
  convolution of the maps) or the int8 plan's im2col of packed maps (CPU);
- on CUDA, where the engine takes the gathers: the im2col kernel, which writes the GEMM operand
  straight from x (no unfold);
- otherwise window rows unfolded as int32 codes in batch blocks (:meth:`LutEngine.unfold_block`),
  each block one LUT GEMM of the engine (which picks that GEMM's own route).
"""

from __future__ import annotations

import logging

import torch

from approxrun.ops.im2col import conv_output_size, grouped_columns, grouped_rows, scratch
from approxrun.ops.lowrank import int8_conv2d, map_conv2d, map_conv_time

__all__ = ["engine_conv2d"]

log = logging.getLogger("approxrun.ops.lowrank")  # the engine's route log


def engine_conv2d(engine, xp: torch.Tensor, w: torch.Tensor, stride, dilation, groups: int,
                  pad_value: int = 0, padding=(0, 0)) -> torch.Tensor:
    """LUT convolution through ``engine`` of codes x [B, C, H, W] (padded by ``padding`` with
    ``pad_value``; CPU callers may pass it padded already) and codes w, no autograd: float64
    [B, O, Ho, Wo]."""
    if xp.is_cuda and _cuda_conv_gathers(engine, xp, w, stride, padding, dilation, groups):
        from approxrun.ops import cuda
        return cuda.conv2d(xp, w, engine.cuda_image(xp.device), stride, padding, dilation, groups, pad_value)
    if any(padding):
        xp = torch.nn.functional.pad(xp, (padding[1], padding[1], padding[0], padding[0]),
                                     value=float(pad_value) if xp.is_floating_point() else pad_value)
    out = _lowrank_conv2d(engine, xp, w, stride, dilation, groups)
    return out if out is not None else _unfolded_conv2d(engine, xp, w, stride, dilation, groups)


def _gemm_shape(x, w, stride, padding, dilation, groups) -> tuple[int, int, int]:
    """(M, K, N) of each group's GEMM in a convolution of x [B, C, H, W] (padded by ``padding``)
    with w [O, C/G, kh, kw]."""
    out_channels, group_channels, kh, kw = w.shape
    m = x.shape[0] * conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0]) * conv_output_size(
        x.shape[3], kw, stride[1], padding[1], dilation[1])
    return m, group_channels * kh * kw, out_channels // groups


def _cuda_conv_gathers(engine, x, w, stride, padding, dilation, groups) -> bool:
    """Whether a CUDA convolution takes the gather kernels (then im2col on the GPU, no unfold)."""
    return engine.plan(groups, *_gemm_shape(x, w, stride, padding, dilation, groups), x.device)[0] is None


def _lowrank_conv2d(engine, x, w, stride, dilation, groups):
    """Map-then-conv or the int8 plan's im2col of packed maps, when the route choice takes low rank;
    else None."""
    m, k, n = _gemm_shape(x, w, stride, (0, 0), dilation, groups)
    if engine.strategy == "gather" or not groups * m * k * n or engine.lowrank is None:
        return None
    table = engine.lowrank
    maps = table.conv_maps if "map_conv" in engine.routes and x.device.type == "cpu" else None
    if maps is not None and (engine.strategy == "lowrank" or engine.decided(
            ("map conv", groups, m, k, n, x.numel(), torch.get_float32_matmul_precision()),
            lambda: _maps_first(engine, x.numel(), groups, m, k, n))):
        out = map_conv2d(x, w, table, stride, dilation, groups, engine.cpu_kernel(x.device), engine.workspace)
        if out is not None:
            log.debug("lut conv2d: low rank %d, map-then-conv, shape G=%d M=%d K=%d N=%d", table.rank,
                      groups, m, k, n)
            return out
    plan = engine.logged_plan("conv2d", groups, m, k, n, x.device)
    if plan is None or plan.kind != "int8" or table.int8.code_scale:
        return None
    log.debug("lut conv2d: low rank %d, int8 im2col of packed maps", table.rank)
    return int8_conv2d(x, w, table, plan.k_chunk, stride, dilation, groups, engine.cpu_kernel(x.device),
                       engine.workspace)


def _maps_first(engine, input_elements: int, groups: int, m: int, k: int, n: int) -> bool:
    """Whether map-then-conv is modelled faster than the unfolded routes of a CPU convolution (the
    GEMM the engine would pick, plus the unfold and the copy of its output)."""
    cal = engine.calibration
    plan = engine.plan(groups, m, k, n, torch.device("cpu"))[0]
    gather = engine.gather_route(groups, m, k, n, torch.device("cpu"))[1]
    unfolded = min(gather, gather if plan is None else plan.time) + cal.unfold_time(groups, m, k, n)
    return map_conv_time(cal, input_elements, groups, m, k, n, engine.lowrank.conv_maps.width) < unfolded


def _unfolded_conv2d(engine, xp, w, stride, dilation, groups):
    """The convolution as LUT GEMMs of window rows, unfolded as int32 codes into scratch memory in
    batch blocks sized for the device."""
    batch, channels, height, width = xp.shape
    out_channels, _, kh, kw = w.shape
    ho = conv_output_size(height, kh, stride[0], 0, dilation[0])
    wo = conv_output_size(width, kw, stride[1], 0, dilation[1])
    columns = grouped_columns(w, groups)  # [G, K, O/G]
    out = torch.empty(batch, out_channels, ho, wo, dtype=torch.float64, device=xp.device)
    by_group = out.view(batch, groups, out_channels // groups, ho * wo)
    block = max(1, engine.unfold_block(xp.device) // (channels * kh * kw * ho * wo))
    kernel = engine.cpu_kernel(xp.device)
    for b0 in range(0, batch, block):
        nb = min(batch, b0 + block) - b0
        rows = grouped_rows(xp[b0:b0 + nb], (kh, kw), stride, dilation, groups,
                            out=scratch(engine.workspace, "lut conv rows", (nb * channels * kh * kw * ho * wo,),
                                        torch.int32, xp.device), kernel=kernel)
        product = engine.gemm(rows, columns)  # [G, nb*L, O/G]
        by_group[b0:b0 + nb].copy_(product.view(groups, nb, ho * wo, -1).permute(1, 0, 3, 2))
    return out
