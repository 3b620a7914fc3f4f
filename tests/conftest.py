"""Shared test helpers: random asymmetric LUTs and float64 gather oracles for the LUT ops.

The oracles index the LUT with :func:`approxrun.lut.code_to_index` (the convention, tested on its
own in ``test_lut_convention.py``) and sum gathered products in numpy float64, with no tiling,
chunking or strategy choice: an independent reference for ``approxrun.ops``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from approxrun.lut import code_to_index

INT16_RANGE = (-(2**15), 2**15 - 1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_lut(rng: np.random.Generator, low: int = INT16_RANGE[0], high: int = INT16_RANGE[1]) -> np.ndarray:
    """A 256x256 int64 LUT of independent random entries in [low, high]; never symmetric."""
    lut = rng.integers(low, high, size=(256, 256), endpoint=True, dtype=np.int64)
    assert not np.array_equal(lut, lut.T)
    return lut


def random_codes(rng: np.random.Generator, shape, signed: bool = True, dtype=torch.int64) -> torch.Tensor:
    """Random 8-bit codes (signed -128..127 or unsigned 0..255) as a tensor of ``dtype``."""
    low, high = (-128, 127) if signed else (0, 255)
    return torch.as_tensor(rng.integers(low, high, size=shape, endpoint=True)).to(dtype)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def matmul_oracle(a, b, lut) -> np.ndarray:
    """out[m, n] = sum_k lut[byte(a[m, k])][byte(b[k, n])] in float64."""
    a_idx, b_idx = code_to_index(_numpy(a)), code_to_index(_numpy(b))
    table = np.asarray(lut, dtype=np.float64)
    return table[a_idx[:, :, None], b_idx[None, :, :]].sum(1)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d_oracle(x, w, lut, stride=1, padding=0, dilation=1, groups: int = 1, pad_value: int = 0) -> np.ndarray:
    """LUT convolution of codes x [B, C, H, W] with codes w [O, C/groups, kh, kw] in float64.

    Padding holds the code ``pad_value``; every kernel tap gathers its products directly.
    """
    x, w = _numpy(x).astype(np.int64), _numpy(w).astype(np.int64)
    table = np.asarray(lut, dtype=np.float64)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    ho = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x_idx, w_idx = code_to_index(xp), code_to_index(w)
    group_out = out_channels // groups
    out = np.zeros((batch, out_channels, ho, wo))
    for i in range(kh):
        for j in range(kw):
            tap = x_idx[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            for g in range(groups):
                xs = tap[:, g * group_channels:(g + 1) * group_channels]  # [B, Cg, Ho, Wo]
                ws = w_idx[g * group_out:(g + 1) * group_out, :, i, j]  # [Og, Cg]
                out[:, g * group_out:(g + 1) * group_out] += \
                    table[xs[:, None], ws[None, :, :, None, None]].sum(2)
    return out
