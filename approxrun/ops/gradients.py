"""LUT-derived gradients: tables of d lut / d a and d lut / d b, and the backward GEMMs that use them.

The tables are smoothed central differences of the LUT along each operand axis, taken in numerical
operand order: D[x] = (L[x + h] - L[x - h]) / (2h), one-sided at the ends. For the exact product the
tables equal the other operand, so the LUT-derived gradient then equals the straight-through one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from approxrun.lut import byte_to_numeric_order, numeric_to_byte_order

ROW_ELEMENTS = 1 << 22


def _central_difference(table: np.ndarray, half_width: int) -> np.ndarray:
    """Derivative along axis 0 of a table in numerical order."""
    n = table.shape[0]
    x = np.arange(n)
    hi, lo = np.minimum(x + half_width, n - 1), np.maximum(x - half_width, 0)
    return (table[hi] - table[lo]) / (hi - lo)[:, None]


def gradient_tables(lut: np.ndarray, signed_a: bool, signed_b: bool, half_width: int = 2):
    """(d lut / d a, d lut / d b) as byte-indexed float64 tables."""
    numeric = byte_to_numeric_order(np.asarray(lut, dtype=np.float64), signed_a, signed_b)
    da = _central_difference(numeric, half_width)
    db = _central_difference(numeric.T, half_width).T
    return (numeric_to_byte_order(da, signed_a, signed_b), numeric_to_byte_order(db, signed_a, signed_b))


def grouped_lut_gemm_backward(grad_out: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor,
                              da: torch.Tensor, db: torch.Tensor, needs: tuple[bool, bool] = (True, True)):
    """Gradients of out[g, m, n] = sum_k lut[a[g,m,k], b[g,k,n]] with d lut taken from tables; None
    where ``needs`` says the gradient is not wanted.

    grad_a[g, m, k] = sum_n grad_out[g, m, n] * da[a, b];  grad_b[g, k, n] = sum_m grad_out * db[a, b].
    """
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    grad_out = grad_out.to(torch.float64)
    grad_a = torch.empty(groups, m, k, dtype=torch.float64, device=a_idx.device) if needs[0] else None
    grad_b = torch.empty(groups, k, n, dtype=torch.float64, device=a_idx.device) if needs[1] else None
    kc = max(1, min(k, ROW_ELEMENTS // max(1, 256 * n)))
    offsets = torch.arange(kc, device=a_idx.device) * 256
    for g in range(groups):
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            idx = a_idx[g, :, k0:k1] + offsets[: k1 - k0]
            if needs[0]:
                da_rows = da.t()[b_idx[g, k0:k1]].transpose(1, 2).reshape(-1, n)  # [(k, v), n]
            if needs[1]:
                hist = torch.zeros((k1 - k0) * 256, n, dtype=torch.float64, device=a_idx.device)
            step = max(1, ROW_ELEMENTS // ((k1 - k0) * n))
            for m0 in range(0, m, step):
                m1 = min(m, m0 + step)
                g_rows = grad_out[g, m0:m1]
                if needs[0]:
                    picked = F.embedding(idx[m0:m1], da_rows)  # [m, k, n]
                    grad_a[g, m0:m1, k0:k1] = (picked * g_rows[:, None, :]).sum(-1)
                if needs[1]:
                    hist.index_add_(0, idx[m0:m1].reshape(-1),
                                    g_rows[:, None, :].expand(-1, k1 - k0, -1).reshape(-1, n))
            if needs[1]:
                db_cols = db.t()[b_idx[g, k0:k1]]  # [k, n, v] = db[v, b[k, n]]
                grad_b[g, k0:k1] = torch.einsum("kvn,knv->kn", hist.view(k1 - k0, 256, n), db_cols)
    return grad_a, grad_b
