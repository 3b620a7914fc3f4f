"""EvoApproxLib circuits bundled with approxrun: the bundle command, checksums, published figures,
the operand order of the field (TFApprox tables, EvoApproxLib's Python binding) and swapped operands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from approxrun.errors import ApproxrunError
from approxrun.lut_tool import main as lut_tool
from approxrun.multipliers import evoapprox, get_multiplier, resolve_multiplier
from approxrun.multipliers.bundled import Bundle, DamagedBundleError, bundle_sources, package_bundle_dir
from approxrun.multipliers.evoapprox import evoapprox_multiplier, published_disagreements

DATA = Path(__file__).parent / "data" / "evoapprox"
needs_compiler = pytest.mark.skipif(not any(map(shutil.which, evoapprox.COMPILERS)), reason="needs a C compiler")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("APPROXRUN_CACHE", str(tmp_path / "lut-cache"))
    monkeypatch.delenv("EVOAPPROX_ROOT", raising=False)


# --------------------------------------------------------------------------- the packaged bundle

def test_packaged_bundle_holds_every_8x8_pareto_circuit_compactly():
    catalogue = Bundle.packaged().catalogue()
    names = list(catalogue)
    assert sum(n.startswith("mul8s_") for n in names) == 13 and sum(n.startswith("mul8u_") for n in names) == 36
    folder = package_bundle_dir()
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 3_000_000
    licence = (folder / "LICENSE").read_text()
    assert "MIT" in licence or "Permission is hereby granted" in licence
    assert "EHW@FIT" in licence and "https://github.com/ehw-fit/evoapproxlib" in licence


def test_every_bundled_table_reproduces_its_published_figures():
    bundle = Bundle.packaged()
    for name, entry in bundle.catalogue().items():
        m = bundle.multiplier(name)
        published, printed = entry["published"], entry["printed"]
        assert {"mae", "wce", "ep_percent", "mre_percent", "mse", "pdk45_pwr_mw"} <= set(published), name
        assert published_disagreements(m.metrics, published, printed) == [], name
        assert m.cost.kind == "power" and m.cost.value == published["pdk45_pwr_mw"]
        assert m.domain_a.signed == name.startswith("mul8s_")


def test_bundled_circuits_work_offline_by_name_and_v2022_alias():
    m = get_multiplier("mul8s_1L2D")
    assert m.extra["bundled"] and m.cost.value == 0.2
    assert np.array_equal(get_multiplier("mul8s_1L2L").lut, m.lut)  # its v2022 name
    exact_unsigned = get_multiplier("mul8u_1JFF")
    assert exact_unsigned.is_exact and not exact_unsigned.domain_b.signed


def test_a_circuit_that_is_not_bundled_says_how_to_get_the_library():
    with pytest.raises(ApproxrunError) as info:
        get_multiplier("mul8x4u_03J")
    message = str(info.value)
    assert "\n" not in message and "git clone https://github.com/ehw-fit/evoapproxlib" in message


def test_a_damaged_bundled_table_is_refused_with_one_line(tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(package_bundle_dir(), copy)
    payload = bytearray((copy / "mul8s_1L2D.xz").read_bytes())
    payload[len(payload) // 2] ^= 0x40
    (copy / "mul8s_1L2D.xz").write_bytes(bytes(payload))
    with pytest.raises(DamagedBundleError) as info:
        Bundle(copy).multiplier("mul8s_1L2D")
    assert "damaged" in str(info.value) and "\n" not in str(info.value)
    (copy / "mul8s_1KR3.xz").unlink()
    with pytest.raises(DamagedBundleError, match="cannot read"):
        Bundle(copy).multiplier("mul8s_1KR3")


# --------------------------------------------------------------------------- the bundle command

@needs_compiler
def test_bundle_command_over_the_fixture_circuits_loads_identical_to_a_direct_import(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert lut_tool(["bundle", str(DATA), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    bundle = Bundle(out)
    names = set(bundle.catalogue())
    assert names == set(bundle_sources(DATA)) and {"mul8s_T01", "mul8u_T03", "mul8u_T05"} <= names
    assert "mul8x4u_T04" not in names  # only the 8x8 folders are bundled
    for name in names:
        direct = evoapprox_multiplier(name, DATA)
        loaded = bundle.multiplier(name)
        np.testing.assert_array_equal(loaded.lut, direct.lut, err_msg=name)
        assert (loaded.domain_a, loaded.domain_b) == (direct.domain_a, direct.domain_b)
        assert (loaded.cost and loaded.cost.value) == (direct.cost and direct.cost.value)
    catalogue = json.loads((out / "catalogue.json").read_text())
    t03 = next(e for e in catalogue["circuits"] if e["name"] == "mul8u_T03")
    assert t03["signature"].startswith("uint64_t mul8u_T03(uint64_t B")


@needs_compiler
def test_bundle_refuses_a_circuit_whose_header_disagrees(tmp_path):
    root = tmp_path / "checkout" / "multiplers" / "8x8_signed" / "pareto_pwr_mae"
    root.mkdir(parents=True)
    (root / "mul8s_X01.c").write_text("// MAE = 3\n#include <stdint.h>\n"
                                      "int16_t mul8s_X01(int8_t A, int8_t B) { return A * B; }\n")
    with pytest.raises(ApproxrunError, match="disagrees with the header: mae 3"):
        from approxrun.multipliers.bundled import build_bundle
        build_bundle(tmp_path / "checkout", tmp_path / "out")
    assert not (tmp_path / "out" / "catalogue.json").exists()


# --------------------------------------------------------------------------- operand order

def tfapprox_table(function) -> bytes:
    """A TFApprox .bin as TFApprox builds it: table[(a << 8) | b] = mul(a, b), called positionally."""
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    return function(a, b).astype("<u2").tobytes()


@needs_compiler
def test_b_first_circuit_gives_the_same_lut_as_its_tfapprox_table(tmp_path):
    # mul8u_T03 is declared (const uint64_t B, const uint64_t A) with body A * (B | 1)
    path = tmp_path / "mul8u_T03.bin"
    path.write_bytes(tfapprox_table(lambda first, second: second * (first | 1)))
    from_bin = get_multiplier(str(path))  # the format is unsigned: nothing to set
    from_c = evoapprox_multiplier("mul8u_T03", DATA)
    assert not from_bin.domain_a.signed
    np.testing.assert_array_equal(from_bin.lut, from_c.lut)
    assert not from_c.is_symmetric


@needs_compiler
def test_swap_operands_puts_the_activation_on_the_other_operand():
    plain = resolve_multiplier({"name": "mul8u_T03"}, evoapprox_root=DATA)
    swapped = resolve_multiplier({"name": "mul8u_T03", "swap_operands": True}, evoapprox_root=DATA)
    np.testing.assert_array_equal(swapped.lut, plain.lut.T)
    assert swapped.cost == plain.cost and swapped.name == "mul8u_T03_swapped"
    with pytest.raises(ApproxrunError, match="swap_operands"):
        resolve_multiplier({"name": "drum_6", "swap_operands": "yes"})
