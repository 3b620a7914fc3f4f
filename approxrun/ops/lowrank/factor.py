"""Exact integer factorization of 256x256 tables (numpy only): ``denominator * table == x @ y.T``.

Rational Gaussian elimination on an integer residual, verified entry by entry in integer
arithmetic. A LUT is factored as the exact product (the signedness that leaves the smallest error)
plus its error; a table of small rationals (a LUT-derived gradient table) after scaling to integers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from approxrun.lut import exact_lut, index_values

__all__ = ["MAX_FACTOR_RANK", "Factors", "modular_rank", "exact_matmul", "rank_factorization", "factor_lut",
           "factor_rational_table"]

log = logging.getLogger(__name__)

MAX_FACTOR_RANK = 16  # beyond this rank the factorization gives up (dense GEMMs over 17+ maps rarely win)
MAX_FACTOR_BITS = 512  # elimination numbers beyond this size cannot give an exact float plan
INTEGRAL_GROWTH = 4  # how much larger an integral pivot's term may be than the smallest one
FLOAT64_EXACT = 2**53
PRIME = 2**31 - 1  # modulus of the rank lower bound (products stay below 2**62)


@dataclass(frozen=True, eq=False)
class Factors:
    """``denominator * table == x @ y.T`` (integer factors: int64, or Python ints when larger);
    ``exact_part`` is (signed_a, signed_b) when column 0 is the exact product (``denominator * a``
    times ``b``) and the other columns factor the multiplier's error."""

    x: np.ndarray
    y: np.ndarray
    denominator: int
    exact_part: tuple[bool, bool] | None = None


def modular_rank(matrix: np.ndarray, limit: int | None = None) -> int:
    """Rank of an integer matrix modulo a large prime: a proven lower bound of its rational rank
    (equal to it unless the prime divides the relevant minors). Stops once ``limit`` is exceeded."""
    m = np.asarray(matrix, dtype=np.int64) % PRIME
    rank = 0
    for col in range(m.shape[1]):
        rows = np.flatnonzero(m[:, col])
        if rows.size == 0:
            continue
        pivot = rows[0]
        row = m[pivot] * pow(int(m[pivot, col]), PRIME - 2, PRIME) % PRIME
        m = np.delete((m - m[:, col:col + 1] * row[None, :] % PRIME) % PRIME, pivot, axis=0)
        rank += 1
        if limit is not None and rank > limit:
            break
    return rank


