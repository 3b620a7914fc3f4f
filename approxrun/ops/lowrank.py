"""Exact low-rank LUT GEMMs: a LUT GEMM as one dense GEMM over a few factor maps.

For most approximate multipliers the error ``E = lut - exact product`` has a tiny rank ``r``
(DRUM: 2, truncation of ``k`` columns: ``k``, EvoApproxLib mul8s circuits: 1-4 as reported). An
exact integer factorization ``D * lut = x @ y.T`` (``x``, ``y`` integer [256, r + 1], column 0 the
exact product ``D * a`` times ``b``) turns the LUT GEMM into

    out[m, n] = sum_k lut[a_mk, b_kn] = sum_k sum_i x_i(a_mk) y_i(b_kn) / D,

a dense GEMM over ``K * (r + 1)`` columns of 256-entry maps gathered by byte index. The
factorization is exact rational elimination, verified in integer arithmetic; it covers all 256x256
byte indices (not only a multiplier's domain), so every code gives the LUT's own value.

Exactness is proven per call, never hoped for:

- int8 path (CPU): the factors become int8 columns (a column out of range is centred, its centre
  moving into a per-``b`` offset, or split into base-``s`` digits or an int8 part and the rest), at
  most 8, packed so that one operand's maps are one int32/int64 word: one gather per index (per two
  indices for int8/uint8 codes: a byte pair indexes a 65536-word table), then one int8 GEMM whose
  int32 sums stay below 2**31 (K is chunked when needed). The factorization with the narrowest word
  wins: the table's own, one of the whole LUT (DRUM's is ``u(a) u(b)``, rank 1), or the error alone
  with the signed exact product as an int8 GEMM of the codes themselves. Used once a self-test
  shows that torch's int8 GEMM is exact here (pre-VNNI kernels can saturate); with VNNI/AMX the
  GEMM is nearly free and the gathers set the pace.
- float32 path: every partial sum of a GEMM over ``chunk`` columns of K is an integer of magnitude at
  most ``chunk * term_bound < 2**24``, hence exact in any summation order; the chunks are summed in
  float64 (exact below 2**53) and divided by ``D`` (an exact integer quotient).
- float64 path: factors ``x / D`` in float64, one GEMM, then rounding; taken only when the worst-case
  rounding error ``(2u + gamma_n) * K * term_bound / D`` (``n = K (r + 1)``, ``u = 2**-53``) stays
  below 0.5.
- float32 GEMMs count only while torch computes them in IEEE float32 (no TF32/bf16 matmul settings).

Convolutions gather the maps once per input element, not per unfolded one: map-then-conv (one
float32 ``conv2d`` of the maps, exact under the same 2**24 argument when torch's backend is a
direct or im2col convolution, checked per call; see :func:`map_conv2d`), else an im2col of the
packed int8 words and the int8 GEMM, else unfold and the GEMM paths above.

When no exact plan exists, the rank exceeds :data:`MAX_FACTOR_RANK`, or the operation-count model says
the gather is cheaper, the caller keeps the gather path. The strategy is a process-wide setting:
``"auto"`` (cost model), ``"gather"`` or ``"lowrank"`` (low rank whenever an exact plan exists).
The LUT-derived gradient tables (:mod:`approxrun.ops.gradients`) are low-rank too (a difference
along one operand keeps the rank): they are factored the same way, and the backward runs as float64
GEMMs over their maps (gradients are float sums anyway; they match the gather's to rounding).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import sys
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from approxrun.lut import LUT_SIZE, code_to_index, exact_lut, index_values
from approxrun.multipliers.multiplier import Multiplier
from approxrun.ops.gather import FLOAT32_EXACT
from approxrun.ops.im2col import conv_output_size, grouped_columns, grouped_rows, scratch

__all__ = ["STRATEGIES", "LowRankTable", "ConvMaps", "Int8Maps", "GemmPlan", "set_strategy", "get_strategy",
           "use_strategy", "modular_rank", "factorize_lut", "factorize_table", "int8_gemm_is_exact",
           "candidate_plans", "plan_gemm", "choose_plan", "lowrank_gemm", "map_conv2d", "int8_conv2d",
           "try_lowrank_gemm", "try_lowrank_conv2d", "try_lowrank_backward"]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "gather", "lowrank")
MAX_FACTOR_RANK = 16  # beyond this rank the factorization gives up (dense GEMMs over 17+ maps rarely win)
MAX_FACTOR_BITS = 512  # elimination numbers beyond this size cannot give an exact float plan
INTEGRAL_GROWTH = 4  # how much larger an integral pivot's term may be than the smallest one
FLOAT64_EXACT = 2**53
INT32_EXACT = 2**31  # int8 GEMMs sum in int32
UNIT_ROUNDOFF = 2.0**-53

# Operation-count model, in units of one float32 multiply-add of a dense GEMM (~0.02 ns), fitted to
# best-of timings with 2 threads on an AVX-512/AMX machine: ~0.1 ns per lookup of the tiled gather
# plus ~0.5 ns per row (m, k) it walks and 256 lookups' worth per table column it builds, ~1.3 ns
# per gathered float map entry, ~1.2 ns per index of the int8 plan (gather into its packed word,
# int8 GEMM, output; ~0.6 ns for byte pairs), ~10 us per int8 GEMM call. Low rank wins where N is
# large enough to amortise its per-index work; the gather for small N (depthwise GEMMs: one small
# GEMM per group) and where no exact plan exists.
# Convolutions gather maps per input element, not per unfolded one: map-then-conv is costed apart.
LOOKUP_COST = 5.0  # one LUT product of the gather path; raise it to prefer low rank
GATHER_ROW_LOOKUPS = 5.0  # the gather's cost per row (m, k), in lookups
GATHER_TABLE_LOOKUPS = 256  # its tables per k and column of the smaller outer side, in lookups
MAP_COST = 64.0  # one gathered float factor-map entry
FLOAT64_COST = 2.0  # a float64 multiply-add or map entry, relative to float32
INT8_MAC_COST = 0.1  # an int8 multiply-add (CPU int8 GEMMs: VNNI/AMX)
INT8_INDEX_COST = 60.0  # one operand index gathered into its packed word of int8 maps
INT8_PAIRED_INDEX_COST = 30.0  # the same, for int8/uint8 codes gathered in byte pairs
INT8_CALL_COST = 5e5  # one int8 GEMM call (the int8 plan makes one per group and row block)
ACCUMULATE_COST = 4.0  # one float64/int64 output update per GEMM chunk
BACKWARD_GATHER_FACTOR = 100.0  # the gradient-table gathers of a backward, per lookup (measured 150-300x)

MAP_ELEMENTS = 1 << 22  # gathered map entries per GEMM block (16 MB of float32)
MAP_BYTES = 1 << 23  # gathered int8 maps per block of the int8 plan (scratch memory, reused)
PRIME = 2**31 - 1  # modulus of the rank lower bound (products stay below 2**62)
CACHE_SIZE = 64  # factorizations kept by table content

_settings = {"strategy": "auto", "lookup_cost": LOOKUP_COST}


def set_strategy(strategy: str = "auto", lookup_cost: float | None = None) -> None:
    """Choose how LUT GEMMs run: ``"auto"``, ``"gather"`` or ``"lowrank"``; ``lookup_cost`` overrides
    :data:`LOOKUP_COST`, the cost-model threshold of ``"auto"`` (``None`` restores the default)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"LUT GEMM strategy must be one of {STRATEGIES}, got {strategy!r}")
    if lookup_cost is not None and not lookup_cost > 0:
        raise ValueError(f"lookup_cost must be positive, got {lookup_cost!r}")
    _settings["strategy"] = strategy
    _settings["lookup_cost"] = LOOKUP_COST if lookup_cost is None else float(lookup_cost)


