"""Torch executors of the exact low-rank plans (CPU or CUDA): GEMMs, convolutions, backward.

- float plans: maps gathered by byte index, then float32 GEMMs over K chunks whose
  partial sums are integers below 2**24, summed in float64, or one float64 GEMM, rounded; a
  compiled float32 or int16 plan is one call of the compiled kernel;
- int8 plan (CPU): one gather of packed int8 words per index (per two indices for int8/uint8 codes:
  a byte pair indexes a 65536-word table), int8 GEMMs with int32 sums below 2**31;
- convolutions gather maps per input element, not per unfolded one: map-then-conv (one float32
  ``conv2d`` of the maps, exact when torch's backend is direct or im2col, checked per call) or an
  im2col of the packed int8 words;
- backward: float64 GEMMs over the maps of the low-rank LUT-derived gradient tables.

The executors take ``kernel``, the compiled CPU kernels (:class:`approxrun.ops.native.NativeGemm`)
or None: with them every map gather is one pass over the codes and the int8 plan one call; without
them, torch ops (:func:`torch_gather_rows`). A compiled plan needs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from approxrun.lut import code_to_index
from approxrun.ops.gather import FLOAT32_EXACT
from approxrun.ops.im2col import Workspace, conv_output_size, grouped_columns, grouped_rows, scratch
from approxrun.ops.lowrank.plans import GemmPlan, byte_pairs_readable
from approxrun.ops.lowrank.tables import Int8Maps, LowRankTable

__all__ = ["lowrank_gemm", "lowrank_call", "one_group", "int8_conv2d", "map_conv2d", "lowrank_backward",
           "torch_gather_rows", "gatherer"]

MAP_ELEMENTS = 1 << 22  # gathered map entries per GEMM block (16 MB of float32)
MAP_BYTES = 1 << 23  # gathered int8 maps per block of the int8 plan (scratch memory, reused)
# entries of a per block of the low-rank backward: on a CPU its float64 temporaries stay in cache
# (LeNet5's first layer at batch 128: 2**16, 6.0 ms; 2**22, 17 ms); on a GPU few launches
BACKWARD_BLOCK = {"cpu": 1 << 16, "cuda": 1 << 24}


def torch_gather_rows(codes: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None,
                      workspace: Workspace | None = None) -> torch.Tensor:
    """``table[byte(codes)]`` by torch ops: rows of ``table`` [256, ...] at the codes' bytes, shape
    ``codes.shape + table.shape[1:]`` (uint16 codes: byte pairs, ``table[codes]``), written into
    ``out`` when given. The index goes through ``workspace`` where given."""
    index = scratch(workspace, "gather index", codes.shape, torch.int32, codes.device)
    index = index.copy_(codes) if codes.dtype == torch.uint16 else code_to_index(codes, out=index)
    rows = table.shape[1:]
    if out is not None:
        out = out.view(-1, *rows)
    return torch.index_select(table, 0, index.view(-1), out=out).view(*codes.shape, *rows)


def gatherer(kernel, workspace: Workspace | None = None):
    """``gather_rows(codes, table, out=None)``: the compiled kernel's, else :func:`torch_gather_rows`."""
    if kernel is not None:
        return kernel.gather_rows
    return lambda codes, table, out=None: torch_gather_rows(codes, table, out, workspace)


def one_group(gemm, a: torch.Tensor, b: torch.Tensor, *args) -> torch.Tensor:
    """``gemm(a, b, *args)`` of grouped operands a [G, M, K], b [G, K, N], given those or one group's
    2-D a [M, K], b [K, N] (then a 2-D result)."""
    return gemm(a, b, *args) if a.dim() == 3 else gemm(a[None], b[None], *args)[0]


