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

- int8 path (CPU): the integer factors split into balanced base-256 digits (-128..127); each power
  of 256 is one int8 GEMM whose int32 sums stay below 2**31 (K is chunked when needed), added into
  int64. Used once a self-test shows that torch's int8 GEMM is exact on this machine (pre-VNNI
  kernels can saturate); with AMX/VNNI it is many times faster than float32.
- float32 path: every partial sum of a GEMM over ``chunk`` columns of K is an integer of magnitude at
  most ``chunk * term_bound < 2**24``, hence exact in any summation order; the chunks are summed in
  float64 (exact below 2**53) and divided by ``D`` (an exact integer quotient).
- float64 path: factors ``x / D`` in float64, one GEMM, then rounding; taken only when the worst-case
  rounding error ``(2u + gamma_n) * K * term_bound / D`` (``n = K (r + 1)``, ``u = 2**-53``) stays
  below 0.5.
- float32 GEMMs count only while torch computes them in IEEE float32 (no TF32/bf16 matmul settings).

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
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from approxrun.lut import LUT_SIZE, exact_lut, index_values
from approxrun.multipliers.multiplier import Multiplier
from approxrun.ops.gather import FLOAT32_EXACT

__all__ = ["STRATEGIES", "LowRankTable", "Int8Digits", "GemmPlan", "set_strategy", "get_strategy",
           "use_strategy", "modular_rank", "factorize_lut", "factorize_table", "int8_gemm_is_exact",
           "candidate_plans", "plan_gemm", "choose_plan", "lowrank_gemm", "try_lowrank_gemm",
           "try_lowrank_backward"]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "gather", "lowrank")
MAX_FACTOR_RANK = 16  # beyond this rank the factorization gives up (dense GEMMs over 17+ maps rarely win)
MAX_FACTOR_BITS = 512  # elimination numbers beyond this size cannot give an exact float plan
INTEGRAL_GROWTH = 4  # how much larger an integral pivot's term may be than the smallest one
FLOAT64_EXACT = 2**53
INT32_EXACT = 2**31  # int8 GEMMs sum in int32
UNIT_ROUNDOFF = 2.0**-53

# Operation-count model, in units of one float32 multiply-add of a dense GEMM. Fitted to best-of-9
# single-thread timings on a shared AVX-512/AMX core: ~0.02 ns per float32 multiply-add, ~0.35 ns
# per lookup of the tiled gather, ~1.3 ns per gathered float map entry, ~4 ns per index gathered into
# its int8 digit row. Low rank wins where N is well above the rank (its maps hold r + 1 entries per
# index, the gather's tables N); the gather wins for depthwise GEMMs (N = 1) and high ranks.
LOOKUP_COST = 18.0  # one LUT product of the gather path; raise it to prefer low rank
MAP_COST = 64.0  # one gathered float factor-map entry
FLOAT64_COST = 2.0  # a float64 multiply-add or map entry, relative to float32
INT8_MAC_COST = 0.1  # an int8 multiply-add (CPU int8 GEMMs: VNNI/AMX)
INT8_MAP_COST = 200.0  # one index gathered into its row of int8 digits
ACCUMULATE_COST = 4.0  # one float64/int64 output update per GEMM chunk

