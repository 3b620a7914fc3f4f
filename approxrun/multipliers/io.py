"""Reading and writing LUT files.

Formats:
- ``npy``: a 256x256 integer array in the byte-indexed convention of :mod:`approxrun.lut`
  (loaded with ``allow_pickle=False``).
- ``txt``: ApproxTorch text, 256 rows of 256 integers in numerical order (rows = A, -128..127 for
  signed operands, 0..255 for unsigned; columns = B).
- ``bin``: TFApprox binary, 65,536 little-endian uint16 at index (a << 8) | b, unsigned operands.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from approxrun.errors import ApproxrunError
from approxrun.lut import LUT_SIZE, byte_to_numeric_order, numeric_to_byte_order
from approxrun.multipliers.multiplier import INT32_MAX, INT32_MIN
from approxrun.utils.files import atomic_write_bytes

FORMATS = ("npy", "txt", "bin")
_SUFFIX_FORMAT = {".npy": "npy", ".txt": "txt", ".lut": "txt", ".bin": "bin"}
LUT_SUFFIXES = tuple(_SUFFIX_FORMAT)  # file names that mean a LUT file (multiplier=lut.npy)


def infer_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise ApproxrunError(f"LUT file {path}: unknown format {fmt!r}, expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMAT:
        raise ApproxrunError(f"LUT file {path}: cannot tell the format from suffix {suffix!r}; "
                             f"give format= one of {', '.join(FORMATS)}")
    return _SUFFIX_FORMAT[suffix]


def _check_values(path, values: np.ndarray) -> np.ndarray:
    if values.shape != (LUT_SIZE, LUT_SIZE):
        raise ApproxrunError(f"LUT file {path}: shape {values.shape}, expected (256, 256)")
    if values.dtype == bool or not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ApproxrunError(f"LUT file {path}: dtype {values.dtype}, expected integers")
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ApproxrunError(f"LUT file {path}: contains NaN or infinite values")
        if (values != np.round(values)).any():
            raise ApproxrunError(f"LUT file {path}: contains non-integer values")
    if values.min() < INT32_MIN or values.max() > INT32_MAX:
        raise ApproxrunError(f"LUT file {path}: values beyond the int32 range "
                             f"(min {values.min()}, max {values.max()})")
    return values.astype(np.int64)


NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ApproxrunError(f"LUT file {path}: not a .npy file (no NumPy header)")
    try:
        values = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ApproxrunError(f"LUT file {path}: holds pickled objects, which are never loaded") from None
        raise ApproxrunError(f"LUT file {path}: not a valid .npy file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ApproxrunError(f"LUT file {path}: not a valid .npy file ({exc})") from None
    if not isinstance(values, np.ndarray):
        raise ApproxrunError(f"LUT file {path}: expected one array, found an archive")
    return _check_values(path, values)


def _load_txt(path, signed_a: bool, signed_b: bool) -> np.ndarray:
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ApproxrunError(f"LUT file {path}: not a text file") from None
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    if len(rows) != LUT_SIZE:
        raise ApproxrunError(f"LUT file {path}: {len(rows)} rows, expected 256 rows of 256 integers")
    table = np.empty((LUT_SIZE, LUT_SIZE), dtype=np.int64)
    for r, tokens in enumerate(rows):
        if len(tokens) != LUT_SIZE:
            raise ApproxrunError(f"LUT file {path}: row {r + 1} has {len(tokens)} values, expected 256")
        for c, token in enumerate(tokens):
            try:
                table[r, c] = int(token)
            except ValueError:
                raise ApproxrunError(f"LUT file {path}: row {r + 1}, column {c + 1}: {token!r} "
                                     "is not an integer") from None
            except OverflowError:
                raise ApproxrunError(f"LUT file {path}: row {r + 1}: value beyond int64") from None
    table = _check_values(path, table)
    return numeric_to_byte_order(table, signed_a, signed_b)


def _load_bin(path) -> np.ndarray:
    data = Path(path).read_bytes()
    expected = LUT_SIZE * LUT_SIZE * 2
    if len(data) != expected:
        raise ApproxrunError(f"LUT file {path}: {len(data)} bytes, expected {expected} "
                             "(65,536 little-endian uint16)")
    return np.frombuffer(data, dtype="<u2").astype(np.int64).reshape(LUT_SIZE, LUT_SIZE)


def load_lut(path: str | os.PathLike, fmt: str | None = None, signed_a: bool = True,
             signed_b: bool = True) -> np.ndarray:
    """Load a LUT file into the byte-indexed convention (int64 [256, 256])."""
    fmt = infer_format(path, fmt)
    if not Path(path).is_file():
        raise ApproxrunError(f"LUT file {path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ApproxrunError(f"LUT file {path}: file is empty")
    if fmt == "npy":
        return _load_npy(path)
    if fmt == "txt":
        return _load_txt(path, signed_a, signed_b)
    return _load_bin(path)  # always unsigned operands, whatever signed_a/signed_b say


def save_lut(lut: np.ndarray, path: str | os.PathLike, fmt: str | None = None, signed_a: bool = True,
             signed_b: bool = True) -> None:
    """Write a byte-indexed LUT in the given format; the file appears complete or not at all."""
    fmt = infer_format(path, fmt)
    lut = np.asarray(lut, dtype=np.int64)
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, lut.astype(np.int32), allow_pickle=False)
        payload = buf.getvalue()
    elif fmt == "txt":
        table = byte_to_numeric_order(lut, signed_a, signed_b)
        payload = "".join(" ".join(str(v) for v in row) + "\n" for row in table).encode()
    else:
        if signed_a or signed_b:
            raise ApproxrunError(f"{path}: the TFApprox binary format holds unsigned operands only")
        if lut.min() < 0 or lut.max() > 0xFFFF:
            raise ApproxrunError(f"{path}: values outside 0..65535 do not fit the uint16 binary format")
        payload = lut.astype("<u2").tobytes()
    atomic_write_bytes(path, payload)
