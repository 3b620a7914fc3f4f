"""EvoApproxLib C models: lookup, signature variants, header metrics, LUT building, cache, errors.

The circuits are approxrun's own (tests/data/evoapprox, laid out like a checkout, and C written in
the tests); each LUT is checked against a Python re-implementation of the circuit.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from approxrun.errors import ApproxrunError
from approxrun.lut import OperandDomain, domain_grid, exact_lut
from approxrun.multipliers import Cost, builtin_multiplier, get_multiplier, resolve_multiplier
from approxrun.multipliers import evoapprox
from approxrun.multipliers.catalogue import catalogue_entries
from approxrun.multipliers.evoapprox import HeaderValue, evoapprox_multiplier, parse_header, parse_signature

DATA = Path(__file__).parent / "data" / "evoapprox"
S8, U8 = OperandDomain(True), OperandDomain(False)

pytestmark = pytest.mark.skipif(not any(map(shutil.which, evoapprox.COMPILERS)), reason="needs a C compiler")

# name -> (domain A, domain B, the circuit in Python on operand values)
CIRCUITS = {
    "mul8s_T01": (S8, S8, lambda a, b: a * b - np.where(a & 1, b & 3, 0)),
    "mul8s_T02": (S8, S8, lambda a, b: (a * b) & ~7),
    # declared (B, A): the activation (first parameter, named B) is `a` here, so the C body A * (B | 1) is
    "mul8u_T03": (U8, U8, lambda a, b: b * (a | 1)),
    "mul8x4u_T04": (U8, OperandDomain(False, 4), lambda a, b: (a & 0xFC) * b),
    "mul8u_T05": (U8, U8, lambda a, b: (a * b) ^ ((a & b) & 1)),
    "mul7u_T06": (OperandDomain(False, 7), OperandDomain(False, 7), lambda a, b: (a * b) & 0x3FFE),
    "mul8_T07": (U8, U8, lambda a, b: a * b),
    "mul8s_1L2D": (S8, S8, lambda a, b: (a * b) & ~15),
}

HEADER = "// MAE = {mae}\n// WCE = {wce}\n// EP% = {ep} %\n// MSE = {mse}\n// PDK45_PWR = 0.2 mW\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own LUT cache and no checkout from the environment."""
    monkeypatch.setenv("APPROXRUN_CACHE", str(tmp_path / "lut-cache"))
    monkeypatch.delenv("EVOAPPROX_ROOT", raising=False)


def checkout(tmp_path: Path, files: dict[str, str]) -> Path:
    """A checkout in tmp_path: {'8x8_signed/pareto_pwr_mae/name.c': source}."""
    root = tmp_path / "checkout"
    for relative, source in files.items():
        path = root / "multiplers" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def oracle_table(name: str) -> np.ndarray:
    domain_a, domain_b, circuit = CIRCUITS[name]
    return circuit(domain_a.values()[:, None], domain_b.values()[None, :])


# --------------------------------------------------------------------------- LUTs

@pytest.mark.parametrize("name", sorted(CIRCUITS))
def test_lut_matches_the_circuit_evaluated_directly(name):
    domain_a, domain_b, circuit = CIRCUITS[name]
    m = evoapprox_multiplier(name, DATA)
    assert (m.domain_a, m.domain_b) == (domain_a, domain_b)
    _, _, ia, ib = domain_grid(domain_a, domain_b)
    np.testing.assert_array_equal(m.lut[np.ix_(ia, ib)], oracle_table(name))
    outside = np.ones((256, 256), bool)
    outside[np.ix_(ia, ib)] = False
    np.testing.assert_array_equal(m.lut[outside], exact_lut(domain_a.signed, domain_b.signed)[outside])
    assert m.extra["header_mismatch"] == []


def test_asymmetric_circuits_would_expose_binding_by_name():
    """The B-first and asymmetric files only pass the test above when the activation takes the first
    declared parameter (as EvoApproxLib's Python binding and TFApprox call the function)."""
    for name in ("mul8s_T01", "mul8u_T03"):
        table = oracle_table(name)
        assert not np.array_equal(table, table.T)
        assert not evoapprox_multiplier(name, DATA).is_symmetric


