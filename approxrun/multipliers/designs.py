"""Approximate multipliers defined by a published formula (see the README's multiplier section).

Every design is computed bit-exactly over all 256x256 operand pairs. Signed versions use the
Baugh-Wooley partial-product array for array designs (truncated, BAM), two's complement for
perforation and a sign-magnitude wrapper for the others (|-128| = 128 still fits 8 unsigned bits).

Truncating a Baugh-Wooley array also drops its inverted sign cells in the removed columns, as the
hardware would: signed ``truncated_k`` with k >= 8 and ``bam_h_v`` with h > 0 then give a constant
offset even for 0 x 0 (a bias that retraining absorbs).

Names usable as ``multiplier=<name>``: ``exact``, ``truncated_<k>``, ``truncated_<k>_c`` (with
constant correction), ``bam_<hbl>_<vbl>``, ``mitchell``, ``drum_<k>``, ``kulkarni``,
``perforated_<j>_<m>``, ``roba``.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from approxrun.lut import OperandDomain, index_values
from approxrun.multipliers.multiplier import Cost, Multiplier

BITS = 8
PP_BITS = BITS * BITS
PROXY_SOURCE = "proxy: partial-product bits the design sums / 64 of the exact 8x8 array (not power)"


def _bit(x: np.ndarray, i: int) -> np.ndarray:
    return (x >> i) & 1


def _array_unsigned(a: np.ndarray, b: np.ndarray, keep: Callable[[int, int], bool]) -> np.ndarray:
    """Sum of the kept partial-product bits a_c*b_r*2^(r+c) (r: row = bit of B, c: column bit of A)."""
    out = np.zeros(np.broadcast(a, b).shape, dtype=np.int64)
    for r in range(BITS):
        for c in range(BITS):
            if keep(r, c):
                out += (_bit(a, c) & _bit(b, r)) << (r + c)
    return out


def _array_baugh_wooley(a: np.ndarray, b: np.ndarray, keep: Callable[[int, int], bool]) -> np.ndarray:
    """Signed 8x8 Baugh-Wooley array with only the kept partial-product bits; a, b are bytes."""
    top = BITS - 1
    out = np.full(np.broadcast(a, b).shape, (1 << BITS) + (1 << (2 * BITS - 1)), dtype=np.int64)
    for r in range(BITS):
        for c in range(BITS):
            if not keep(r, c):
                continue
            bit = _bit(a, c) & _bit(b, r)
            if (r == top) != (c == top):
                bit = 1 - bit
            out += bit << (r + c)
    out &= 0xFFFF
    return np.where(out >= 1 << 15, out - (1 << 16), out)


def _sign_magnitude(f: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    def signed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sign(a) * np.sign(b) * f(np.abs(a), np.abs(b))
    return signed


def _leading_one(x: np.ndarray) -> np.ndarray:
    """Position of the leading one (x > 0); 0 for x == 0."""
    return np.floor(np.log2(np.maximum(x, 1))).astype(np.int64)


def mitchell_unsigned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ka, kb = _leading_one(a), _leading_one(b)
    s = ((a - (1 << ka)) << kb) + ((b - (1 << kb)) << ka)
    base = 1 << (ka + kb)
    p = np.where(s < base, base + s, 2 * s)
    return np.where((a == 0) | (b == 0), 0, p)


def _drum_operand(x: np.ndarray, k: int):
    p = _leading_one(x)
    shift = np.where(x < (1 << k), 0, p - k + 1)
    kept = x >> shift
    kept = np.where(shift > 0, kept | 1, kept)
    return kept, shift


def drum_unsigned(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    xa, sa = _drum_operand(a, k)
    xb, sb = _drum_operand(b, k)
    return (xa * xb) << (sa + sb)


def kulkarni_unsigned(a: np.ndarray, b: np.ndarray, n: int = BITS) -> np.ndarray:
    if n == 2:
        return np.where((a == 3) & (b == 3), 7, a * b)
    h = n // 2
    mask = (1 << h) - 1
    ah, al, bh, bl = a >> h, a & mask, b >> h, b & mask
    # an operand of 128 (|-128|) has bit 7 set only, which the top half holds: n stays 8
    return ((kulkarni_unsigned(ah, bh, h) << n) + ((kulkarni_unsigned(ah, bl, h)
            + kulkarni_unsigned(al, bh, h)) << h) + kulkarni_unsigned(al, bl, h))


def roba_unsigned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def round_pow2(x):
        p = _leading_one(x)
        up = (x << 1) >= 3 * (1 << p)  # x >= 1.5 * 2^p rounds up (midpoints included)
        r = np.where(up, 1 << (p + 1), 1 << p)
        return np.where(x == 0, 0, r)
    ar, br = round_pow2(a), round_pow2(b)
    return ar * b + br * a - ar * br


def _truncation_correction(k: int) -> int:
    expected = sum((c + 1) * 2**c for c in range(k)) / 4
    return int(round(expected / 2**k)) * 2**k if k else 0


def _design(name: str):
    """(unsigned function, signed function on values, cost proxy or None, description) for a name."""
    m = re.fullmatch(r"exact", name)
    if m:
        return (lambda a, b: a * b), (lambda a, b: a * b), 1.0, "exact product"
    m = re.fullmatch(r"truncated_(\d+)(_c)?", name)
    if m:
        k, corr = int(m.group(1)), bool(m.group(2))
        keep = lambda r, c: r + c >= k  # noqa: E731
        add = _truncation_correction(k) if corr else 0
        kept = sum(keep(r, c) for r in range(BITS) for c in range(BITS))
        return (lambda a, b: _array_unsigned(a, b, keep) + add,
                lambda a, b: _wrap16(_array_baugh_wooley(a & 0xFF, b & 0xFF, keep) + add),
                kept / PP_BITS,
                f"truncated array, columns < {k} dropped" + (", constant correction" if corr else ""))
    m = re.fullmatch(r"bam_(\d+)_(\d+)", name)
    if m:
        hbl, vbl = int(m.group(1)), int(m.group(2))
        keep = lambda r, c: r >= hbl and r + c >= vbl  # noqa: E731
        kept = sum(keep(r, c) for r in range(BITS) for c in range(BITS))
        return (lambda a, b: _array_unsigned(a, b, keep),
                lambda a, b: _array_baugh_wooley(a & 0xFF, b & 0xFF, keep),
                kept / PP_BITS, f"broken-array multiplier, HBL={hbl}, VBL={vbl}")
    m = re.fullmatch(r"perforated_(\d+)_(\d+)", name)
    if m:
        j, n = int(m.group(1)), int(m.group(2))
        clear = ((1 << n) - 1) << j
        def signed(a, b):
            byte = (b & 0xFF) & ~clear
            return a * np.where(byte >= 128, byte - 256, byte)
        return (lambda a, b: a * (b & ~clear)), signed, (BITS - len(range(j, min(j + n, BITS)))) / BITS, \
            f"partial-product rows {j}..{j + n - 1} perforated"
    m = re.fullmatch(r"drum_(\d+)", name)
    if m:
        k = int(m.group(1))
        f = lambda a, b: drum_unsigned(a, b, k)  # noqa: E731
        return f, _sign_magnitude(f), min(k, BITS) ** 2 / PP_BITS, f"DRUM with a {k}x{k} core"
    simple = {
        "mitchell": (mitchell_unsigned, "Mitchell logarithmic multiplier"),
        "kulkarni": (kulkarni_unsigned, "Kulkarni underdesigned 2x2 blocks"),
        "roba": (roba_unsigned, "RoBA rounding-based multiplier"),
    }
    if name in simple:
        f, text = simple[name]
        return f, _sign_magnitude(f), None, text
    return None


def _wrap16(x: np.ndarray) -> np.ndarray:
    x = x & 0xFFFF
    return np.where(x >= 1 << 15, x - (1 << 16), x)


DESIGN_EXAMPLES = ("exact", "truncated_4", "truncated_6_c", "bam_2_6", "mitchell", "drum_4", "drum_6",
                   "kulkarni", "perforated_0_2", "roba")


def is_builtin(name: str) -> bool:
    return _design(name) is not None


def builtin_multiplier(name: str, signed: bool = True) -> Multiplier:
    """Build a formula design's LUT; ``signed`` selects int8 x int8 or uint8 x uint8 operands."""
    design = _design(name)
    if design is None:
        raise KeyError(f"unknown built-in multiplier {name!r}; designs: {', '.join(DESIGN_EXAMPLES)} "
                       "(numbers are parameters)")
    unsigned_f, signed_f, proxy, text = design
    values = index_values(signed)
    a, b = values[:, None], values[None, :]
    lut = (signed_f if signed else unsigned_f)(a, b)
    cost = None if proxy is None else Cost(proxy, "proxy", "rel. pp bits", PROXY_SOURCE)
    domain = OperandDomain(signed)
    return Multiplier(name, np.asarray(lut, dtype=np.int64), domain, domain, cost=cost,
                      description=text)