def get_strategy() -> str:
    return _settings["strategy"]


@contextmanager
def use_strategy(strategy: str, lookup_cost: float | None = None):
    """Run a block under another strategy, restoring the previous setting afterwards."""
    previous = dict(_settings)
    set_strategy(strategy, lookup_cost)
    try:
        yield
    finally:
        _settings.update(previous)


# ---------------------------------------------------------------------------------------------------
# Exact factorization


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


def _exact_matmul(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p @ q of integer arrays without overflow: int64 when the sums provably fit, else Python ints."""
    peak = int(np.abs(p).max(initial=0)) * int(np.abs(q).max(initial=0)) * max(1, p.shape[1])
    if peak < 2**63:
        return p.astype(np.int64) @ q.astype(np.int64)
    return p.astype(object).dot(q.astype(object))


def _compact(values: np.ndarray, delta: int) -> np.ndarray:
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


def _rank_factorization(matrix: np.ndarray, max_rank: int):
    """Exact ``denominator * matrix == x @ y.T`` (Python-int arrays), or None beyond ``max_rank``.

    Gaussian elimination over the rationals on an integer residual ``R / delta``: each step removes
    the rank-one term ``c w^T / (p delta)`` through the pivot and lowers the rank by exactly one, so
    the number of steps is the rank. Common factors of ``R`` and ``delta`` are divided out every step
    (the entries stay minors of the matrix, as in fraction-free elimination).
    """
    n_rows, n_cols = matrix.shape
    rows, cols = np.arange(n_rows), np.arange(n_cols)
    residual, delta = _compact(np.asarray(matrix), 1), 1
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
        residual = _compact(update, delta)
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


@dataclass(eq=False)
class LowRankTable:
    """A 256x256 table as ``x @ y.T / denominator`` exactly (integer factors, int64 or Python ints
    when larger; all byte indices).

    ``exact_part`` is (signed_a, signed_b) when column 0 is the exact product (``denominator * a``
    times ``b``) and the other columns factor the multiplier's error; ``term_bound`` is
    ``max over (a, b) of sum_i |x_i(a)| |y_i(b)|``, the largest sum one K step can add.
    """

    x: np.ndarray
    y: np.ndarray
    denominator: int
    term_bound: int
    exact_part: tuple[bool, bool] | None = None
    _device_maps: dict = field(default_factory=dict, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    @property
    def rank(self) -> int:
        """Rank of the table minus its exact product: the multiplier's error rank."""
        return self.width - (self.exact_part is not None)

    @functools.cached_property
    def factorizations(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Exact ``(x, y, denominator)`` factorizations: this one and, for a LUT, one of the whole
        table (no exact-product column; DRUM's is ``u(a) u(b)``, rank 1), verified here."""
        return list(_factorizations(self))

    @functools.cached_property
    def conv_maps(self) -> "ConvMaps | None":
        """The narrowest integer factorization (fewest columns, then smallest bound), for
        map-then-conv in float32; None when every one has a term above 2**24."""
        best = None
        for x, y, denominator in self.factorizations:
            bound = int(_exact_matmul(np.abs(x), np.abs(y).T).max(initial=0))
            if bound < FLOAT32_EXACT and (best is None or (x.shape[1], bound) < (best.width, best.bound)):
                best = ConvMaps(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32), denominator, bound)
        return best

    @functools.cached_property
    def int8(self) -> "Int8Maps | None":
        """The int8 form for int8 GEMMs, from the narrowest of :attr:`factorizations`."""
        return _int8_maps(self)

    def maps(self, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on ``device``: integer x for float32, ``x / denominator`` for float64."""
        key = (str(device), dtype)
        if key not in self._device_maps:
            x = self.x.astype(object) / self.denominator if dtype == torch.float64 else self.x
            # float(int) and int / int round correctly: relative error <= 2**-53 per entry
            self._device_maps[key] = tuple(torch.as_tensor(np.asarray(t, dtype=np.float64), dtype=dtype,
                                                           device=device) for t in (x, self.y))
        return self._device_maps[key]


@dataclass(eq=False)
class ConvMaps:
    """``denominator * table == x @ y.T`` with integer-valued float32 factors (exact: entries below
    2**24); ``bound`` is the largest ``sum_i |x[a, i] y[b, i]|``."""

    x: np.ndarray
    y: np.ndarray
    denominator: int
    bound: int
    _device_maps: dict = field(default_factory=dict, repr=False)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_maps:
            self._device_maps[key] = (torch.as_tensor(self.x, device=device), torch.as_tensor(self.y, device=device))
        return self._device_maps[key]


@dataclass(eq=False)
class Int8Maps:
    """``denominator * table[a, b] == sum_i x[a, i] y[b, i] + offset[b] + code_scale * a' b'`` with
    int8 ``x`` and ``y``, where ``a'``, ``b'`` are the bytes read as int8 (the signed product, an
    int8 GEMM of the codes themselves; none when ``code_scale`` is 0).

    The width is 4 or 8 (zero columns pad it), so an operand's row of maps is one int32 or int64
    word and one gather per operand index fetches all of it. ``bound`` is the largest
    ``sum_i |x[a, i] y[b, i]|``: the most one K step adds to the int8 GEMM's int32 sums.
    """

    x: np.ndarray
    y: np.ndarray
    offset: np.ndarray
    denominator: int
    bound: int
    code_scale: int = 0
    _device_maps: dict = field(default_factory=dict, repr=False)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    @functools.cached_property
    def sum_bound(self) -> int:
        """The most one K step adds to a result, offset included (results stay below K times it)."""
        return self.bound + int(np.abs(self.offset).max(initial=0)) + abs(self.code_scale) * 128 * 128

    def pair_words(self, device) -> torch.Tensor:
        """int64 [65536] for width 4: the x words of two codes, indexed by the pair's two bytes read
        as one little-endian uint16 (the even K column's byte low): one gather per two indices."""
        key = (str(device), "pairs")
        if key not in self._device_maps:
            words = np.ascontiguousarray(self.x).view(np.uint32)[:, 0].astype(np.uint64)
            pairs = (words[None, :] | (words[:, None] << np.uint64(32))).reshape(-1)  # [high byte, low byte]
            self._device_maps[key] = torch.as_tensor(pairs.view(np.int64), device=device)
        return self._device_maps[key]

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x words, y words, offset) on ``device``: row ``a`` of ``x`` packed into one word, etc."""
        key = str(device)
        if key not in self._device_maps:
            word = np.int32 if self.width == 4 else np.int64
            self._device_maps[key] = tuple(torch.as_tensor(t, device=device) for t in (
                np.ascontiguousarray(self.x).view(word)[:, 0], np.ascontiguousarray(self.y).view(word)[:, 0],
                self.offset))
        return self._device_maps[key]


def _factorizations(table: LowRankTable):
    """See :attr:`LowRankTable.factorizations`."""
    yield table.x, table.y, table.denominator
    if table.exact_part is None:
        return
    values = _exact_matmul(table.x, table.y.T) // table.denominator
    factors = _rank_factorization(np.asarray(values, dtype=np.int64), table.width)
    if factors is not None and np.array_equal(_exact_matmul(factors[0], factors[1].T),
                                              np.asarray(values, dtype=object) * factors[2]):
        yield factors


def _fits_int8(column: np.ndarray) -> bool:
    return column.min() >= -128 and column.max() <= 127


def _int8_pairs(x: np.ndarray, y: np.ndarray, limit: int):
    """Int8 columns (u, v) and an offset with ``x @ y.T == u @ v.T + offset[None, :]``, or None
    beyond ``limit`` columns.

    A factor column out of int8 range is centred when its range allows: ``u = u' + c`` moves
    ``c * v(b)`` into the offset, ``v = v' + c`` moves ``c * u(a)`` into an a-only column (paired
    with ones, handled last). Otherwise the larger column splits into balanced base-``s`` digits,
    ``u = lo + s * hi``, paired with ``v`` and ``s * v`` (``s * |v| <= 127``), or, when the other
    column is too large for that, into its int8 clip and the rest.
    """
    if max(np.abs(x).max(initial=0), np.abs(y).max(initial=0)) >= 2**31:
        return None
    work = [(x[:, i].astype(np.int64), y[:, i].astype(np.int64)) for i in range(x.shape[1])]
    pairs, offset = [], np.zeros(LUT_SIZE, dtype=np.int64)
    a_only, ones = np.zeros(LUT_SIZE, dtype=np.int64), np.ones(LUT_SIZE, dtype=np.int64)
    while work or a_only.any():
        if not work:
            work.append((a_only, ones))
            a_only = np.zeros(LUT_SIZE, dtype=np.int64)
        u, v = work.pop()
        if not (u.any() and v.any()):
            continue
        if len(pairs) + len(work) + 1 + bool(a_only.any()) > limit:
            return None
        if _fits_int8(u) and _fits_int8(v):
            pairs.append((u, v))
        elif not _fits_int8(u) and np.ptp(u) <= 255:
            centre = int(u.min()) + 128
            work.append((u - centre, v))
            offset += centre * v
        elif not _fits_int8(v) and np.ptp(v) <= 255:
            centre = int(v.min()) + 128
            work.append((u, v - centre))
            a_only += centre * u
        else:
            swap = np.abs(v).max() > np.abs(u).max()
            big, small = (v, u) if swap else (u, v)
            base = 127 // int(np.abs(small).max())
            if base >= 2:
                low = (big + base // 2) % base - base // 2
                parts = [(low, small), ((big - low) // base, base * small)]
            else:  # both sides too large for base digits: the int8 part and the rest, separately
                clipped = np.clip(big, -127, 127)
                parts = [(clipped, small), (big - clipped, small)]
            work += [(q, p) for p, q in parts] if swap else parts
    return pairs, offset


def _int8_candidates(table: LowRankTable):
    """(x, y, denominator, code_scale) factorizations to convert to int8: the table's own ones and,
    when its column 0 is the signed x signed exact product, the rest with that product left to an
    int8 GEMM of the codes themselves (``code_scale`` times it; no gather)."""
    for x, y, denominator in table.factorizations:
        yield x, y, denominator, 0
    if table.exact_part == (True, True):
        yield table.x[:, 1:], table.y[:, 1:], table.denominator, table.denominator


def _int8_maps(table: LowRankTable) -> Int8Maps | None:
    """The int8 form with the narrowest packed word (then: no code GEMM, fewest columns), at most 8
    columns, verified in integer arithmetic."""
    best = None
    for x, y, denominator, code_scale in _int8_candidates(table):
        converted = _int8_pairs(x, y, limit=8)
        if converted is None:
            continue
        key = (len(converted[0]) > 4, code_scale != 0, len(converted[0]))
        if best is None or key < best[0]:
            best = (key, converted, x, y, denominator, code_scale)
    if best is None:
        return None
    _, (pairs, offset), x, y, denominator, code_scale = best
    width = 4 if len(pairs) <= 4 else 8
    u, v = np.zeros((LUT_SIZE, width), dtype=np.int64), np.zeros((LUT_SIZE, width), dtype=np.int64)
    for i, (p, q) in enumerate(pairs):
        u[:, i], v[:, i] = p, q
    if not np.array_equal((u @ v.T + offset[None, :]).astype(object), _exact_matmul(x, y.T)):
        log.warning("int8 maps failed their exact check; float GEMMs stay in use")
        return None
    bound = int((np.abs(u) @ np.abs(v).T).max(initial=0))
    return Int8Maps(u.astype(np.int8), v.astype(np.int8), offset, denominator, bound, code_scale)


@functools.lru_cache(maxsize=None)
def int8_gemm_is_exact() -> bool:
    """Whether torch's CPU int8 GEMM (``torch._int_mm``, int32 sums) is exact on this machine: checked
    once on extreme operands (which would expose the int16 saturation of pre-VNNI kernels) and on
    random ones, since the library gives no such promise."""
    if not hasattr(torch, "_int_mm"):
        return False
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.full((32, 4096), u, dtype=torch.int8), torch.full((4096, 16), v, dtype=torch.int8))
             for u, v in ((127, 127), (-128, -128), (127, -128), (-128, 127))]
    for m, k, n in ((37, 1001, 5), (1, 23, 1)):
        cases.append((torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator),
                      torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=generator)))
    try:
        return all(torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) for a, b in cases)
    except RuntimeError:
        return False


def _build_low_rank(matrix: np.ndarray, exact_part: tuple[bool, bool] | None,
                    scale: int = 1, max_rank: int = MAX_FACTOR_RANK) -> LowRankTable | None:
    """Factor ``matrix`` (int64, the error when ``exact_part`` is given), verify, add the exact column."""
    factors = _rank_factorization(matrix, max_rank)
    if factors is None:
        return None
    x, y, denominator = factors
    if not np.array_equal(_exact_matmul(x, y.T), np.asarray(matrix, dtype=object) * denominator):
        log.warning("low-rank factorization failed its exact check; the gather path stays in use")
        return None
    if exact_part is not None:
        a, b = index_values(exact_part[0]), index_values(exact_part[1])
        x = np.concatenate([(a.astype(object) * denominator)[:, None], x], axis=1)
        y = np.concatenate([b.astype(object)[:, None], y], axis=1)
    bound = int(_exact_matmul(np.abs(x), np.abs(y).T).max(initial=0))
    return LowRankTable(_compact(x, 0), _compact(y, 0), denominator * scale, bound, exact_part)


_SIGNEDNESS = ((True, True), (False, False), (True, False), (False, True))


def _factorize_integer_lut(lut: np.ndarray) -> LowRankTable | None:
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


def _factorize_float_table(table: np.ndarray) -> LowRankTable | None:
    """Low-rank form of a table of small rationals (LUT-derived gradients: ``x @ y.T / denominator``
    equals the rational table that the float table rounds)."""
    scale = _integer_scale(table)
    if scale is None:
        return None
    integer = np.round(table * scale).astype(np.int64)
    if modular_rank(integer, limit=MAX_FACTOR_RANK + 1) > MAX_FACTOR_RANK + 1:
        return None
    return _build_low_rank(integer, None, scale, MAX_FACTOR_RANK + 1)


_by_content: "OrderedDict[tuple, LowRankTable | None]" = OrderedDict()
_by_tensor: dict[int, tuple] = {}


def _content_cached(kind: str, values: np.ndarray, build):
    digest = hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).digest()
    key = (kind, values.dtype.str, digest)
    if key in _by_content:
        _by_content.move_to_end(key)
        return _by_content[key]
    result = build(values)
    _by_content[key] = result
    if len(_by_content) > CACHE_SIZE:
        _by_content.popitem(last=False)
    return result


def _tensor_cached(kind: str, table: torch.Tensor, build):
    """``build(values)`` once per tensor object (and version counter): no hashing on repeated calls."""
    key = (kind, id(table))
    hit = _by_tensor.get(key)
    if hit is not None and hit[0]() is table and hit[1] == table._version:
        return hit[2]
    result = build(table.detach().cpu().numpy())

    def forget(ref, key=key):
        if _by_tensor.get(key, (None,))[0] is ref:
            del _by_tensor[key]

    _by_tensor[key] = (weakref.ref(table, forget), table._version, result)
    return result


def _factorize_lut_values(values: np.ndarray) -> LowRankTable | None:
    """Cached by the LUT's integer content, whatever array type or dtype holds it."""
    if values.shape != (LUT_SIZE, LUT_SIZE) or not np.isfinite(values).all():
        return None
    if (values != np.round(values)).any() or np.abs(values).max() >= 2**31:
        return None
    return _content_cached("lut", values.astype(np.int64), _factorize_integer_lut)


def factorize_lut(lut) -> LowRankTable | None:
    """Exact low-rank form of a LUT (Multiplier, array or tensor; computed once per content), or None
    when the error rank exceeds :data:`MAX_FACTOR_RANK` or the LUT is not integer-valued."""
    if isinstance(lut, Multiplier):
        lut = lut.lut
    if isinstance(lut, torch.Tensor):
        return _tensor_cached("lut", lut, _factorize_lut_values)
    return _factorize_lut_values(np.asarray(lut))


def factorize_table(table: torch.Tensor) -> LowRankTable | None:
    """Exact low-rank form of a float table of small rationals (a LUT-derived gradient table)."""
    return _tensor_cached("rational", table, lambda values: _content_cached(
        "rational", values.astype(np.float64), _factorize_float_table))


# ---------------------------------------------------------------------------------------------------
# Per-call plans and the GEMMs


@dataclass(frozen=True)
class GemmPlan:
    """How one LUT GEMM runs exactly: int8 GEMMs (int32 sums) or float32 GEMMs over ``k_chunk`` K
    columns, summed in int64/float64; or one float64 GEMM, rounded."""

    dtype: torch.dtype
    k_chunk: int
    cost: float

    def __str__(self) -> str:
        if self.dtype == torch.float64:
            return "float64 GEMM, rounded"
        return f"{'int8' if self.dtype == torch.int8 else 'float32'} GEMMs over {self.k_chunk} K columns"


def _float32_matmul_is_ieee(device: torch.device) -> bool:
    """False under TF32/bf16 matmul settings, which would round the integer factors."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32
    mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    return mkldnn in ("none", "ieee")


def _float64_error_bound(table: LowRankTable, k: int) -> float:
    """Worst-case |computed - exact| of the float64 GEMM: factor rounding (2u) plus accumulation
    (gamma_n for any summation order of n = K * width products), times sum |x| |y| <= K * bound / D."""
    n = k * table.width
    if n * UNIT_ROUNDOFF >= 0.5:
        return math.inf
    gamma = n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)
    magnitude = k * table.term_bound / table.denominator
    return (2 * UNIT_ROUNDOFF + gamma * (1 + 2 * UNIT_ROUNDOFF)) * magnitude * (1 + 1e-9)


def candidate_plans(table: LowRankTable, groups: int, m: int, k: int, n: int, device: torch.device,
                    byte_codes: bool = False) -> list[GemmPlan]:
    """Every exact plan for a [G, M, K] x [G, K, N] LUT GEMM, with its modelled cost (``byte_codes``:
    the rows side holds int8/uint8 codes, which the int8 plan can gather in pairs)."""
    plans = []
    width = table.width
    maps = (m * k + k * n) * width * MAP_COST
    macs = m * k * n * width
    accumulable = k * table.term_bound < FLOAT64_EXACT  # chunk sums add up exactly in float64/int64
    int8 = table.int8
    if (device.type == "cpu" and int8 is not None and int8_gemm_is_exact()
            and k * int8.sum_bound < FLOAT64_EXACT):
        chunk = (INT32_EXACT - 1) // max(1, int8.bound, 128 * 128 if int8.code_scale else 0)
        paired = byte_codes and k % 2 == 0 and int8.width == 4 and _byte_pairs_readable()
        index_cost = INT8_PAIRED_INDEX_COST if paired else INT8_INDEX_COST
        cost = (m * k * index_cost + k * n * INT8_INDEX_COST + m * k * n * int8.width * INT8_MAC_COST
                + -(-k // chunk) * (m * n * ACCUMULATE_COST + INT8_CALL_COST))
        plans.append(GemmPlan(torch.int8, min(chunk, k), groups * cost))
    chunk = (FLOAT32_EXACT - 1) // max(1, table.term_bound)
    if _float32_matmul_is_ieee(device) and chunk >= 1 and accumulable:
        cost = macs + maps + -(-k // chunk) * m * n * ACCUMULATE_COST
        plans.append(GemmPlan(torch.float32, min(chunk, k), groups * cost))
    if _float64_error_bound(table, k) < 0.5:
        plans.append(GemmPlan(torch.float64, k, groups * FLOAT64_COST * (macs + maps + m * n)))
    return plans


def plan_gemm(table: LowRankTable, groups: int, m: int, k: int, n: int, device: torch.device,
              byte_codes: bool = False) -> GemmPlan | None:
    """The cheapest exact plan for a [G, M, K] x [G, K, N] LUT GEMM, or None when none is exact
    (kept per shape, device and float32 matmul setting: training repeats the same shapes)."""
    key = (groups, m, k, n, str(device), byte_codes, _float32_matmul_is_ieee(device))
    if key not in table._plans:
        if len(table._plans) >= CACHE_SIZE:
            table._plans.clear()
        table._plans[key] = min(candidate_plans(table, groups, m, k, n, device, byte_codes),
                                key=lambda p: p.cost, default=None)
    return table._plans[key]


def lowrank_gemm(a: torch.Tensor, b: torch.Tensor, table: LowRankTable, plan: GemmPlan) -> torch.Tensor:
    """out[g, m, n] = sum_k table[byte(a[g, m, k]), byte(b[g, k, n])] of code tensors, exact, as
    float64 (see the module)."""
    if plan.dtype == torch.int8:
        return _int8_gemm(a, b, table.int8, plan.k_chunk)
    a_idx, b_idx = code_to_index(a), code_to_index(b)
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    width = table.width
    x, y = table.maps(a_idx.device, plan.dtype)
    yb = F.embedding(b_idx, y).transpose(2, 3).reshape(groups, k * width, n)  # row (k, i) = y_i(b[k, :])
    out = torch.empty(groups, m, n, dtype=torch.float64, device=a_idx.device)
    chunk = plan.k_chunk
    rows = max(1, MAP_ELEMENTS // (chunk * width))
    for m0 in range(0, m, rows):
        m1 = min(m, m0 + rows)
        for k0 in range(0, k, chunk):
            k1 = min(k, k0 + chunk)
            xa = F.embedding(a_idx[:, m0:m1, k0:k1], x).reshape(groups, m1 - m0, (k1 - k0) * width)
            part = torch.bmm(xa, yb[:, k0 * width:k1 * width])
            if k0 == 0:
                out[:, m0:m1] = part
            else:
                out[:, m0:m1] += part
    if plan.dtype == torch.float64:
        return out.round_()
    return out.div_(table.denominator) if table.denominator != 1 else out


@functools.lru_cache(maxsize=None)
def _byte_pairs_readable() -> bool:
    """Whether two int8 codes read as one uint16 give ``low | high << 8`` (a little-endian machine,
    and a torch with uint16 views and copies)."""
    if sys.byteorder != "little" or not hasattr(torch, "uint16"):
        return False
    try:
        pair = torch.tensor([1, 2], dtype=torch.uint8).view(torch.uint16)
        return int(torch.empty(1, dtype=torch.int32).copy_(pair)) == 0x0201
    except (RuntimeError, TypeError):
        return False


def _gather_words(words: torch.Tensor, codes: torch.Tensor, name: str) -> torch.Tensor:
    """``words[byte(codes)]`` (uint16 codes: byte pairs, ``words[codes]``) flattened, into scratch
    memory: int8 maps [codes.numel() * bytes per word]."""
    index = scratch(name + " index", codes.shape, torch.int32, codes.device)
    index = index.copy_(codes) if codes.dtype == torch.uint16 else code_to_index(codes, out=index)
    out = scratch(name + " words", (codes.numel(),), words.dtype, codes.device)
    return torch.index_select(words, 0, index.view(-1), out=out).view(torch.int8)


def _int8_columns(b: torch.Tensor, maps: Int8Maps) -> tuple[torch.Tensor, torch.Tensor]:
    """B-side operands of the int8 plan: int8 [G, K * width, N] (row (k, i) = y_i(b[k, :])), a
    column-major view when ``b`` is one (weights transposed for a linear layer: no copy), and the
    offset summed over K, int64 [G, N]."""
    _, y_words, offset = maps.tensors(b.device)
    b_idx = code_to_index(b.transpose(1, 2))  # [G, N, K], contiguous for transposed weights
    groups, n, k = b_idx.shape
    y = y_words.index_select(0, b_idx.reshape(-1)).view(torch.int8).view(groups, n, k * maps.width)
    offset = offset.index_select(0, b_idx.reshape(-1)).view(groups, n, k).sum(2)
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


def _int8_gemm(a: torch.Tensor, b: torch.Tensor, maps: Int8Maps, chunk: int) -> torch.Tensor:
    """The int8 plan: per block of rows, one gather of packed int8 maps per index and int8 GEMMs
    (int32 sums over ``chunk`` K columns), plus the offset, divided by the denominator (an exact
    integer quotient). Row blocks bound the scratch memory."""
    groups, m, k = a.shape
    y, offset = _int8_columns(b, maps)
    b_bytes = _code_bytes(b, "gemm columns") if maps.code_scale else None
    out = torch.empty(groups, m, b.shape[2], dtype=torch.float64, device=a.device)
    x_words, gathered = maps.tensors(a.device)[0], a
    if maps.width == 4 and a.dtype in (torch.int8, torch.uint8) and k % 2 == 0 and _byte_pairs_readable():
        a = a.contiguous()
        x_words, gathered = maps.pair_words(a.device), a.view(torch.uint16)  # byte pairs: half the gathers
    rows = max(1, MAP_BYTES // (k * maps.width))
    for g in range(groups):
        for m0 in range(0, m, rows):
            x = _gather_words(x_words, gathered[g, m0:m0 + rows], "gemm rows").view(-1, k * maps.width)
            block = out[g, m0:m0 + rows]
            block.copy_(_int8_words_gemm(x, y[g], chunk, maps.width))
            if maps.code_scale:
                a_bytes = _code_bytes(a[g, m0:m0 + rows], "gemm row codes")
                block.add_(_int8_words_gemm(a_bytes, b_bytes[g], chunk, 1), alpha=maps.code_scale)
        out[g] += offset[g]
    return out.div_(maps.denominator) if maps.denominator != 1 else out


def _code_bytes(codes: torch.Tensor, name: str) -> torch.Tensor:
    """The codes' bytes read as int8 (their signed values; contiguous, scratch memory for other
    dtypes): the operands of the code GEMM."""
    if codes.dtype in (torch.int8, torch.uint8):
        return codes.contiguous().view(torch.int8)
    index = code_to_index(codes, out=scratch(name + " index", codes.shape, torch.int32, codes.device))
    return scratch(name + " bytes", codes.shape, torch.uint8, codes.device).copy_(index).view(torch.int8)


def int8_conv2d(x: torch.Tensor, w: torch.Tensor, table: LowRankTable, chunk: int, stride, dilation,
                groups: int) -> torch.Tensor:
    """LUT convolution of padded codes x [B, C, H, W] with codes w [O, C/G, kh, kw] on the int8
    plan, float64 [B, O, Ho, Wo]: the maps are gathered once per input element (not per unfolded
    one) and the packed words are unfolded, in batch blocks."""
    maps = table.int8
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    y, offset = _int8_columns(grouped_columns(w, groups), maps)
    x_words = maps.tensors(x.device)[0]
    ho = conv_output_size(height, kh, stride[0], 0, dilation[0])
    wo = conv_output_size(width, kw, stride[1], 0, dilation[1])
    out = torch.empty(batch, out_channels, ho, wo, dtype=torch.float64, device=x.device)
    by_group = out.view(batch, groups, out_channels // groups, ho * wo)
    k = group_channels * kh * kw
    block = max(1, MAP_BYTES // (ho * wo * channels * kh * kw * maps.width))
    for b0 in range(0, batch, block):
        nb = min(batch, b0 + block) - b0
        words = _gather_words(x_words, x[b0:b0 + nb], "conv input").view(x_words.dtype)
        words = words.view(nb, channels, height, width)
        rows = grouped_rows(words, (kh, kw), stride, dilation, groups,
                            out=scratch("conv rows", (groups * nb * ho * wo * k,), words.dtype, x.device))
        for g in range(groups):
            product = _int8_words_gemm(rows[g].view(torch.int8), y[g], chunk, maps.width).view(nb, ho * wo, -1)
            by_group[b0:b0 + nb, g].copy_(product.transpose(1, 2))
    by_group += offset[None, :, :, None]
    return out.div_(maps.denominator) if maps.denominator != 1 else out


def _resolve(strategy: str | None) -> str:
    strategy = strategy or _settings["strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"LUT GEMM strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def _gather_cost(groups: int, m: int, k: int, n: int) -> float:
    lookups = m * k * (n + GATHER_ROW_LOOKUPS) + GATHER_TABLE_LOOKUPS * k * min(m, n)
    return groups * lookups * _settings["lookup_cost"]


def choose_plan(table: LowRankTable | None, groups: int, m: int, k: int, n: int, device: torch.device,
                strategy: str | None = None, byte_codes: bool = False) -> tuple[GemmPlan | None, str]:
    """(the low-rank plan the strategy picks for this call, or None for the gather; why, in words)."""
    strategy = _resolve(strategy)
    if strategy == "gather":
        return None, "gather (strategy)"
    if table is None:
        return None, f"gather (LUT error rank above {MAX_FACTOR_RANK})"
    plan = plan_gemm(table, groups, m, k, n, device, byte_codes)
    if plan is None:
        return None, f"gather (no exact low-rank plan for K={k}, rank {table.rank})"
    gather_cost = _gather_cost(groups, m, k, n)
    if strategy == "auto" and plan.cost >= gather_cost:
        return None, f"gather (rank {table.rank} low-rank costs {plan.cost:.3g} > {gather_cost:.3g})"
    return plan, f"low rank {table.rank}, {plan}"


def _lowrank_plan(table: LowRankTable | None, groups: int, m: int, k: int, n: int, device: torch.device,
                  strategy: str, what: str, byte_codes: bool = False) -> GemmPlan | None:
    """The plan when the strategy picks low rank for this GEMM shape (logged), else None."""
    plan, reason = choose_plan(table, groups, m, k, n, device, strategy, byte_codes)
    log.debug("lut %s: %s, shape G=%d M=%d K=%d N=%d", what, reason, groups, m, k, n)
    return plan


def try_lowrank_gemm(a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor,
                     strategy: str | None = None) -> torch.Tensor | None:
    """The LUT GEMM of codes a [G, M, K] and b [G, K, N] through low-rank maps when the strategy
    picks it, else None (use the gather)."""
    groups, m, k = a.shape
    strategy = _resolve(strategy)
    if strategy == "gather" or groups * m * k * b.shape[2] == 0:
        return None
    table = factorize_lut(lut)
    plan = _lowrank_plan(table, groups, m, k, b.shape[2], a.device, strategy, "gemm",
                         byte_codes=a.dtype in (torch.int8, torch.uint8))
    return None if plan is None else lowrank_gemm(a, b, table, plan)


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
               groups: int) -> torch.Tensor | None:
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
    xm = F.embedding(code_to_index(x), x_map).permute(0, 1, 4, 2, 3).reshape(batch, channels * rank, height, width)
    ym = F.embedding(code_to_index(w), y_map).permute(0, 1, 4, 2, 3).reshape(out_channels, group_channels * rank,
                                                                             kh, kw)
    if not _float32_conv_is_exact(xm, ym, stride, dilation, groups):
        return None
    out = F.conv2d(xm, ym, stride=stride, dilation=dilation, groups=groups).double()
    return out.div_(maps.denominator) if maps.denominator != 1 else out


def try_lowrank_conv2d(x: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, stride, dilation, groups: int,
                       strategy: str | None = None) -> torch.Tensor | None:
    """The LUT convolution of padded codes x and codes w when the strategy picks low rank for the
    convolution's GEMM and the maps can be gathered before the unfold: map-then-conv
    (:func:`map_conv2d`) or the int8 plan's im2col of packed maps; else None (unfold, then
    :func:`try_lowrank_gemm` or the gather)."""
    batch, _, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    m = batch * conv_output_size(height, kh, stride[0], 0, dilation[0]) * conv_output_size(
        width, kw, stride[1], 0, dilation[1])
    k, n = group_channels * kh * kw, out_channels // groups
    strategy = _resolve(strategy)
    if strategy == "gather" or groups * m * k * n == 0:
        return None
    table = factorize_lut(lut)
    maps = None if table is None else table.conv_maps
    if maps is not None:  # the maps of each input element once, then one float32 conv2d
        cost = x.numel() * maps.width * MAP_COST + groups * m * k * n * maps.width
        if strategy == "lowrank" or cost < _gather_cost(groups, m, k, n):
            out = map_conv2d(x, w, table, stride, dilation, groups)
            if out is not None:
                log.debug("lut conv2d: low rank %d, map-then-conv, shape G=%d M=%d K=%d N=%d", table.rank,
                          groups, m, k, n)
                return out
    plan = _lowrank_plan(table, groups, m, k, n, x.device, strategy, "conv2d")
    if plan is None or plan.dtype != torch.int8 or table.int8.code_scale:
        return None
    return int8_conv2d(x, w, table, plan.k_chunk, stride, dilation, groups)


def try_lowrank_backward(grad_out: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor,
                         da: torch.Tensor, db: torch.Tensor, strategy: str | None = None):
    """(grad_a, grad_b) of the LUT GEMM with low-rank gradient tables, in float64, or None.

    With ``da = p q^T`` and ``db = r s^T``: grad_a[m, k] = sum_i p_i(a_mk) (grad_out @ q_i(b)^T)[m, k]
    and grad_b[k, n] = sum_i s_i(b_kn) (r_i(a)^T @ grad_out)[k, n]: two GEMMs per factor column.
    """
    strategy = _resolve(strategy)
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    if strategy == "gather" or groups * m * k * n == 0:
        return None
    fa, fb = factorize_table(da), factorize_table(db)
    if fa is None or fb is None:
        log.debug("lut backward: gather (gradient tables are not low-rank)")
        return None
    width = fa.width + fb.width
    cost = groups * FLOAT64_COST * (m * k * n * width + (m * k + k * n) * width * MAP_COST)
    gather_cost = BACKWARD_GATHER_FACTOR * _gather_cost(groups, m, k, n)
    if strategy == "auto" and cost >= gather_cost:
        log.debug("lut backward: gather (low rank costs %.3g > %.3g)", cost, gather_cost)
        return None
    log.debug("lut backward: low rank %d + %d", fa.width, fb.width)
    grad_out = grad_out.to(torch.float64)
    p, q = fa.maps(a_idx.device, torch.float64)
    r, s = fb.maps(a_idx.device, torch.float64)
    qb = F.embedding(b_idx, q).permute(0, 2, 1, 3).reshape(groups, n, k * fa.width)  # [G, N, (k, i)]
    sb = F.embedding(b_idx, s).transpose(2, 3)  # [G, K, i, N]
    grad_a = torch.empty(groups, m, k, dtype=torch.float64, device=a_idx.device)
    grad_b = torch.zeros(groups, k * fb.width, n, dtype=torch.float64, device=a_idx.device)
    rows = max(1, MAP_ELEMENTS // (k * max(fa.width, fb.width)))
    for m0 in range(0, m, rows):
        m1 = min(m, m0 + rows)
        block = a_idx[:, m0:m1]
        through_b = torch.bmm(grad_out[:, m0:m1], qb).view(groups, m1 - m0, k, fa.width)
        grad_a[:, m0:m1] = (through_b * F.embedding(block, p)).sum(-1)
        ra = F.embedding(block, r).reshape(groups, m1 - m0, k * fb.width)
        grad_b.baddbmm_(ra.transpose(1, 2), grad_out[:, m0:m1])
    grad_b = (grad_b.view(groups, k, fb.width, n) * sb).sum(2)
    return grad_a, grad_b
