"""Exact LUT GEMM by table gathers, in plain torch (runs on CPU; also correct on any device).

For a tile of k and n, the table ``T[(k, v), n] = lut[v, b[k, n]]`` holds every product a weight
column can produce; ``out[m, n] = sum_k T[(k, a[m, k]), n]`` is then one ``embedding_bag`` sum per
row. Tiles keep the table cache-sized; partial sums are exact in float32 while
``tile_k * max|lut| < 2**24`` (else the table is float64) and are accumulated in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT32_EXACT = 2**24
TABLE_ELEMENTS = 2048 * 256  # kc * nc * 256 per tile: 2 MB of float32
ROW_ELEMENTS = 1 << 22  # rows * tile_k index elements per call (32 MB of int64)


def _tile_sizes(k: int, n: int) -> tuple[int, int]:
    nc = min(n, 64)
    kc = max(1, min(k, TABLE_ELEMENTS // (256 * nc)))
    return kc, nc


def table_dtype(lut: torch.Tensor, tile_k: int) -> torch.dtype:
    """float32 when every partial sum of a tile is an exactly representable integer."""
    peak = int(lut.abs().max()) if lut.numel() else 0
    return torch.float32 if peak * tile_k < FLOAT32_EXACT else torch.float64


def grouped_lut_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """out[g, m, n] = sum_k lut[a_idx[g, m, k], b_idx[g, k, n]], exact, as float64.

    ``a_idx`` [G, M, K] and ``b_idx`` [G, K, N] hold LUT byte indices (int64); ``lut`` is the
    [256, 256] table (any real dtype with integer values).
    """
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    kc, nc = _tile_sizes(k, n)
    values = lut.to(table_dtype(lut, kc))
    out = torch.zeros(groups, m, n, dtype=torch.float64, device=a_idx.device)
    offsets = torch.arange(kc, device=a_idx.device) * 256
    rows_per_call = max(1, ROW_ELEMENTS // kc)
    for g in range(groups):
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            idx = a_idx[g, :, k0:k1] + offsets[: k1 - k0]
            for n0 in range(0, n, nc):
                n1 = min(n, n0 + nc)
                # T[(k, v), n] = values[v, b[k, n]]
                tile = values.t()[b_idx[g, k0:k1, n0:n1]].transpose(1, 2).reshape(-1, n1 - n0)
                for m0 in range(0, m, rows_per_call):
                    m1 = min(m, m0 + rows_per_call)
                    out[g, m0:m1, n0:n1] += F.embedding_bag(idx[m0:m1], tile, mode="sum")
    return out


def depthwise_lut_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The grouped GEMM for one output per group (N = 1): out[g, m] = sum_k lut[a[g, m, k], b[g, k]].

    Gathers from a per-group table ``T[(g, k, v)] = lut[v, b[g, k]]``; exact in float64.
    """
    groups, m, k = a_idx.shape
    table = lut.to(torch.float64).t()[b_idx].reshape(-1)  # [(g, k, v)]
    base = (torch.arange(groups, device=a_idx.device)[:, None, None] * k
            + torch.arange(k, device=a_idx.device)[None, None, :]) * 256
    out = torch.empty(groups, m, dtype=torch.float64, device=a_idx.device)
    step = max(1, ROW_ELEMENTS // (groups * k))
    for m0 in range(0, m, step):
        m1 = min(m, m0 + step)
        out[:, m0:m1] = table[base + a_idx[:, m0:m1]].sum(-1)
    return out