def lowrank_call(table: LowRankTable, plan: GemmPlan, kernel, device: torch.device,
                 workspace: Workspace | None = None):
    """The call ``(a, b, out_dtype) -> out`` that runs ``plan`` on ``device`` (see :func:`lowrank_gemm`),
    its maps looked up once: a caller that repeats a shape keeps it. A compiled plan takes 2-D codes
    as they are (one compiled call per GEMM); the others view them as one group. Scratch memory
    comes from ``workspace`` where given."""
    if plan.kind == "int8":
        return lambda a, b, out_dtype: one_group(_int8_gemm, a, b, table.int8, plan.k_chunk, kernel, out_dtype,
                                                 workspace)
    form = table if plan.form is None else plan.form
    if plan.compiled:  # maps read and multiplied in one compiled call
        x, y = form.pair_words(device) if plan.kind == "int16" else form.maps(device, plan.dtype)
        return lambda a, b, out_dtype: kernel.map_gemm(a, b, x, y, plan.k_chunk, form.denominator, out_dtype)
    return lambda a, b, out_dtype: one_group(_float_gemm, a, b, form, plan, kernel, out_dtype, workspace)


def lowrank_gemm(a: torch.Tensor, b: torch.Tensor, table: LowRankTable, plan: GemmPlan,
                 kernel=None, out_dtype: torch.dtype = torch.float64,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """out[g, m, n] = sum_k table[byte(a[g, m, k]), byte(b[g, k, n])] of code tensors a [G, M, K] and
    b [G, K, N] (or one group's 2-D a, b: a 2-D result), exact, as ``out_dtype`` (float64 or int64;
    see the module)."""
    return lowrank_call(table, plan, kernel, a.device, workspace)(a, b, out_dtype)


def _float_gemm(a: torch.Tensor, b: torch.Tensor, form: LowRankTable, plan: GemmPlan, kernel,
                out_dtype: torch.dtype, workspace: Workspace | None) -> torch.Tensor:
    """A float plan by torch GEMMs of gathered maps, in row blocks (bounded scratch memory)."""
    x, y = form.maps(a.device, plan.dtype)
    gather_rows = gatherer(kernel, workspace)
    groups, m, k = a.shape
    n = b.shape[2]
    width = form.width
    yb = gather_rows(b.transpose(1, 2).contiguous(), y).view(groups, n, k * width).transpose(1, 2)  # row (k, i)
    out = torch.empty(groups, m, n, dtype=torch.float64, device=a.device)
    chunk = plan.k_chunk
    rows = max(1, MAP_ELEMENTS // (k * width))
    a = a.contiguous()
    for m0 in range(0, m, rows):
        m1 = min(m, m0 + rows)
        xa = gather_rows(a[:, m0:m1], x,
                         out=scratch(workspace, "gemm maps", (groups, m1 - m0, k, width), x.dtype, a.device))
        xa = xa.view(groups, m1 - m0, k * width)
        for k0 in range(0, k, chunk):
            k1 = min(k, k0 + chunk)
            part = torch.bmm(xa[:, :, k0 * width:k1 * width], yb[:, k0 * width:k1 * width])
            if k0 == 0:
                out[:, m0:m1] = part
            else:
                out[:, m0:m1] += part
    if plan.kind == "float64":
        out.round_()
    elif form.denominator != 1:
        out.div_(form.denominator)
    return out.to(out_dtype)


def _gather_words(words: torch.Tensor, codes: torch.Tensor, name: str, gather_rows,
                  workspace: Workspace | None) -> torch.Tensor:
    """``words[byte(codes)]`` flattened, into scratch memory: int8 maps [codes.numel() * bytes per word]."""
    out = scratch(workspace, name + " words", (codes.numel(),), words.dtype, codes.device)
    return gather_rows(codes, words, out=out).view(-1).view(torch.int8)


def _int8_columns(b: torch.Tensor, maps: Int8Maps, gather_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """B-side operands of the int8 plan: int8 [G, K * width, N] (row (k, i) = y_i(b[k, :])), a
    column-major view (weights transposed for a linear layer: no copy), and the offset summed over
    K, int64 [G, N]."""
    _, y_words, offset = maps.tensors(b.device)
    codes = b.transpose(1, 2).contiguous()  # [G, N, K], a view for transposed weights
    groups, n, k = codes.shape
    y = gather_rows(codes, y_words).view(torch.int8).view(groups, n, k * maps.width)
    offset = gather_rows(codes, offset).sum(2)
    return y.transpose(1, 2), offset


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A 2-D operand ``torch._int_mm`` reads right: row-major with canonical strides, size-1 dims
    included (it misreads the arbitrary strides a contiguous view may carry on them), or an
    exactly column-major one."""
    if t.dim() == 2 and min(t.shape) > 1 and t.stride() == (1, t.shape[0]):
        return t
    if not t.is_contiguous():
        return t.contiguous()
    strides = [1] * t.dim()
    for d in range(t.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * t.shape[d + 1]
    return t.as_strided(t.shape, strides)


def _int8_words_gemm(x: torch.Tensor, y: torch.Tensor, chunk: int, width: int) -> torch.Tensor:
    """int8 GEMM of gathered maps x [rows, K * width] with y [K * width, N]: int32 sums over
    ``chunk`` K columns (exact below 2**31), as int32 (one chunk) or int64."""
    k = x.shape[1] // width
    if chunk >= k:
        return torch._int_mm(_dense(x), _dense(y))
    total = torch.zeros(x.shape[0], y.shape[1], dtype=torch.int64, device=x.device)
    for k0 in range(0, k, chunk):
        k1 = min(k, k0 + chunk)
        total += torch._int_mm(_dense(x[:, k0 * width:k1 * width]), _dense(y[k0 * width:k1 * width]))
    return total


def _int8_gemm(a: torch.Tensor, b: torch.Tensor, maps: Int8Maps, chunk: int, kernel,
               out_dtype: torch.dtype, workspace: Workspace | None) -> torch.Tensor:
    """The int8 plan: per block of rows, one gather of packed int8 maps per index and int8 GEMMs
    (int32 sums over ``chunk`` K columns), plus the offset, divided by the denominator (an exact
    integer quotient). Row blocks bound the scratch memory. The compiled kernel, where given, runs
    all of it in one call; else torch ops."""
    groups, m, k = a.shape
    rows = max(1, MAP_BYTES // (k * maps.width))
    if kernel is not None:
        buffer = scratch(workspace, "gemm rows words", (min(rows, m) * k * maps.width,), torch.int8, a.device)
        return kernel.int8_lowrank_gemm(a, b, maps, chunk, rows, buffer, out_dtype)
    gather_rows = gatherer(None, workspace)
    y, offset = _int8_columns(b, maps, gather_rows)
    b_bytes = _code_bytes(b, "gemm columns", workspace) if maps.code_scale else None
    out = torch.empty(groups, m, b.shape[2], dtype=torch.float64, device=a.device)
    a = a.contiguous()
    x_words, gathered = maps.tensors(a.device)[0], a
    if maps.width == 4 and a.dtype in (torch.int8, torch.uint8) and k % 2 == 0 and byte_pairs_readable():
        x_words, gathered = maps.pair_words(a.device), a.view(torch.uint16)  # byte pairs: half the gathers
    for g in range(groups):
        for m0 in range(0, m, rows):
            x = _gather_words(x_words, gathered[g, m0:m0 + rows], "gemm rows", gather_rows, workspace)
            x = x.view(-1, k * maps.width)
            block = out[g, m0:m0 + rows]
            block.copy_(_int8_words_gemm(x, y[g], chunk, maps.width))
            if maps.code_scale:
                a_bytes = _code_bytes(a[g, m0:m0 + rows], "gemm row codes", workspace)
                block.add_(_int8_words_gemm(a_bytes, b_bytes[g], chunk, 1), alpha=maps.code_scale)
        out[g] += offset[g]
    return (out.div_(maps.denominator) if maps.denominator != 1 else out).to(out_dtype)


def _code_bytes(codes: torch.Tensor, name: str, workspace: Workspace | None) -> torch.Tensor:
    """The codes' bytes read as int8 (their signed values; contiguous, scratch memory for other
    dtypes): the operands of the code GEMM."""
    if codes.dtype in (torch.int8, torch.uint8):
        return codes.contiguous().view(torch.int8)
    index = code_to_index(codes, out=scratch(workspace, name + " index", codes.shape, torch.int32, codes.device))
    return scratch(workspace, name + " bytes", codes.shape, torch.uint8, codes.device).copy_(index).view(torch.int8)


def int8_conv2d(x: torch.Tensor, w: torch.Tensor, table: LowRankTable, chunk: int, stride, dilation,
                groups: int, kernel=None, workspace: Workspace | None = None) -> torch.Tensor:
    """LUT convolution of padded codes x [B, C, H, W] with codes w [O, C/G, kh, kw] on the int8
    plan, float64 [B, O, Ho, Wo]: the maps are gathered once per input element (not per unfolded
    one) and the packed words are unfolded, in batch blocks."""
    maps = table.int8
    gather_rows = gatherer(kernel, workspace)
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    y, offset = _int8_columns(grouped_columns(w, groups), maps, gather_rows)
    x_words = maps.tensors(x.device)[0]
    ho = conv_output_size(height, kh, stride[0], 0, dilation[0])
    wo = conv_output_size(width, kw, stride[1], 0, dilation[1])
    out = torch.empty(batch, out_channels, ho, wo, dtype=torch.float64, device=x.device)
    by_group = out.view(batch, groups, out_channels // groups, ho * wo)
    k = group_channels * kh * kw
    block = max(1, MAP_BYTES // (ho * wo * channels * kh * kw * maps.width))
    for b0 in range(0, batch, block):
        nb = min(batch, b0 + block) - b0
        words = _gather_words(x_words, x[b0:b0 + nb].contiguous(), "conv input", gather_rows,
                              workspace).view(x_words.dtype)
        words = words.view(nb, channels, height, width)
        rows = grouped_rows(words, (kh, kw), stride, dilation, groups,
                            out=scratch(workspace, "conv rows", (groups * nb * ho * wo * k,), words.dtype, x.device),
                            kernel=kernel)
        for g in range(groups):
            product = _int8_words_gemm(rows[g].view(torch.int8), y[g], chunk, maps.width).view(nb, ho * wo, -1)
            by_group[b0:b0 + nb, g].copy_(product.transpose(1, 2))
    by_group += offset[None, :, :, None]
    return out.div_(maps.denominator) if maps.denominator != 1 else out


_EXACT_CONV_BACKENDS = ("Mkldnn", "Slow2d", "SlowDilated2d")  # direct or im2col + GEMM: no Winograd/FFT


def _float32_conv_is_exact(x: torch.Tensor, w: torch.Tensor, stride, dilation, groups: int) -> bool:
    """Whether torch computes this float32 conv2d as plain sums of products (then integer operands
    with every partial sum below 2**24 give the exact result): a CPU backend that is direct (oneDNN's
    ``convolution_direct``, which torch always asks for) or im2col + GEMM, at IEEE float32
    precision. NNPACK's or cuDNN's Winograd/FFT algorithms would round."""
    select = getattr(torch._C, "_select_conv_backend", None)
    if x.device.type != "cpu" or select is None:
        return False
    mkldnn = torch.backends.mkldnn
    precisions = (getattr(mkldnn, "fp32_precision", "none"),
                  getattr(getattr(mkldnn, "conv", None), "fp32_precision", "none"))
    if any(p not in ("none", "ieee") for p in precisions) or torch.get_float32_matmul_precision() != "highest":
        return False
    try:
        backend = select(x, w, None, list(stride), [0, 0], list(dilation), False, [0, 0], groups, None)
    except (RuntimeError, TypeError):
        return False
    return str(backend).rsplit(".", 1)[-1] in _EXACT_CONV_BACKENDS


def map_conv2d(x: torch.Tensor, w: torch.Tensor, table: LowRankTable, stride, dilation,
               groups: int, kernel=None, workspace: Workspace | None = None) -> torch.Tensor | None:
    """Map-then-conv: one float32 conv2d of the factor maps of padded codes x [B, C, H, W] with
    those of codes w [O, C/G, kh, kw] (channel (c, i) holds map i of channel c), float64
    [B, O, Ho, Wo]; None unless provably exact (see :func:`_float32_conv_is_exact`, and every
    partial sum is an integer below K * bound < 2**24)."""
    maps = table.conv_maps
    out_channels, group_channels, kh, kw = w.shape
    if maps is None or x.device.type != "cpu" or group_channels * kh * kw * maps.bound >= FLOAT32_EXACT:
        return None
    x_map, y_map = maps.tensors(x.device)
    rank = x_map.shape[1]
    batch, channels, height, width = x.shape
    gather_rows = gatherer(kernel, workspace)
    xm = gather_rows(x.contiguous(), x_map).permute(0, 1, 4, 2, 3).reshape(batch, channels * rank, height, width)
    ym = gather_rows(w.contiguous(), y_map).permute(0, 1, 4, 2, 3).reshape(out_channels, group_channels * rank,
                                                                             kh, kw)
    if not _float32_conv_is_exact(xm, ym, stride, dilation, groups):
        return None
    out = F.conv2d(xm, ym, stride=stride, dilation=dilation, groups=groups).double()
    return out.div_(maps.denominator) if maps.denominator != 1 else out


def lowrank_backward(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fa: LowRankTable,
                     fb: LowRankTable, needs: tuple[bool, bool] = (True, True),
                     block_elements: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_a, grad_b) of the LUT GEMM of codes a [G, M, K], b [G, K, N] with low-rank gradient
    tables ``fa``, ``fb``, in float64; None where ``needs`` says the gradient is not wanted (a
    network's input, a frozen weight).

    With ``da = sum_i p_i q_i^T`` and ``db = sum_i r_i s_i^T``: grad_a[m, k] = sum_i p_i(a_mk)
    (grad_out @ q_i(b)^T)[m, k] and grad_b[k, n] = sum_i s_i(b_kn) (r_i(a)^T @ grad_out)[k, n]: GEMMs
    per factor column, over blocks of about ``block_elements`` rows x K (default: by device, see
    :data:`BACKWARD_BLOCK`) whose byte indices, gathered maps and products stay in cache.
    """
    groups, m, k = a.shape
    n = b.shape[2]
    grad_out = grad_out.to(torch.float64)
    b_idx = code_to_index(b)
    # a zero gradient table has width 0: its gradient stays zero
    want_a, want_b = needs[0] and fa.width > 0, needs[1] and fb.width > 0
    grad_a = grad_b = None
    if needs[0]:  # filled block by block below, unless zero
        grad_a = (torch.empty if want_a else torch.zeros)(groups, m, k, dtype=torch.float64, device=a.device)
    if needs[1] and not want_b:
        grad_b = torch.zeros(groups, k, n, dtype=torch.float64, device=a.device)
    if want_a:
        p, q = (t.t().contiguous() for t in fa.maps(a.device, torch.float64))  # [width, 256]
        qb = torch.stack([torch.take(column, b_idx) for column in q], 1)  # [G, width, K, N]
        qb = qb.reshape(groups, fa.width * k, n).transpose(1, 2)  # [G, N, (i, k)]
    if want_b:
        r, s = (t.t().contiguous() for t in fb.maps(a.device, torch.float64))
        through_a = torch.zeros(fb.width, groups, k, n, dtype=torch.float64, device=a.device)
    if block_elements is None:
        block_elements = BACKWARD_BLOCK["cuda" if a.is_cuda else "cpu"]
    rows = max(1, block_elements // k)
    for m0 in range(0, m if want_a or want_b else 0, rows):
        block, g_rows = code_to_index(a[:, m0:m0 + rows]), grad_out[:, m0:m0 + rows]
        if want_a:
            through_b = torch.bmm(g_rows, qb)  # [G, rows, (i, k)]
            total = torch.take(p[0], block).mul_(through_b[..., :k])
            for i in range(1, fa.width):
                total.addcmul_(torch.take(p[i], block), through_b[..., i * k:(i + 1) * k])
            grad_a[:, m0:m0 + rows] = total
        if want_b:
            for i in range(fb.width):
                through_a[i].baddbmm_(torch.take(r[i], block).transpose(1, 2), g_rows)
    if want_b:
        grad_b = torch.take(s[0], b_idx).mul_(through_a[0])
        for i in range(1, fb.width):
            grad_b.addcmul_(torch.take(s[i], b_idx), through_a[i])
    return grad_a, grad_b
