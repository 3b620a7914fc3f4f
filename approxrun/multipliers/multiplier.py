"""The multiplier object: a LUT, its operand domains, its cost and its error metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from approxrun.lut import LUT_SIZE, OperandDomain, domain_grid, exact_lut

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Cost:
    """A cost figure and where it comes from.

    ``kind`` is ``"power"`` for a published power figure (``unit`` mW) or ``"proxy"`` for a
    dimensionless estimate relative to the exact multiplier; a proxy is never presented as power.
    """

    value: float
    kind: str
    unit: str
    source: str
    area: float | None = None
    delay: float | None = None

    def __post_init__(self):
        if self.kind not in ("power", "proxy"):
            raise ValueError(f"cost kind must be 'power' or 'proxy', got {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit} ({self.kind}; {self.source})"


@dataclass(frozen=True)
class ErrorMetrics:
    """Error of a multiplier over all operand pairs of its domain, uniformly weighted (EvoApproxLib)."""

    mae: float
    mae_percent: float
    wce: float
    wce_percent: float
    mre_percent: float
    ep_percent: float
    mse: float
    error_mean: float
    error_std: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def compute_metrics(lut: np.ndarray, domain_a: OperandDomain, domain_b: OperandDomain) -> ErrorMetrics:
    """EvoApproxLib error metrics of ``lut`` over every operand pair of the domains.

    MRE is EvoApproxLib's: the mean of |error| / |exact product| over the pairs whose exact product
    is non-zero.
    """
    va, vb, ia, ib = domain_grid(domain_a, domain_b)
    exact = np.outer(va, vb).astype(np.float64)
    err = lut[np.ix_(ia, ib)].astype(np.float64) - exact
    abs_err = np.abs(err)
    scale = float(2 ** (domain_a.bits + domain_b.bits))
    return ErrorMetrics(
        mae=float(abs_err.mean()),
        mae_percent=float(abs_err.mean() / scale * 100),
        wce=float(abs_err.max()),
        wce_percent=float(abs_err.max() / scale * 100),
        mre_percent=float((abs_err[exact != 0] / np.abs(exact[exact != 0])).mean() * 100),
        ep_percent=float((err != 0).mean() * 100),
        mse=float((err**2).mean()),
        error_mean=float(err.mean()),
        error_std=float(err.std()),
    )


@dataclass(eq=False)
class Multiplier:
    """An 8-bit (or narrower) multiplier given by its byte-indexed LUT (see :mod:`approxrun.lut`).

    Operand A is the activation, operand B the weight.
    """

    name: str
    lut: np.ndarray
    domain_a: OperandDomain = OperandDomain(signed=True)
    domain_b: OperandDomain = OperandDomain(signed=True)
    cost: Cost | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        lut = np.asarray(self.lut)
        if lut.shape != (LUT_SIZE, LUT_SIZE):
            raise ValueError(f"multiplier {self.name!r}: LUT shape {lut.shape}, expected (256, 256)")
        if not np.issubdtype(lut.dtype, np.integer):
            raise ValueError(f"multiplier {self.name!r}: LUT dtype {lut.dtype}, expected integers")
        if lut.min() < INT32_MIN or lut.max() > INT32_MAX:
            raise ValueError(f"multiplier {self.name!r}: LUT values exceed the int32 range")
        self.lut = np.array(lut, dtype=np.int64, order="C")  # a copy: the caller's array stays writable
        self.lut.flags.writeable = False

    @classmethod
    def from_table(cls, lut, signed_a: bool = True, signed_b: bool = True, name: str = "custom") -> "Multiplier":
        """A multiplier from a raw 256x256 table (numpy array, torch tensor or nested lists) in the
        byte-indexed convention ``lut[a][b]``; float entries must be whole numbers."""
        values = lut.detach().cpu().numpy() if hasattr(lut, "detach") else np.asarray(lut)
        if values.shape != (LUT_SIZE, LUT_SIZE):
            raise ValueError(f"multiplier {name!r}: LUT shape {values.shape}, expected (256, 256)")
        if values.dtype.kind == "f":
            if not (np.isfinite(values).all() and (values == np.round(values)).all()):
                raise ValueError(f"multiplier {name!r}: LUT entries must be whole numbers")
            values = values.astype(np.int64)
        elif values.dtype.kind == "b":
            values = values.astype(np.int64)
        return cls(name, values, OperandDomain(signed=signed_a), OperandDomain(signed=signed_b),
                   description="raw 256x256 table")

    @classmethod
    def exact(cls, signed_a: bool = True, signed_b: bool = True, bits_a: int = 8, bits_b: int = 8,
              name: str = "exact", cost: Cost | None = None) -> "Multiplier":
        return cls(name, exact_lut(signed_a, signed_b), OperandDomain(signed_a, bits_a),
                   OperandDomain(signed_b, bits_b), cost=cost, description="exact product")

    def swapped(self) -> "Multiplier":
        """The same circuit with the activation on the other operand: transposed LUT, domains exchanged
        (hardware designers choose which port takes the activation)."""
        swapped = Multiplier(f"{self.name}_swapped", self.lut.T, self.domain_b, self.domain_a, cost=self.cost,
                             description=f"{self.description} [operands swapped: the activation takes operand B]",
                             extra=dict(self.extra, swapped_from=self.name))
        return swapped

    @cached_property
    def engine(self):
        """This multiplier's :class:`~approxrun.ops.engine.LutEngine`: its table's exact factorizations,
        maps, device images and per-shape plans, built on first use and kept with the multiplier.
        Its route settings (``engine.configure(strategy=...)``) belong to this multiplier only."""
        from approxrun.ops.engine import LutEngine  # ops build on multipliers, not the reverse
        return LutEngine(self.lut, self.domain_a.signed, self.domain_b.signed)

    @cached_property
    def metrics(self) -> ErrorMetrics:
        return compute_metrics(self.lut, self.domain_a, self.domain_b)

    @cached_property
    def error_table(self) -> np.ndarray:
        """LUT minus the exact product, byte-indexed, as float64 (zero outside the domain)."""
        _, _, ia, ib = domain_grid(self.domain_a, self.domain_b)
        err = np.zeros((LUT_SIZE, LUT_SIZE))
        exact = exact_lut(self.domain_a.signed, self.domain_b.signed)
        sub = np.ix_(ia, ib)
        err[sub] = self.lut[sub] - exact[sub]
        return err

    @property
    def is_exact(self) -> bool:
        return not self.error_table.any()

    @property
    def is_symmetric(self) -> bool:
        """True when swapping the operands never changes the product (same domains only)."""
        if self.domain_a != self.domain_b:
            return False
        _, _, ia, _ = domain_grid(self.domain_a, self.domain_b)
        sub = self.lut[np.ix_(ia, ia)]
        return bool((sub == sub.T).all())

    def __repr__(self) -> str:
        return f"Multiplier({self.name!r}, A={self.domain_a}, B={self.domain_b}, cost={self.cost})"