def gate_netlist(signature: str, signed: bool, drop_columns: int) -> str:
    """Straight-line gate-level C of an 8x8 array multiplier, like the library's evolved netlists.

    Partial products a_j & b_i of columns i + j >= drop_columns are summed by full and half adders;
    the signed version is a Baugh-Wooley array whose 16 output bits are the two's-complement product.
    """
    lines, wires = [], []

    def wire(expr: str) -> str:
        wires.append(f"n{len(wires)}")
        lines.append(f"  {wires[-1]} = {expr};")
        return wires[-1]

    columns: list[list[str]] = [[] for _ in range(17)]
    for i in range(8):
        for j in range(8):
            if i + j >= drop_columns:
                bit = f"(((A >> {j}) & 1) & ((B >> {i}) & 1))"
                columns[i + j].append(wire(f"{bit} ^ 1" if signed and (i == 7) != (j == 7) else bit))
    if signed:
        columns[8].append(wire("1"))
        columns[15].append(wire("1"))
    for c in range(16):
        while len(columns[c]) > 1:
            if len(columns[c]) >= 3:
                x, y, z = (columns[c].pop(0) for _ in range(3))
                t = wire(f"{x} ^ {y}")
                columns[c].append(wire(f"{t} ^ {z}"))
                columns[c + 1].append(wire(f"({x} & {y}) | ({t} & {z})"))
            else:
                x, y = columns[c].pop(0), columns[c].pop(0)
                columns[c].append(wire(f"{x} ^ {y}"))
                columns[c + 1].append(wire(f"{x} & {y}"))
    out = " | ".join(f"(({columns[c][0]} & 1) << {c})" for c in range(16) if columns[c])
    return (f"#include <stdint.h>\n\n{signature}\n{{\n  uint64_t O, {', '.join(wires)};\n"
            + "\n".join(lines) + f"\n  O = {out};\n  return O;\n}}\n")


def test_gate_level_netlists_match_the_builtin_array_designs(tmp_path):
    root = checkout(tmp_path, {
        "8x8_signed/pareto_pwr_mae/mul8s_N01.c":
            gate_netlist("uint16_t mul8s_N01(uint8_t A, uint8_t B)", signed=True, drop_columns=4),
        "8x8_unsigned/pareto_pwr_mae/mul8u_N02.c":
            gate_netlist("uint64_t mul8u_N02(const uint64_t B,const uint64_t A)", signed=False, drop_columns=6),
    })
    signed = evoapprox_multiplier("mul8s_N01", root)
    np.testing.assert_array_equal(signed.lut, builtin_multiplier("truncated_4", signed=True).lut)
    unsigned = evoapprox_multiplier("mul8u_N02", root)
    np.testing.assert_array_equal(unsigned.lut, builtin_multiplier("truncated_6", signed=False).lut)


def test_name_and_folder_give_the_domains_and_signed_is_ignored():
    m = get_multiplier("mul8u_T03", signed=True, evoapprox_root=DATA)
    assert (m.domain_a, m.domain_b) == (U8, U8)
    narrow = get_multiplier("mul8x4u_T04", evoapprox_root=DATA)
    assert narrow.domain_b == OperandDomain(False, 4)
    legacy = get_multiplier("mul8_T07", evoapprox_root=DATA)  # no s/u in the name: folder 8x8_unsigned
    assert legacy.domain_a == U8 and legacy.is_exact


def test_a_c_file_path_works_without_a_checkout():
    path = DATA / "multiplers" / "8x8_signed" / "pareto_pwr_wce" / "mul8s_T02.c"
    m = get_multiplier(str(path))
    _, _, ia, ib = domain_grid(S8, S8)
    np.testing.assert_array_equal(m.lut[np.ix_(ia, ib)], oracle_table("mul8s_T02"))
    assert "uint16_t mul8s_T02(uint8_t A, uint8_t B)" in m.description


def test_checkout_root_from_the_environment(monkeypatch):
    monkeypatch.setenv("EVOAPPROX_ROOT", str(DATA))
    assert get_multiplier("mul8u_T05").name == "mul8u_T05"


# --------------------------------------------------------------------------- header and signature

