"""Exact LUT GEMM by table gathers, in plain torch (runs on CPU; also correct on any device).

Two strategies, picked per call by which costs fewer memory operations:

- table: for a tile of k and n, ``T[(v, k), n] = lut[v, b[k, n]]`` holds every product a weight
  column can produce; ``out[m, n] = sum_k T[(a[m, k], k), n]`` is then one ``embedding_bag`` row
  sum per output row. Building tables costs ``256 * K * N`` writes, so the table goes on the
  smaller of the two outer sides (the transposed problem when M < N);
- direct: when both outer sides are small (a table entry would be read fewer times than writing
  it costs) or one of them is 1, every product is gathered straight from the flat LUT,
  ``lut[(a[m, k] << 8) | b[k, n]]``.

Tile sizes come from best-of-many timings on the 2-core dev machine (``benchmarks/bench_ops.py``).
Temporaries are chunk-sized and reused: a fresh index array the size of ``a`` costs page faults
that take longer than the lookups themselves.

Exactness: a float32 table is used while every partial sum of a tile is an exactly representable
integer (``tile_k * max|lut| < 2**24``), float64 otherwise; tiles are accumulated in float32 when
the whole sum fits (``K * max|lut| < 2**24``), else in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from approxrun.lut import code_to_index

FLOAT32_EXACT = 2**24
TABLE_BYTES = 1 << 21  # one table tile: about the L2 cache, gathered from by every row chunk
CHUNK_INDICES = 1 << 20  # index elements per embedding_bag call (fewer, larger calls amortise their overhead)
MAX_TILE_K = 64  # deeper tiles of narrow rows fall out of L2 while the row chunks gather from them
WIDE_ROW = 64  # table columns per tile; wider rows gather more products per index
TRANSPOSE_BLOCK = 64  # columns per block of a transposing copy
DIRECT_ROWS = 192  # default only: the engine decides by this machine's measured costs


def _peak(lut: torch.Tensor) -> int:
    return int(lut.abs().max()) if lut.numel() else 0


def _exact_dtype(peak: int, terms: int) -> torch.dtype:
    """float32 when any sum of ``terms`` LUT entries is an exactly representable integer."""
    return torch.float32 if peak * terms < FLOAT32_EXACT else torch.float64


def _float32_tile_k(k: int, peak: int) -> tuple[int, torch.dtype]:
    """(terms per partial sum, dtype): all k in float32 if exact, else fewer; float64 for huge entries."""
    if peak >= FLOAT32_EXACT:
        return k, torch.float64
    return (min(k, (FLOAT32_EXACT - 1) // peak) if peak else k), torch.float32


def _tile_sizes(k: int, n: int, peak: int) -> tuple[int, int, torch.dtype]:
    """(tile_k, tile_n, table dtype): the widest rows, then as many k as the table budget allows."""
    nc = min(n, WIDE_ROW)
    exact_k, dtype = _float32_tile_k(k, peak)
    kc = max(1, min(exact_k, MAX_TILE_K, TABLE_BYTES // (256 * nc * dtype.itemsize)))
    return kc, nc, dtype


def _int32_rows(x: torch.Tensor) -> torch.Tensor:
    """A contiguous int32 copy of index tensor x [G, R, K] (the rows of an embedding_bag call).

    A transposed ``x`` is copied in blocks of columns: one strided pass over a row-major source
    whose row length is a power of two maps every read to the same cache set and runs ~10x slower.
    """
    if x.is_contiguous():
        return x.to(torch.int32)
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    for k0 in range(0, x.shape[2], TRANSPOSE_BLOCK):
        out[:, :, k0:k0 + TRANSPOSE_BLOCK].copy_(x[:, :, k0:k0 + TRANSPOSE_BLOCK])
    return out


def _use_direct(m: int, n: int) -> bool:
    """Direct gathers for small outer sides, and when a table row would hold a single product."""
    return max(m, n) < DIRECT_ROWS or min(m, n) == 1


def grouped_lut_gemm(a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor, direct: bool | None = None) -> torch.Tensor:
    """out[g, m, n] = sum_k lut[byte(a[g, m, k]), byte(b[g, k, n])], exact, as float64.

    ``a`` [G, M, K] and ``b`` [G, K, N] hold integer codes (any integer or float dtype; byte
    indices are codes too); ``lut`` is the [256, 256] table (any real dtype with integer values).
    The table strategy reads the rows side chunk by chunk, taking its bytes on the way. ``direct``
    picks the strategy (the caller's measured choice); None: by :data:`DIRECT_ROWS`.
    """
    groups, m, k = a.shape
    n = b.shape[2]
    if k == 0 or m == 0 or n == 0:
        return torch.zeros(groups, m, n, dtype=torch.float64, device=a.device)
    peak = _peak(lut)
    if min(m, n) == 1 or (_use_direct(m, n) if direct is None else direct):
        return _direct_gemm(code_to_index(a), code_to_index(b), lut, peak)
    if m < n:  # out^T = b^T (x) a^T with the transposed table: the table goes on the M side
        return _table_gemm(b.transpose(1, 2), code_to_index(a).transpose(1, 2), lut.t(), peak).transpose(1, 2)
    return _table_gemm(a, code_to_index(b), lut, peak)


def _table_gemm(a: torch.Tensor, b_idx: torch.Tensor, lut: torch.Tensor, peak: int) -> torch.Tensor:
    """The table strategy: per tile of k, tables for every tile of n, then row sums by embedding_bag
    (``a``: codes, ``b_idx``: byte indices)."""
    groups, m, k = a.shape
    n = b_idx.shape[2]
    kc, nc, table_dtype = _tile_sizes(k, n, peak)
    values = lut.to(table_dtype).contiguous()
    out = torch.empty(groups, m, n, dtype=_exact_dtype(peak, k), device=a.device)
    rows_per_call = max(1, min(m, CHUNK_INDICES // kc))
    # one reused int32 buffer for the embedding_bag rows: no index copy of the whole of a
    row_buffer = torch.empty(rows_per_call * kc, dtype=torch.int32, device=a.device)
    for g in range(groups):
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            offsets = torch.arange(k1 - k0, dtype=torch.int32, device=a.device)
            # T[(v, k), n] = values[v, b[k, n]]: row v * tile_k + k, one table per tile of n
            tables = [(n0, _table(values, b_idx[g, k0:k1, n0:n0 + nc])) for n0 in range(0, n, nc)]
            for m0 in range(0, m, rows_per_call):
                m1 = min(m, m0 + rows_per_call)
                rows = row_buffer[:(m1 - m0) * (k1 - k0)].view(m1 - m0, k1 - k0)
                code_to_index(a[g, m0:m1, k0:k1], out=rows)
                torch.add(offsets, rows, alpha=k1 - k0, out=rows)
                for n0, table in tables:
                    partial = F.embedding_bag(rows, table, mode="sum")
                    target = out[g, m0:m1, n0:n0 + table.shape[1]]
                    if k0 == 0:
                        target.copy_(partial)
                    else:
                        target.add_(partial)
    return out.to(torch.float64)


def _table(values: torch.Tensor, b_tile: torch.Tensor) -> torch.Tensor:
    """T[v * tile_k + k, n] = values[v, b_tile[k, n]]: one gather along the LUT's B axis."""
    return values.index_select(1, b_tile.reshape(-1)).view(-1, b_tile.shape[1])


def _direct_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, lut: torch.Tensor, peak: int) -> torch.Tensor:
    """Every product gathered from the flat LUT; one embedding_bag sum per output element and k tile."""
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    kc, table_dtype = _float32_tile_k(k, peak)
    flat = lut.to(table_dtype).reshape(-1, 1)
    a_rows = (a_idx * 256).to(torch.int32)  # [G, M, K]
    b_cols = _int32_rows(b_idx.transpose(1, 2))  # [G, N, K]
    out = torch.zeros(groups, m, n, dtype=torch.float64, device=a_idx.device)
    rows_per_call = max(1, CHUNK_INDICES // (groups * n * kc))
    for k0 in range(0, k, kc):
        k1 = min(k, k0 + kc)
        for m0 in range(0, m, rows_per_call):
            m1 = min(m, m0 + rows_per_call)
            idx = (a_rows[:, m0:m1, None, k0:k1] + b_cols[:, None, :, k0:k1]).reshape(-1, k1 - k0)
            out[:, m0:m1] += F.embedding_bag(idx, flat, mode="sum").view(groups, m1 - m0, n)
    return out


def depthwise_lut_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The grouped GEMM for one output per group (N = 1): out[g, m] = sum_k lut[a[g, m, k], b[g, k]].

    Gathers from a per-group table ``T[(g, k, v)] = lut[v, b[g, k]]`` with one embedding_bag sum
    per (group, row).
    """
    groups, m, k = a_idx.shape
    if k == 0 or m == 0:
        return torch.zeros(groups, m, dtype=torch.float64, device=a_idx.device)
    table = lut.to(_exact_dtype(_peak(lut), k)).t()[b_idx].reshape(-1, 1)  # [(g, k, v), 1]
    base = ((torch.arange(groups, device=a_idx.device)[:, None, None] * k
             + torch.arange(k, device=a_idx.device)[None, None, :]) * 256).to(torch.int32)
    out = torch.empty(groups, m, dtype=torch.float64, device=a_idx.device)
    step = max(1, CHUNK_INDICES // (groups * k))
    for m0 in range(0, m, step):
        m1 = min(m, m0 + step)
        rows = (base + a_idx[:, m0:m1]).to(torch.int32).reshape(-1, k)
        out[:, m0:m1] = F.embedding_bag(rows, table, mode="sum").view(groups, m1 - m0)
    return out
