"""The approxrun-lut command: list, show, convert, plot, and one-line errors with exit status 2."""

from __future__ import annotations

import re

import shutil
from pathlib import Path

import numpy as np
import pytest

from approxrun.lut import OperandDomain, byte_to_numeric_order
from approxrun.lut_tool import error_plane, main
from approxrun.multipliers import builtin_multiplier, evoapprox, get_multiplier, load_lut, save_lut

DATA = Path(__file__).parent / "data" / "evoapprox"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(not any(map(shutil.which, evoapprox.COMPILERS)), reason="needs a C compiler")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("APPROXRUN_CACHE", str(tmp_path / "lut-cache"))
    monkeypatch.setenv("EVOAPPROX_ROOT", str(DATA))
    monkeypatch.chdir(tmp_path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, out, err):
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("approxrun-lut: error:")]
    assert len(lines) == 1, err


def test_list_shows_builtins_catalogue_and_checkout(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "drum_6" in out and "truncated_6_c" in out
    assert re.search(r"mul8s_1KR3 +0\.052 +172\.2 +0\.89 +2016 +8064 +98\.05 +135\.77 +7\.28291e\+06", out)
    assert "EvoApproxLib circuits bundled with approxrun (49;" in out and "mul8u_2AC" in out
    assert f"EvoApproxLib circuits under {DATA}:" in out
    assert "8x4_unsigned (1):" in out and "mul8x4u_T04" in out
    assert "8x8_signed (3):" in out and "mul8s_1L2D mul8s_T01 mul8s_T02" in out


def test_list_without_a_checkout(capsys, monkeypatch):
    monkeypatch.delenv("EVOAPPROX_ROOT")
    code, out, _ = run(capsys, "list")
    assert code == 0 and "EvoApproxLib: no checkout (pass --root or set EVOAPPROX_ROOT)" in out
    code, out, _ = run(capsys, "list", "--root", str(DATA))
    assert "mul8u_T03" in out


def test_show_an_evoapprox_circuit(capsys):
    code, out, _ = run(capsys, "show", "mul8u_T03")
    assert code == 0
    assert "operands: A (activation) uint8, B (weight) uint8" in out
    assert "symmetric: no; exact: no" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    assert rows["metric"] == ["LUT", "header"]
    assert rows["MAE"] == ["63.75", "64"] and rows["MSE"] == ["10858.8", "10858.8"]
    assert "cost: 0.3 mW (power), source: EvoApproxLib PDK45 (file header), area 500 um2, delay 1.3 ns" in out


def test_show_a_catalogue_entry_uses_its_published_cost(capsys):
    code, out, _ = run(capsys, "show", "mul8s_1L2D")
    assert code == 0 and "published" in out.splitlines()[3]
    assert "source: EvoApproxLib PDK45 (published), area 411.6 um2, delay 1.14 ns" in out


def test_show_a_lut_file_and_a_builtin(capsys, tmp_path):
    save_lut(builtin_multiplier("drum_4", signed=False).lut, tmp_path / "drum.npy")
    code, out, _ = run(capsys, "show", str(tmp_path / "drum.npy"), "--unsigned")
    assert code == 0 and "operands: A (activation) uint8, B (weight) uint8" in out
    assert "symmetric: yes" in out and "cost: unknown" in out
    code, out, _ = run(capsys, "show", "truncated_6", "--unsigned")
    assert "uint8" in out and "(proxy), source: proxy" in out


@pytest.mark.parametrize("fmt", ["npy", "txt", "bin"])
def test_convert_round_trips(capsys, tmp_path, fmt):
    out_path = tmp_path / f"t03.{fmt}"
    code, out, _ = run(capsys, "convert", "mul8u_T03", str(out_path), "--to", fmt)
    assert code == 0 and out.startswith(f"wrote {out_path}")
    expected = get_multiplier("mul8u_T03").lut
    np.testing.assert_array_equal(load_lut(out_path, fmt, signed_a=False, signed_b=False), expected)


def test_convert_txt_is_in_numerical_order(capsys, tmp_path):
    code, _, _ = run(capsys, "convert", "mul8s_T01", str(tmp_path / "t01.lut"), "--to", "txt")
    assert code == 0
    rows = np.loadtxt(tmp_path / "t01.lut", dtype=np.int64)
    values = np.arange(-128, 128)
    a, b = values[:, None], values[None, :]
    np.testing.assert_array_equal(rows, a * b - np.where(a & 1, b & 3, 0))


def test_convert_refusals_write_nothing(capsys, tmp_path):
    assert_usage_error(*run(capsys, "convert", "mul8s_T01", str(tmp_path / "t01.bin"), "--to", "bin"))
    assert_usage_error(*run(capsys, "convert", "mul8s_T01", str(tmp_path / "t01.xyz")))
    assert_usage_error(*run(capsys, "convert", "mul8s_T01", str(tmp_path / "t01.npy"), "--to", "csv"))
    assert_usage_error(*run(capsys, "convert", "no_such_multiplier", str(tmp_path / "x.npy")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lut-cache"]


def test_plot_writes_a_png(capsys, tmp_path):
    code, out, _ = run(capsys, "plot", "mul8x4u_T04", "--out", str(tmp_path / "t04.png"))
    assert code == 0 and out == f"wrote {tmp_path / 't04.png'}\n"
    assert (tmp_path / "t04.png").read_bytes()[:8] == PNG_MAGIC
    code, out, _ = run(capsys, "plot", "exact")
    assert code == 0 and (tmp_path / "exact_error.png").read_bytes()[:8] == PNG_MAGIC


def test_plotted_error_plane_is_in_numerical_operand_order():
    m = get_multiplier("mul8x4u_T04")
    va, vb, err = error_plane(m)
    np.testing.assert_array_equal(va, np.arange(256))
    np.testing.assert_array_equal(vb, np.arange(16))
    np.testing.assert_array_equal(err, (va[:, None] & 0xFC) * vb[None, :] - va[:, None] * vb[None, :])
    signed = get_multiplier("mul8s_T02")
    va, vb, err = error_plane(signed)
    assert va[0] == -128 and va[-1] == 127
    np.testing.assert_array_equal(err, byte_to_numeric_order(signed.error_table, True, True))
    assert signed.domain_a == OperandDomain(True)


def test_bad_input_is_one_line_and_status_2(capsys, tmp_path):
    assert_usage_error(*run(capsys, "plot", "mul8s_NOPE", "--out", str(tmp_path / "x.png")))
    assert not (tmp_path / "x.png").exists()
    assert_usage_error(*run(capsys, "show", str(tmp_path / "missing.npy")))
    assert_usage_error(*run(capsys, "frobnicate"))
    assert_usage_error(*run(capsys, "show"))
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    assert_usage_error(*run(capsys, "show", str(tmp_path / "broken.npy")))


def test_installed_console_script():
    script = shutil.which("approxrun-lut")
    assert script is not None, "pip install -e . registers approxrun-lut"
    import subprocess

    result = subprocess.run([script, "show", "nothing_like_this"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith("approxrun-lut: error: unknown multiplier 'nothing_like_this'")
