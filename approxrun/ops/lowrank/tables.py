"""A factored table and the forms the executors use: float maps, map-then-conv maps, packed int8 maps.

Every form is derived from the exact factorization (:mod:`.factor`) and verified in integer
arithmetic; device copies are kept by the form itself (its owner, a :class:`~approxrun.ops.engine.LutEngine`,
decides how long it lives).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from approxrun.lut import LUT_SIZE
from approxrun.ops.gather import FLOAT32_EXACT
from approxrun.ops.lowrank.factor import Factors, compact, exact_matmul, rank_factorization

__all__ = ["LowRankTable", "ConvMaps", "Int8Maps", "INT16_LIMIT"]

INT16_LIMIT = 2**15  # int16 map pairs: map magnitudes below it

log = logging.getLogger(__name__)


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

    @classmethod
    def from_factors(cls, factors: Factors | None) -> "LowRankTable | None":
        if factors is None:
            return None
        return cls.of(factors.x, factors.y, factors.denominator, factors.exact_part)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, denominator: int,
           exact_part: tuple[bool, bool] | None = None) -> "LowRankTable":
        """The table of these factors, with its term bound."""
        bound = int(exact_matmul(np.abs(x), np.abs(y).T).max(initial=0))
        return cls(x, y, denominator, bound, exact_part)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    @property
    def rank(self) -> int:
        """Rank of the table minus its exact product: the multiplier's error rank."""
        return self.width - (self.exact_part is not None)

    @functools.cached_property
    def forms(self) -> list["LowRankTable"]:
        """Exact factorizations of the same table: this one and, for a LUT, one of the whole table
        (no exact-product column; DRUM's is ``u(a) u(b)``, width 1 where this one has 3), verified
        here. Float plans run whichever is cheapest, the int8 and conv forms the narrowest."""
        return [self, *_whole_table_forms(self)]

    @functools.cached_property
    def conv_maps(self) -> "ConvMaps | None":
        """The narrowest integer factorization (fewest columns, then smallest bound), for
        map-then-conv in float32; None when every one has a term above 2**24."""
        best = None
        for form in self.forms:
            if form.term_bound < FLOAT32_EXACT and (best is None or (form.width, form.term_bound) < (best.width, best.bound)):
                best = ConvMaps(np.asarray(form.x, dtype=np.float32), np.asarray(form.y, dtype=np.float32),
                                form.denominator, form.term_bound)
        return best

    @functools.cached_property
    def int8(self) -> "Int8Maps | None":
        """The int8 form for int8 GEMMs, from the narrowest of :attr:`forms`."""
        return _int8_maps(self)

    def maps(self, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on ``device``: integer x for float32, ``x / denominator`` for float64."""
        key = (str(device), dtype)
        if key not in self._device_maps:
            x = self.x.astype(object) / self.denominator if dtype == torch.float64 else self.x
            # float(int) and int / int round correctly: relative error <= 2**-53 per entry
            self._device_maps[key] = tuple(torch.as_tensor(np.asarray(t, dtype=np.float64), dtype=dtype,
                                                           device=device).contiguous() for t in (x, self.y))
        return self._device_maps[key]

    @functools.cached_property
    def map_bound(self) -> int:
        """The largest magnitude of a map entry (the int16 plan needs it below 2**15)."""
        return int(max(np.abs(self.x).max(initial=0), np.abs(self.y).max(initial=0)))

    def pair_words(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on ``device`` as int16 maps two columns per int32 word, [256, ceil(width / 2)] (an
        odd width padded with a zero column; column 2j in the low half, as the little-endian x86 CPUs
        that run the compiled int16 plan read it): what that plan multiplies (:attr:`map_bound`
        below 2**15 only)."""
        key = (str(device), "pairs")
        if key not in self._device_maps:
            if self.map_bound >= INT16_LIMIT:  # int16 would wrap
                raise ValueError(f"int16 map pairs need maps below 2**15 in magnitude, got {self.map_bound}")
            words = []
            for t in (self.x, self.y):
                maps = np.zeros((t.shape[0], t.shape[1] + t.shape[1] % 2), dtype="<i2")
                maps[:, :t.shape[1]] = np.asarray(t, dtype=np.int64)
                words.append(torch.from_numpy(maps.view("<i4").astype(np.int32)).to(device))
            self._device_maps[key] = tuple(words)
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


def _whole_table_forms(table: LowRankTable):
    """See :attr:`LowRankTable.forms`: the whole table factored, when ``table`` splits off the exact
    product and the whole table's rank is at most its width."""
    if table.exact_part is None:
        return
    values = exact_matmul(table.x, table.y.T) // table.denominator
    factors = rank_factorization(np.asarray(values, dtype=np.int64), table.width)
    if factors is not None and np.array_equal(exact_matmul(factors[0], factors[1].T),
                                              np.asarray(values, dtype=object) * factors[2]):
        x, y, denominator = factors
        yield LowRankTable.of(compact(x, 0), compact(y, 0), denominator)


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
    for form in table.forms:
        yield form.x, form.y, form.denominator, 0
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
    if not np.array_equal((u @ v.T + offset[None, :]).astype(object), exact_matmul(x, y.T)):
        log.warning("int8 maps failed their exact check; float GEMMs stay in use")
        return None
    bound = int((np.abs(u) @ np.abs(v).T).max(initial=0))
    return Int8Maps(u.astype(np.int8), v.astype(np.int8), offset, denominator, bound, code_scale)