def test_header_forms():
    text = ("/* licence */\r\n// MAE% = 0.00019 %\r\n// MAE = .25 \r\n//WCE=1.\r\n// EP% = 6875e-2 %\r\n"
            "// MSE = 72829.102e2 \n// PDK45_PWR = 0.2e-0 mW\n// PDK45_AREA = 3.5E2 um2\n"
            "// PDK45_DELAY = +1.40 ns\n// WCRE% = inf %\n// SOMETHING = 3\n// MAE = 99\n"
            "// internal reference: x = y\n")
    header = parse_header(text)
    assert {k: v.value for k, v in header.items() if k != "wcre_percent"} == {
        "mae_percent": 0.00019, "mae": 0.25, "wce": 1.0, "ep_percent": 68.75, "mse": 7282910.2,
        "pdk45_pwr_mw": 0.2, "pdk45_area_um2": 350.0, "pdk45_delay_ns": 1.4}
    assert header["wcre_percent"].value == float("inf")
    assert header["mse"].text == "72829.102e2"


@pytest.mark.parametrize("text, unit", [("72829.102e2", 0.1), ("0.00019", 1e-5), ("150", 10.0), ("38236", 1.0),
                                        ("0", 1.0), ("0.00", 0.01), (".25", 0.01), ("1.", 1.0),
                                        ("6875e-2", 0.01), ("3.5E2", 10.0), ("-1.5e-3", 1e-4)])
def test_print_unit_is_the_last_significant_printed_digit(text, unit):
    assert HeaderValue(float(text), text).print_unit == pytest.approx(unit)


def test_file_headers_become_cost_and_extra():
    m = evoapprox_multiplier("mul8x4u_T04", DATA)  # CRLF, no spaces around '='
    assert m.cost == Cost(0.047, "power", "mW", "EvoApproxLib PDK45 (file header)", area=122.0, delay=0.6)
    assert m.extra["header_metrics"]["mse"] == 271.25
    assert m.extra["header_metrics"]["ep_percent"] == 70.31
    assert evoapprox_multiplier("mul7u_T06", DATA).cost is None  # no metric lines


@pytest.mark.parametrize("source, expected", [
    ("uint64_t f(const uint64_t B,const uint64_t A) {", "uint64_t f(uint64_t B, uint64_t A)"),
    ("int16_t f(int8_t A, int8_t B)\n{", "int16_t f(int8_t A, int8_t B)"),
    ("uint64_t f(const uint64_t A /* 8-bit (A) */,\n  const uint64_t B // 4-bit\n)\n{",
     "uint64_t f(uint64_t A, uint64_t B)"),
    ("static inline unsigned int f(unsigned char b, signed char a) {",
     "unsigned int f(unsigned char b, signed char a)"),
])
def test_signature_variants(source, expected):
    signature = parse_signature("#include <stdint.h>\n" + source + " return 0; }", "f")
    assert str(signature) == expected
    assert sorted(op for op, _, _ in signature.params) == ["A", "B"]


def test_signature_gives_the_activation_to_the_first_parameter():
    signature = parse_signature("uint64_t f(const uint64_t B, const int8_t A) { return 0; }", "f")
    assert [(op, declared, ctype.signed) for op, declared, ctype in signature.params] == \
        [("A", "B", False), ("B", "A", True)]
    assert signature.activation_first_named_b and signature.result.signed is False


@pytest.mark.parametrize("source", [
    "int16_t f(int8_t x, int8_t y) { return 0; }",
    "int16_t f(int8_t A, int8_t B, int8_t C) { return 0; }",
    "int16_t f(int8_t A, int8_t A) { return 0; }",
    "int16_t g(int8_t A, int8_t B) { return 0; }",
])
def test_bad_signatures_are_one_line_errors(source):
    with pytest.raises(ApproxrunError) as info:
        parse_signature(source, "f", "x.c")
    assert "\n" not in str(info.value) and "x.c" in str(info.value)


def test_header_disagreeing_with_the_lut_is_reported(tmp_path, caplog):
    source = (DATA / "multiplers/8x8_signed/pareto_pwr_mae/mul8s_T01.c").read_text()
    root = checkout(tmp_path, {"8x8_signed/f/mul8s_T01.c": source.replace("// MAE = 0.75", "// MAE = 0.9")})
    with caplog.at_level(logging.WARNING):
        m = evoapprox_multiplier("mul8s_T01", root)
    assert m.extra["header_mismatch"] == ["mae 0.9 (header) vs 0.75 (LUT)"]
    assert "disagree with the file header" in caplog.text