MAP_ELEMENTS = 1 << 22  # gathered map entries per GEMM block (16 MB of float32)
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

    @property
    def width(self) -> int:
        return self.x.shape[1]

    @property
    def rank(self) -> int:
        """Rank of the table minus its exact product: the multiplier's error rank."""
        return self.width - (self.exact_part is not None)

    @functools.cached_property
    def int8_digits(self) -> "Int8Digits | None":
        return _int8_digits(self)

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
class Int8Digits:
    """``denominator * table == sum_s 256**scales[s] * x @ y[s].T`` with int8 entries: the balanced
    base-256 digits (-128..127) of the integer factors, so that int8 GEMMs with int32 sums compute the
    table's GEMM exactly. ``bounds[s]`` is the largest sum one K step adds to GEMM ``s``."""

    x: np.ndarray
    y: tuple[np.ndarray, ...]
    scales: tuple[int, ...]
    bounds: tuple[int, ...]
    _device_maps: dict = field(default_factory=dict, repr=False)

    def maps(self, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = str(device)
        if key not in self._device_maps:
            self._device_maps[key] = (torch.as_tensor(self.x, device=device),
                                      [torch.as_tensor(y, device=device) for y in self.y])
        return self._device_maps[key]


def _balanced_digits(column: np.ndarray) -> list[np.ndarray]:
    """Base-256 digits in -128..127, least significant first: column == sum_d digits[d] * 256**d."""
    digits, rest = [], column.astype(np.int64)
    while rest.any() or not digits:
        digit = (rest + 128) % 256 - 128
        digits.append(digit)
        rest = (rest - digit) // 256
    return digits


def _int8_digits(table: LowRankTable) -> Int8Digits | None:
    """The digit form of a table's integer factors (x digit columns pair with the y digits of the same
    factor; the pair of digits d, e lands in the GEMM of scale d + e), or None when the factors exceed
    int64 (no digits are worth it then)."""
    if table.x.dtype == object or table.y.dtype == object or table.term_bound >= 2**62:
        return None
    x_digits = [_balanced_digits(column) for column in table.x.T]
    y_digits = [_balanced_digits(column) for column in table.y.T]
    columns = [(i, d) for i, digits in enumerate(x_digits) for d in range(len(digits))]
    x = np.stack([x_digits[i][d] for i, d in columns], axis=1)
    zero = np.zeros(LUT_SIZE, dtype=np.int64)
    ys, scales, bounds, total = [], [], [], np.zeros((LUT_SIZE, LUT_SIZE), dtype=np.int64)
    for scale in range(max(len(xd) + len(yd) - 1 for xd, yd in zip(x_digits, y_digits))):
        y = np.stack([y_digits[i][scale - d] if 0 <= scale - d < len(y_digits[i]) else zero
                      for i, d in columns], axis=1)
        if y.any():
            ys.append(y.astype(np.int8))
            scales.append(scale)
            bounds.append(int((np.abs(x) @ np.abs(y).T).max()))
            total += (x @ y.T) << (8 * scale)
    if not np.array_equal(total, table.x @ table.y.T):
        log.warning("int8 digits failed their exact check; float GEMMs stay in use")
        return None
    return Int8Digits(x.astype(np.int8), tuple(ys), tuple(scales), tuple(bounds))


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


def candidate_plans(table: LowRankTable, groups: int, m: int, k: int, n: int,
                    device: torch.device) -> list[GemmPlan]:
    """Every exact plan for a [G, M, K] x [G, K, N] LUT GEMM, with its modelled cost."""
    plans = []
    width = table.width
    maps = (m * k + k * n) * width * MAP_COST
    macs = m * k * n * width
    accumulable = k * table.term_bound < FLOAT64_EXACT  # chunk sums add up exactly in float64/int64
    digits = table.int8_digits
    if device.type == "cpu" and digits is not None and accumulable and int8_gemm_is_exact():
        chunk = min((INT32_EXACT - 1) // max(1, bound) for bound in digits.bounds)
        gemms = len(digits.scales) * -(-k // chunk)
        cost = (m * k * n * digits.x.shape[1] * len(digits.scales) * INT8_MAC_COST
                + (m * k + k * n * len(digits.scales)) * INT8_MAP_COST + gemms * m * n * ACCUMULATE_COST)
        plans.append(GemmPlan(torch.int8, min(chunk, k), groups * cost))
    chunk = (FLOAT32_EXACT - 1) // max(1, table.term_bound)
    if _float32_matmul_is_ieee(device) and chunk >= 1 and accumulable:
        cost = macs + maps + -(-k // chunk) * m * n * ACCUMULATE_COST
        plans.append(GemmPlan(torch.float32, min(chunk, k), groups * cost))
    if _float64_error_bound(table, k) < 0.5:
        plans.append(GemmPlan(torch.float64, k, groups * FLOAT64_COST * (macs + maps + m * n)))
    return plans


def plan_gemm(table: LowRankTable, groups: int, m: int, k: int, n: int,
              device: torch.device) -> GemmPlan | None:
    """The cheapest exact plan for a [G, M, K] x [G, K, N] LUT GEMM, or None when none is exact."""
    return min(candidate_plans(table, groups, m, k, n, device), key=lambda p: p.cost, default=None)


def lowrank_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, table: LowRankTable,
                 plan: GemmPlan) -> torch.Tensor:
    """out[g, m, n] = sum_k table[a_idx[g, m, k], b_idx[g, k, n]], exact, as float64 (see the module)."""
    if plan.dtype == torch.int8:
        return _int8_gemm(a_idx, b_idx, table, plan.k_chunk)
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


def _int8_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, table: LowRankTable, chunk: int) -> torch.Tensor:
    """The int8 plan: per K chunk and scale s, an int8 GEMM of digit maps (int32 sums below 2**31),
    added times 256**s into int64, then divided by the denominator (an exact integer quotient)."""
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    digits = table.int8_digits
    x, ys = digits.maps(a_idx.device)
    columns = x.shape[1]
    ybs = []
    for y in ys:  # fresh tensors: _int_mm misreads the strides of size-1 dims that views may carry
        yb = torch.empty(groups, k * columns, n, dtype=torch.int8, device=a_idx.device)
        yb.view(groups, k, columns, n).copy_(F.embedding(b_idx, y).transpose(2, 3))
        ybs.append(yb)
    out = torch.zeros(groups, m, n, dtype=torch.int64, device=a_idx.device)
    rows = max(1, MAP_ELEMENTS // (chunk * columns))
    for m0 in range(0, m, rows):
        m1 = min(m, m0 + rows)
        for k0 in range(0, k, chunk):
            k1 = min(k, k0 + chunk)
            xa = F.embedding(a_idx[:, m0:m1, k0:k1], x).reshape(groups, m1 - m0, (k1 - k0) * columns)
            for g in range(groups):
                for scale, yb in zip(digits.scales, ybs):
                    part = torch._int_mm(xa[g], yb[g, k0 * columns:k1 * columns]).to(torch.int64)
                    out[g, m0:m1] += part << (8 * scale) if scale else part
    result = out.to(torch.float64)
    return result.div_(table.denominator) if table.denominator != 1 else result


def _resolve(strategy: str | None) -> str:
    strategy = strategy or _settings["strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"LUT GEMM strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def _gather_cost(groups: int, m: int, k: int, n: int) -> float:
    return groups * m * k * n * _settings["lookup_cost"]


def choose_plan(table: LowRankTable | None, groups: int, m: int, k: int, n: int, device: torch.device,
                strategy: str | None = None) -> tuple[GemmPlan | None, str]:
    """(the low-rank plan the strategy picks for this call, or None for the gather; why, in words)."""
    strategy = _resolve(strategy)
    if strategy == "gather":
        return None, "gather (strategy)"
    if table is None:
        return None, f"gather (LUT error rank above {MAX_FACTOR_RANK})"
    plan = plan_gemm(table, groups, m, k, n, device)
    if plan is None:
        return None, f"gather (no exact low-rank plan for K={k}, rank {table.rank})"
    gather_cost = _gather_cost(groups, m, k, n)
    if strategy == "auto" and plan.cost >= gather_cost:
        return None, f"gather (rank {table.rank} low-rank costs {plan.cost:.3g} > {gather_cost:.3g})"
    return plan, f"low rank {table.rank}, {plan}"


def try_lowrank_gemm(a_idx: torch.Tensor, b_idx: torch.Tensor, lut: torch.Tensor,
                     strategy: str | None = None) -> torch.Tensor | None:
    """The LUT GEMM through low-rank maps when the strategy picks it, else None (use the gather)."""
    groups, m, k = a_idx.shape
    n = b_idx.shape[2]
    if _resolve(strategy) == "gather" or groups * m * k * n == 0:
        return None
    table = factorize_lut(lut)
    plan, reason = choose_plan(table, groups, m, k, n, a_idx.device, strategy)
    log.debug("lut gemm: %s, shape G=%d M=%d K=%d N=%d", reason, groups, m, k, n)
    return None if plan is None else lowrank_gemm(a_idx, b_idx, table, plan)


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
    gather_cost = 2 * _gather_cost(groups, m, k, n)
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