def exact_matmul(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p @ q of integer arrays without overflow: int64 when the sums provably fit, else Python ints."""
    peak = int(np.abs(p).max(initial=0)) * int(np.abs(q).max(initial=0)) * max(1, p.shape[1])
    if peak < 2**63:
        return p.astype(np.int64) @ q.astype(np.int64)
    return p.astype(object).dot(q.astype(object))


def compact(values: np.ndarray, delta: int) -> np.ndarray:
    """int64 when the entries and ``delta`` stay below 2**31, so that every pairwise product fits
    (fast numpy arithmetic), else Python-int objects."""
    peak = max(int(np.abs(values).max(initial=0)), abs(delta))
    return values.astype(np.int64) if peak < 2**31 else values.astype(object)


def _choose_pivot(sub: np.ndarray, delta: int) -> tuple[int, int]:
    """Pivot (i, j) of the residual ``sub / delta``.

    The term the pivot removes is ``c w^T / (p delta)`` (c: column j, w: row i, p: the pivot), of
    largest entry ``max|c| max|w| / |p delta|``: the smallest such term keeps the residual from
    growing (the largest entry of the residual is always a candidate with term ``max|sub|``).
    A pivot whose term is integral keeps the factors integer, so float32 GEMMs stay exact: it wins
    when its term is at most :data:`INTEGRAL_GROWTH` times the smallest.
    """
    nonzero = sub != 0
    magnitude = np.where(nonzero, np.abs(sub), 1)
    col_max, row_max = magnitude.max(axis=0), magnitude.max(axis=1)
    col_gcd, row_gcd = np.gcd.reduce(sub, axis=0), np.gcd.reduce(sub, axis=1)
    integral = nonzero & ((row_gcd[:, None] * col_gcd[None, :]) % (magnitude * delta) == 0)
    score = np.where(nonzero, (row_max[:, None] / magnitude).astype(float) * col_max.astype(float)[None, :],
                     np.inf)
    best = score.argmin()
    if integral.any():
        best_integral = np.where(integral, score, np.inf).argmin()
        if score.flat[best_integral] <= INTEGRAL_GROWTH * score.flat[best]:
            best = best_integral
    return divmod(int(best), sub.shape[1])


def rank_factorization(matrix: np.ndarray, max_rank: int):
    """Exact ``denominator * matrix == x @ y.T`` (Python-int arrays), or None beyond ``max_rank``.

    Gaussian elimination over the rationals on an integer residual ``R / delta``: each step removes
    the rank-one term ``c w^T / (p delta)`` through the pivot and lowers the rank by exactly one, so
    the number of steps is the rank. Common factors of ``R`` and ``delta`` are divided out every step
    (the entries stay minors of the matrix, as in fraction-free elimination).
    """
    n_rows, n_cols = matrix.shape
    rows, cols = np.arange(n_rows), np.arange(n_cols)
    residual, delta = compact(np.asarray(matrix), 1), 1
    terms = []
    while True:
        keep_rows, keep_cols = (residual != 0).any(axis=1), (residual != 0).any(axis=0)
        rows, cols, residual = rows[keep_rows], cols[keep_cols], residual[np.ix_(keep_rows, keep_cols)]
        if rows.size == 0:
            break
        if len(terms) == max_rank:
            return None
        i, j = _choose_pivot(residual, delta)
        pivot = int(residual[i, j])
        column, row = np.zeros(n_rows, dtype=object), np.zeros(n_cols, dtype=object)
        column[rows], row[cols] = residual[:, j].astype(object), residual[i].astype(object)
        terms.append((column, row, pivot * delta))
        update = pivot * residual - np.outer(residual[:, j], residual[i])  # no overflow: see _compact
        if not update.any():
            break
        delta *= pivot
        common = math.gcd(int(np.gcd.reduce(update.ravel())), delta)
        if delta < 0:
            common = -common
        update, delta = update // common, delta // common
        if max(int(np.abs(update).max(initial=0)), delta).bit_length() > MAX_FACTOR_BITS:
            return None
        residual = compact(update, delta)
    return _integer_factors(terms, n_rows, n_cols)


def _integer_factors(terms, n_rows: int, n_cols: int):
    """Integer (x, y, denominator) with x @ y.T / denominator == sum of c w^T / s over the terms."""
    x, y, scales = [], [], []
    for column, row, scale in terms:
        gc, gr = int(np.gcd.reduce(column)), int(np.gcd.reduce(row))
        x.append(column // gc)
        y.append(row // gr)
        scales.append(Fraction(gc * gr, scale))
    denominator = math.lcm(1, *(s.denominator for s in scales))
    for t, s in enumerate(scales):
        x[t] = x[t] * (s.numerator * (denominator // s.denominator))
    shape_x, shape_y = (n_rows, len(terms)), (n_cols, len(terms))
    x = np.stack(x, axis=1) if terms else np.zeros(shape_x, dtype=object)
    y = np.stack(y, axis=1) if terms else np.zeros(shape_y, dtype=object)
    return x, y, denominator


def _build_low_rank(matrix: np.ndarray, exact_part: tuple[bool, bool] | None,
                    scale: int = 1, max_rank: int = MAX_FACTOR_RANK) -> Factors | None:
    """Factor ``matrix`` (int64, the error when ``exact_part`` is given), verify, add the exact column."""
    factors = rank_factorization(matrix, max_rank)
    if factors is None:
        return None
    x, y, denominator = factors
    if not np.array_equal(exact_matmul(x, y.T), np.asarray(matrix, dtype=object) * denominator):
        log.warning("low-rank factorization failed its exact check; the gather path stays in use")
        return None
    if exact_part is not None:
        a, b = index_values(exact_part[0]), index_values(exact_part[1])
        x = np.concatenate([(a.astype(object) * denominator)[:, None], x], axis=1)
        y = np.concatenate([b.astype(object)[:, None], y], axis=1)
    return Factors(compact(x, 0), compact(y, 0), denominator * scale, exact_part)


_SIGNEDNESS = ((True, True), (False, False), (True, False), (False, True))


def factor_lut(lut: np.ndarray) -> Factors | None:
    """Low-rank form of an integer LUT: the exact product whose signedness leaves the smallest error
    (rank first, then largest entry; signed x signed on ties), plus a factorization of that error."""
    best = None
    for signed in _SIGNEDNESS:
        error = lut - exact_lut(*signed)
        score = (modular_rank(error, limit=MAX_FACTOR_RANK), int(np.abs(error).max()))
        if best is None or score < best[0]:
            best = (score, signed, error)
    (rank, _), signed, error = best
    if rank > MAX_FACTOR_RANK:
        return None
    return _build_low_rank(error, signed)


def _integer_scale(table: np.ndarray, limit: int = 64) -> int | None:
    """Smallest s <= limit with s * table integral (float tables of small rationals), else None."""
    if not np.isfinite(table).all() or np.abs(table).max(initial=0) * limit >= FLOAT64_EXACT:
        return None
    for s in range(1, limit + 1):
        scaled = table * s
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-9 * np.maximum(1.0, np.abs(scaled))):
            return s
    return None


def factor_rational_table(table: np.ndarray) -> Factors | None:
    """Low-rank form of a table of small rationals (LUT-derived gradients: ``x @ y.T / denominator``
    equals the rational table that the float table rounds)."""
    scale = _integer_scale(table)
    if scale is None:
        return None
    integer = np.round(table * scale).astype(np.int64)
    if modular_rank(integer, limit=MAX_FACTOR_RANK + 1) > MAX_FACTOR_RANK + 1:
        return None
    return _build_low_rank(integer, None, scale, MAX_FACTOR_RANK + 1)