# --------------------------------------------------------------------------- cache

def test_second_build_is_a_cache_hit(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="approxrun.multipliers.evoapprox")
    first = evoapprox_multiplier("mul8s_T01", DATA)
    entries = list((tmp_path / "lut-cache").glob("mul8s_T01-*.npz"))
    assert len(entries) == 1 and "building the LUT" in caplog.text
    caplog.clear()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no compiler: only the cache can answer
    second = evoapprox_multiplier("mul8s_T01", DATA)
    assert "from the cache" in caplog.text and "building" not in caplog.text
    np.testing.assert_array_equal(first.lut, second.lut)
    assert second.cost == first.cost and second.extra["sha256"] == first.extra["sha256"]


def test_changed_content_misses_the_cache_and_needs_a_compiler(tmp_path, monkeypatch):
    source = (DATA / "multiplers/8x8_signed/pareto_pwr_mae/mul8s_T01.c").read_text()
    root = checkout(tmp_path, {"8x8_signed/f/mul8s_T01.c": source})
    evoapprox_multiplier("mul8s_T01", root)
    (root / "multiplers/8x8_signed/f/mul8s_T01.c").write_text(source + "\n/* edited */\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ApproxrunError, match=r"^no C compiler found on PATH .*cc, gcc, clang") as info:
        evoapprox_multiplier("mul8s_T01", root)
    assert "\n" not in str(info.value)


def test_unreadable_cache_entry_is_rebuilt(tmp_path, caplog):
    first = evoapprox_multiplier("mul8u_T05", DATA)
    (entry,) = (tmp_path / "lut-cache").glob("mul8u_T05-*.npz")
    entry.write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING):
        again = evoapprox_multiplier("mul8u_T05", DATA)
    assert "ignoring unreadable cache entry" in caplog.text
    np.testing.assert_array_equal(again.lut, first.lut)
    assert np.load(entry, allow_pickle=False)["lut"].shape == (256, 256)


# --------------------------------------------------------------------------- errors

def test_root_not_set_says_how_to_set_it():
    with pytest.raises(ApproxrunError) as info:
        evoapprox_multiplier("mul8s_T01")
    assert "evoapprox.root=" in str(info.value) and "EVOAPPROX_ROOT" in str(info.value)
    assert "\n" not in str(info.value)


def test_root_that_is_not_a_folder(tmp_path):
    with pytest.raises(ApproxrunError, match="no such folder"):
        evoapprox_multiplier("mul8s_T01", tmp_path / "missing")


def test_name_not_found_lists_the_closest_names():
    with pytest.raises(ApproxrunError) as info:
        evoapprox_multiplier("mul8s_T0X", DATA)
    message = str(info.value)
    assert "'mul8s_T0X' not found" in message and "\n" not in message
    closest = message.split("closest: ")[1].rstrip(")").split(", ")
    assert set(closest[:2]) == {"mul8s_T01", "mul8s_T02"} and len(closest) == 5


def test_unknown_multiplier_mentions_builtins_and_evoapprox():
    with pytest.raises(ApproxrunError) as info:
        get_multiplier("mul8s_ZZZZ")  # a circuit name that is not bundled, no checkout: how to get one
    message = str(info.value)
    assert "not bundled" in message and "git clone https://github.com/ehw-fit/evoapproxlib" in message \
        and "EVOAPPROX_ROOT" in message and "\n" not in message
    with pytest.raises(ApproxrunError) as info:
        get_multiplier("drumm_6")
    message = str(info.value)
    assert "built-in design" in message and "drum_6" in message and "git clone" in message
    with pytest.raises(ApproxrunError) as info:
        get_multiplier("drum6", evoapprox_root=DATA)
    assert "built-in design" in str(info.value) and "closest:" in str(info.value)


