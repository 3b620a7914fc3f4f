"""The one place that owns the LUT index convention.

A LUT is a 256x256 integer table ``lut[i][j]`` = product of activation code ``i`` (operand A) and
weight code ``j`` (operand B). Codes are indexed by their byte: signed codes in two's complement
(index 0..127 hold 0..127, index 128..255 hold -128..-1), unsigned codes directly (0..255).
Operands narrower than 8 bits use only the indices of their codes. Every other module converts
codes to indices and indices to values through the functions here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by whoever passes tensors: listing or showing a LUT needs none
    import torch

LUT_SIZE = 256


@dataclass(frozen=True)
class OperandDomain:
    """The integer codes one multiplier operand accepts."""

    signed: bool
    bits: int = 8

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"operand bits must be 1..8, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def values(self) -> np.ndarray:
        """All codes of the domain, in numerical order."""
        return np.arange(self.qmin, self.qmax + 1, dtype=np.int64)

    def narrowed(self, bits: int) -> "OperandDomain":
        """The same domain with fewer bits (a quantizer may use fewer bits than the multiplier)."""
        if bits > self.bits:
            raise ValueError(f"{bits} bits exceed the multiplier operand's {self.bits} bits")
        return OperandDomain(self.signed, bits)

    def __str__(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


def code_to_index(codes, out: torch.Tensor | None = None):
    """Byte index of integer codes (numpy array, torch tensor or int): two's complement for negatives.

    ``out``: an int32 or int64 tensor of the codes' shape to write the indices into (tensor codes).
    """
    torch = sys.modules.get("torch")  # codes can only be a tensor once torch is imported
    if torch is not None and isinstance(codes, torch.Tensor):
        if codes.dtype in (torch.int8, torch.uint8):  # the byte is the index: no masking pass
            return codes.view(torch.uint8).to(torch.int64) if out is None else out.copy_(codes.view(torch.uint8))
        if out is None:  # one new tensor: masked in place unless the codes already are int64
            return codes & 0xFF if codes.dtype == torch.int64 else codes.to(torch.int64).bitwise_and_(0xFF)
        return out.copy_(codes).bitwise_and_(0xFF)
    return np.asarray(codes, dtype=np.int64) & 0xFF


def index_values(signed: bool) -> np.ndarray:
    """The integer value each of the 256 byte indices stands for."""
    idx = np.arange(LUT_SIZE, dtype=np.int64)
    return np.where(idx >= 128, idx - 256, idx) if signed else idx


def exact_lut(signed_a: bool = True, signed_b: bool = True) -> np.ndarray:
    """The exact product table in the byte-indexed convention."""
    return np.outer(index_values(signed_a), index_values(signed_b))


def domain_grid(domain_a: OperandDomain, domain_b: OperandDomain):
    """Operand values and their LUT indices over the full domain (A along rows)."""
    va, vb = domain_a.values(), domain_b.values()
    return va, vb, code_to_index(va), code_to_index(vb)


def _numeric_axis(signed: bool) -> np.ndarray:
    """Byte indices of the codes listed in numerical order (-128..127 or 0..255)."""
    return code_to_index(np.sort(index_values(signed)))


def numeric_to_byte_order(table: np.ndarray, signed_a: bool, signed_b: bool) -> np.ndarray:
    """Reorder a table whose axes run in numerical order to the byte-indexed convention."""
    out = np.empty_like(table)
    out[np.ix_(_numeric_axis(signed_a), _numeric_axis(signed_b))] = table
    return out


def byte_to_numeric_order(lut: np.ndarray, signed_a: bool, signed_b: bool) -> np.ndarray:
    """Inverse of :func:`numeric_to_byte_order`."""
    return lut[np.ix_(_numeric_axis(signed_a), _numeric_axis(signed_b))]
