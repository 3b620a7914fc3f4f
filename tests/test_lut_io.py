"""LUT files: round trips in every format, the formats' orientation, and every bad-file case."""

from __future__ import annotations

import numpy as np
import pytest

from approxrun.errors import ApproxrunError
from approxrun.lut import code_to_index
from approxrun.multipliers import get_multiplier, load_lut, load_multiplier, save_lut
from conftest import random_lut

INT32_LIMITS = (-(2**31), 2**31 - 1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("suffix", [".npy", ".txt", ".lut"])
def test_round_trip_npy_and_text(tmp_path, rng, suffix, signed):
    lut = random_lut(rng, *INT32_LIMITS)
    lut[0, 0], lut[1, 1] = INT32_LIMITS  # the extremes survive
    path = tmp_path / f"m{suffix}"
    save_lut(lut, path, signed_a=signed, signed_b=signed)
    loaded = load_lut(path, signed_a=signed, signed_b=signed)
    assert loaded.dtype == np.int64
    assert np.array_equal(loaded, lut)


def test_round_trip_binary(tmp_path, rng):
    lut = random_lut(rng, 0, 2**16 - 1)
    path = tmp_path / "m.bin"
    save_lut(lut, path, signed_a=False, signed_b=False)
    assert path.stat().st_size == 2 * 65536
    assert np.array_equal(load_lut(path, signed_a=False, signed_b=False), lut)


def test_text_rows_are_operand_a_in_numerical_order(tmp_path):
    """ApproxTorch text: row r is A = -128 + r, column c is B = -128 + c."""
    numeric = np.arange(256)[:, None] * 1000 + np.arange(256)[None, :]
    path = tmp_path / "numeric.txt"
    path.write_text("\n".join(" ".join(str(v) for v in row) for row in numeric) + "\n")
    lut = load_lut(path)
    assert lut[code_to_index(-128), code_to_index(-128)] == 0
    assert lut[code_to_index(-127), code_to_index(-128)] == 1000  # second row: A = -127
    assert lut[code_to_index(0), code_to_index(5)] == 128 * 1000 + 133
    assert lut[code_to_index(127), code_to_index(-1)] == 255 * 1000 + 127
    unsigned = load_lut(path, signed_a=False, signed_b=False)
    assert unsigned[3, 200] == 3 * 1000 + 200
    comma = tmp_path / "comma.txt"
    comma.write_text("\n".join(",".join(str(v) for v in row) for row in numeric))
    assert np.array_equal(load_lut(comma), lut)


def test_binary_index_is_a_shifted_left_or_b(tmp_path):
    """TFApprox binary: entry (a << 8) | b is the product of a and b, little-endian uint16."""
    path = tmp_path / "tf.bin"
    path.write_bytes(np.arange(65536, dtype="<u2").tobytes())
    lut = load_lut(path, signed_a=False, signed_b=False)
    assert lut[2, 3] == (2 << 8) | 3
    assert lut[255, 0] == 255 << 8


def test_npy_is_byte_indexed(tmp_path, rng):
    lut = random_lut(rng)
    path = tmp_path / "byte.npy"
    np.save(path, lut.astype(np.int32))
    assert np.array_equal(load_lut(path), lut)


def test_load_multiplier_and_get_multiplier_read_files(tmp_path, rng):
    lut = random_lut(rng)
    path = tmp_path / "my_mult.npy"
    save_lut(lut, path)
    multiplier = load_multiplier(path)
    assert multiplier.name == "my_mult" and np.array_equal(multiplier.lut, lut)
    assert np.array_equal(get_multiplier(str(path)).lut, lut)
    unsigned = load_multiplier(path, signed=False, name="u")
    assert unsigned.name == "u" and not unsigned.domain_a.signed


def _write_text(path, rows):
    path.write_text("\n".join(" ".join(str(v) for v in row) for row in rows) + "\n")


def _npy_bytes(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _bad_files():
    """(file name, writer(path), expected words in the message) for every malformed LUT file."""
    good = np.arange(65536, dtype=np.int64).reshape(256, 256)
    rows = good.tolist()
    return [
        ("shape.npy", lambda p: np.save(p, good[:255]), "shape"),
        ("cube.npy", lambda p: np.save(p, good.reshape(16, 16, 256)), "shape"),
        ("float.npy", lambda p: np.save(p, good + 0.5), "non-integer"),
        ("nan.npy", lambda p: np.save(p, np.where(good == 7, np.nan, good.astype(float))), "NaN"),
        ("big.npy", lambda p: np.save(p, good + 2**31), "int32"),
        ("bool.npy", lambda p: np.save(p, good > 5), "dtype"),
        ("pickled.npy", lambda p: p.write_bytes(_npy_bytes(np.array([{"lut": 1}], dtype=object))), "pickle"),
        ("truncated.npy", lambda p: p.write_bytes(_npy_bytes(good)[:1000]), "npy"),
        ("empty.npy", lambda p: p.write_bytes(b""), "empty"),
        ("garbage.npy", lambda p: p.write_text("hello, this is not numpy\n"), "npy"),
        ("archive.npy", lambda p: np.savez(open(p, "wb"), lut=good), "archive"),
        ("rows.txt", lambda p: _write_text(p, rows[:255]), "255 rows"),
        ("count.txt", lambda p: _write_text(p, rows[:100] + [rows[100][:255]] + rows[101:]), "row 101"),
        ("real.txt", lambda p: _write_text(p, [[1.5] * 256] + rows[1:]), "not an integer"),
        ("nan.txt", lambda p: _write_text(p, rows[:3] + [["nan"] * 256] + rows[4:]), "not an integer"),
        ("big.txt", lambda p: _write_text(p, [[2**32] * 256] + rows[1:]), "int32"),
        ("huge.txt", lambda p: _write_text(p, [[10**30] * 256] + rows[1:]), "int64"),
        ("truncated.txt", lambda p: p.write_text("\n".join(" ".join(map(str, r)) for r in rows)[:-5000]), "256"),
        ("empty.txt", lambda p: p.write_bytes(b""), "empty"),
        ("garbage.txt", lambda p: p.write_text("a LUT? no.\n" * 256), "row 1"),
        ("words.txt", lambda p: _write_text(p, [["x"] * 256] * 256), "not an integer"),
        ("binary.txt", lambda p: p.write_bytes(bytes(range(256)) * 16), "text"),
        ("short.bin", lambda p: p.write_bytes(b"\0" * 131071), "bytes"),
        ("empty.bin", lambda p: p.write_bytes(b""), "empty"),
    ]


@pytest.mark.parametrize("name,write,words", _bad_files(), ids=[case[0] for case in _bad_files()])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, name, write, words):
    path = tmp_path / name
    write(path)
    signed = not name.endswith(".bin")
    with pytest.raises(ApproxrunError) as info:
        load_lut(path, signed_a=signed, signed_b=signed)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert words.lower() in message.lower()


def test_wrong_suffix_format_and_missing_file_are_user_errors(tmp_path, rng):
    with pytest.raises(ApproxrunError, match="suffix"):
        load_lut(tmp_path / "m.csv")
    with pytest.raises(ApproxrunError, match="unknown format"):
        load_lut(tmp_path / "m.npy", fmt="json")
    with pytest.raises(ApproxrunError, match="no such file"):
        load_lut(tmp_path / "missing.npy")
    path = tmp_path / "m.bin"
    lut = random_lut(rng, 0, 100)
    save_lut(lut, path, signed_a=False, signed_b=False)
    np.testing.assert_array_equal(load_lut(path), lut)  # the format is always unsigned: nothing to set


def test_binary_save_refuses_what_uint16_cannot_hold(tmp_path, rng):
    with pytest.raises(ApproxrunError, match="uint16"):
        save_lut(random_lut(rng, -5, 100), tmp_path / "neg.bin", signed_a=False, signed_b=False)
    with pytest.raises(ApproxrunError, match="unsigned"):
        save_lut(random_lut(rng, 0, 100), tmp_path / "signed.bin")
    assert not list(tmp_path.iterdir())  # nothing half-written