def test_compile_error_reports_the_compilers_first_error_line(tmp_path):
    root = checkout(tmp_path, {"8x8_signed/f/mul8s_BAD.c":
                               "#include <stdint.h>\n\nint16_t mul8s_BAD(int8_t A, int8_t B)\n{\n"
                               "  int16_t P = A * B\n  return P + undeclared_wire;\n}\n"})
    with pytest.raises(ApproxrunError) as info:
        evoapprox_multiplier("mul8s_BAD", root)
    message = str(info.value)
    path = root / "multiplers/8x8_signed/f/mul8s_BAD.c"
    assert "\n" not in message
    assert re.fullmatch(rf"EvoApproxLib C model does not compile: {re.escape(str(path))}:[56]:\d+: error: .+", message)


def test_operands_wider_than_8_bits_are_refused(tmp_path):
    root = checkout(tmp_path, {"12x12_signed/f/mul12s_W01.c": "int32_t mul12s_W01(int16_t A, int16_t B) { return 0; }"})
    with pytest.raises(ApproxrunError, match="12x12-bit operands"):
        evoapprox_multiplier("mul12s_W01", root)


# --------------------------------------------------------------------------- v2022 names and collisions

def test_v2022_name_finds_the_master_file_and_back(tmp_path):
    m = evoapprox_multiplier("mul8s_1L2L", DATA)
    assert m.name == "mul8s_1L2L" and m.extra["source"].endswith("mul8s_1L2D.c")
    assert m.extra["evoapprox_circuit"] == "mul8s_1L2D"
    source = (DATA / "multiplers/8x8_signed/pareto_pwr_mae/mul8s_1L2D.c").read_text()
    v2022 = checkout(tmp_path, {"8x8_signed/f/mul8s_1L2L.c": source.replace("mul8s_1L2D(", "mul8s_1L2L(")})
    m = evoapprox_multiplier("mul8s_1L2D", v2022)
    assert m.extra["source"].endswith("mul8s_1L2L.c") and m.extra["evoapprox_circuit"] == "mul8s_1L2D"
    assert "v2022 name of master mul8s_1L2D" in m.description


# Errors E[k] on the pairs with (A ^ B) odd, k = bits 1..2 of A and of B: MAE 39/32, WCE 5, EP 50 %,
# MSE 121/32 -- the published figures of master mul8s_1KVA (1.2, 5, 50.00, 3.8).
LIKE_1KVA = """#include <stdint.h>
// MAE = 1.2
// WCE = 5
// EP% = 50.00 %
// MSE = 3.8
// PDK45_PWR = 0.422 mW
static const int8_t E[16] = {5, 4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1};
int16_t mul8s_1KV8(int8_t A, int8_t B)
{
  return (int16_t)(A * B + (((A ^ B) & 1) ? E[((A >> 1) & 3) | (((B >> 1) & 3) << 2)] : 0));
}
"""
EXACT_1KV8 = """#include <stdint.h>
// MAE = 0
// PDK45_PWR = 0.425 mW
int16_t mul8s_1KV8(int8_t A, int8_t B) { return A * B; }
"""


def test_colliding_name_resolved_by_the_file_found(tmp_path, caplog):
    entry = catalogue_entries()["mul8s_1KV8"]
    v2022 = checkout(tmp_path / "v2022", {"8x8_signed/pareto_pwr_mae/mul8s_1KV8.c": LIKE_1KVA})
    with caplog.at_level(logging.INFO):
        m = evoapprox_multiplier("mul8s_1KV8", v2022)
    assert m.extra["evoapprox_circuit"] == "mul8s_1KVA" and m.extra["header_mismatch"] == []
    assert "branch v2022's circuit (= master mul8s_1KVA)" in m.description
    assert "branch v2022's circuit" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        from_catalogue = resolve_multiplier(entry, evoapprox_root=v2022)
    assert from_catalogue.cost.value == 0.422 and from_catalogue.cost.source.endswith("(file header)")
    assert "holds master circuit mul8s_1KVA" in caplog.text

    master = checkout(tmp_path / "master", {"8x8_signed/pareto_pwr_mae/mul8s_1KV8.c": EXACT_1KV8})
    m = resolve_multiplier(entry, evoapprox_root=master)
    assert m.extra["evoapprox_circuit"] == "mul8s_1KV8" and "master's circuit" in m.description
    assert m.cost == Cost(0.425, "power", "mW", "EvoApproxLib PDK45 (published)", area=729.8, delay=1.48)


def test_colliding_name_matching_neither_branch_says_so(tmp_path):
    root = checkout(tmp_path, {"8x8_signed/f/mul8s_1KVA.c": EXACT_1KV8.replace("mul8s_1KV8", "mul8s_1KVA")})
    m = evoapprox_multiplier("mul8s_1KVA", root)
    assert m.extra["evoapprox_circuit"] is None and "matches the published figures of neither" in m.description


# --------------------------------------------------------------------------- catalogue

REFERENCE_TABLE = {  # name: (PWR, AREA, DELAY, MAE, WCE, MRE %, EP %, MSE), shared/reference/evoapprox.md
    "mul8s_1KV8": (0.425, 729.8, 1.48, 0, 0, 0.00, 0.00, 0),
    "mul8s_1KVA": (0.422, 711.0, 1.48, 1.2, 5, 0.28, 50.00, 3.8),
    "mul8s_1KVB": (0.410, 685.2, 1.47, 4.2, 17, 0.90, 68.75, 34),
    "mul8s_1KX2": (0.391, 641.1, 1.51, 12, 49, 2.53, 81.25, 248),
    "mul8s_1KR8": (0.369, 652.8, 1.37, 32, 128, 2.40, 49.80, 2731),
    "mul8s_1KR6": (0.363, 635.0, 1.37, 33, 137, 2.73, 74.80, 2746),
    "mul8s_1KRC": (0.351, 599.8, 1.36, 36, 161, 3.64, 84.18, 2872),
    "mul8s_1L2H": (0.301, 558.9, 1.36, 53, 255, 4.41, 74.61, 5462),
    "mul8s_1KVL": (0.289, 543.0, 1.33, 101, 449, 8.93, 91.89, 19690),
    "mul8s_1KTY": (0.237, 482.4, 1.19, 224, 896, 15.72, 87.16, 95576),
    "mul8s_1L2D": (0.200, 411.6, 1.14, 150, 759, 12.26, 93.16, 38236),
    "mul8s_1L1G": (0.126, 284.9, 0.94, 340, 1743, 27.44, 97.75, 191238),
    "mul8s_1KR3": (0.052, 172.2, 0.89, 2016, 8064, 135.77, 98.05, 7282910.2),
}


def test_catalogue_holds_the_published_figures():
    entries = catalogue_entries()
    for name, (pwr, area, delay, mae, wce, mre, ep, mse) in REFERENCE_TABLE.items():
        entry = entries[name]
        assert (entry["name"], entry["signed"], entry["path"]) == (name, True, None)
        assert Cost(**entry["cost"]) == Cost(pwr, "power", "mW", "EvoApproxLib PDK45 (published)", area, delay)
        published = {key: entry["published"][key] for key in ("mae", "wce", "mre_percent", "ep_percent", "mse")}
        assert published == pytest.approx({"mae": mae, "wce": wce, "mre_percent": mre, "ep_percent": ep, "mse": mse},
                                          rel=0.005)


def test_catalogue_entry_brings_published_cost_and_warns_on_other_figures(caplog):
    entry = dict(catalogue_entries()["mul8s_1L2D"], signed=False)  # signed does not apply
    with caplog.at_level(logging.WARNING):
        m = resolve_multiplier(entry, evoapprox_root=DATA)  # the stand-in circuit, not EvoApproxLib's
    assert m.domain_a == S8 and m.cost.value == 0.2 and m.cost.source == "EvoApproxLib PDK45 (published)"
    assert m.extra["published"]["mse"] == 38236
    assert "disagree with the entry's published figures: mae 150 (published) vs 6.5 (LUT)" in caplog.text


def test_library_configs_name_resolvable_candidates():
    import yaml
    from importlib import resources

    library = resources.files("approxrun.conf").joinpath("library")
    evo = yaml.safe_load(library.joinpath("evoapprox_mul8s.yaml").read_text())
    assert evo["name"] == "evoapprox_mul8s" and evo["multipliers"] == list(REFERENCE_TABLE)
    builtin = yaml.safe_load(library.joinpath("builtin.yaml").read_text())
    assert builtin["name"] == "builtin" and "exact" in builtin["multipliers"]
    for name in builtin["multipliers"]:
        assert get_multiplier(name).cost.kind == "proxy"

