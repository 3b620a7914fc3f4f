"""EvoApproxLib circuits: find a C model in the user's checkout, build its LUT, cache it.

approxrun never ships EvoApproxLib files; it reads the checkout named by ``evoapprox.root`` (config)
or the environment variable ``EVOAPPROX_ROOT``. A circuit is found by name in every folder of the
checkout's ``multiplers/`` tree (the library's spelling). Its C function is compiled with the system
C compiler together with a generated driver that calls it on every operand pair; the products fill a
byte-indexed LUT (:mod:`approxrun.lut`). The activation (LUT row, operand A of approxrun) is the FIRST
declared parameter, as the rest of the field calls these functions (EvoApproxLib's Python binding
``calc(a, b)``, TFApprox's tables): most 8x8 unsigned files declare ``(B, A)``. Operand widths and
signedness come from the name (``mul8s``, ``mul8x4u``, ``mul7u``) or else the folder (``8x8_signed``),
and a signed circuit whose C result is unsigned returns the bits of the two's-complement product. The file's header metrics become the multiplier's cost and are
checked against the metrics of the LUT. LUTs are cached under ``APPROXRUN_CACHE`` (default
``~/.cache/approxrun/luts``), keyed by the hash of the file's content.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from approxrun.errors import ApproxrunError
from approxrun.lut import OperandDomain, domain_grid, exact_lut
from approxrun.multipliers.catalogue import catalogue_entries
from approxrun.multipliers.multiplier import Cost, ErrorMetrics, Multiplier
from approxrun.utils.files import atomic_write_bytes

log = logging.getLogger(__name__)

ROOT_ENV = "EVOAPPROX_ROOT"
CACHE_ENV = "APPROXRUN_CACHE"
HEADER_COST_SOURCE = "EvoApproxLib PDK45 (file header)"
# the library spells its multiplier folder "multiplers"; the corrected spelling is accepted too
CIRCUIT_FOLDERS = ("multiplers", "multipliers")
COMPILERS = ("cc", "gcc", "clang")
COMPILE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 60
# bump when the way a LUT is built from a C file changes, so that old cache entries are not reused
CACHE_FORMAT = 2

# Branch v2022 renamed these circuits (same logic): master name -> v2022 name.
V2022_NAMES = {
    "mul8s_1KV8": "mul8s_1KV6", "mul8s_1KVA": "mul8s_1KV8", "mul8s_1KVB": "mul8s_1KV9",
    "mul8s_1KX2": "mul8s_1KVA", "mul8s_1KR8": "mul8s_1KVM", "mul8s_1KR6": "mul8s_1KVP",
    "mul8s_1KRC": "mul8s_1KVQ", "mul8s_1L2H": "mul8s_1L2J", "mul8s_1KVL": "mul8s_1KX5",
    "mul8s_1KTY": "mul8s_1KXF", "mul8s_1L2D": "mul8s_1L2L", "mul8s_1L1G": "mul8s_1L2N",
    "mul8s_1KR3": "mul8s_1L12",
}
MASTER_NAMES = {v2022: master for master, v2022 in V2022_NAMES.items()}
# names that denote different circuits on the two branches (mul8s_1KV8, mul8s_1KVA)
COLLIDING_NAMES = frozenset(V2022_NAMES) & frozenset(MASTER_NAMES)

# `// KEY = value [unit]` header lines; values may be written like 72829.102e2
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)"
_HEADER_LINE = re.compile(rf"^[ \t]*//[ \t]*([A-Za-z][A-Za-z0-9_]*%?)[ \t]*=[ \t]*({_NUMBER})\b", re.M | re.I)
HEADER_KEYS = {
    "MAE%": "mae_percent", "MAE": "mae", "WCE%": "wce_percent", "WCE": "wce", "WCRE%": "wcre_percent",
    "EP%": "ep_percent", "MRE%": "mre_percent", "MSE": "mse", "PDK45_PWR": "pdk45_pwr_mw",
    "PDK45_AREA": "pdk45_area_um2", "PDK45_DELAY": "pdk45_delay_ns",
}
# header metrics that a correct LUT reproduces (MRE over the pairs with a non-zero exact product)
CHECKED_METRICS = ("mae", "wce", "ep_percent", "mre_percent", "mse")

_NAME_DOMAINS = re.compile(r"mul(\d+)(?:x(\d+))?([su])_", re.I)
_FOLDER_DOMAINS = re.compile(r"(\d+)x(\d+)_(signed|unsigned)", re.I)
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_TYPE_WORDS = r"(?:(?:const|volatile|signed|unsigned|short|long|int|char)\s+)*" \
              r"(?:u?int(?:8|16|32|64)_t|unsigned|signed|short|long|int|char)"


class CircuitNotFoundError(ApproxrunError):
    """No C model of that name in the checkout."""


class RootNotSetError(ApproxrunError):
    """Neither ``evoapprox.root`` nor ``EVOAPPROX_ROOT`` names a checkout."""


# --------------------------------------------------------------------------- the checkout

def checkout_root(root: str | os.PathLike | None = None) -> Path:
    """The EvoApproxLib checkout: ``root`` when given, else ``$EVOAPPROX_ROOT``."""
    chosen = root if root not in (None, "") else os.environ.get(ROOT_ENV)
    if not chosen:
        raise RootNotSetError("no EvoApproxLib checkout given: set evoapprox.root=/path/to/evoapproxlib "
                             f"(config) or the environment variable {ROOT_ENV}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise ApproxrunError(f"EvoApproxLib checkout {path} (evoapprox.root / {ROOT_ENV}): no such folder")
    return path


def circuits_folder(root: Path) -> Path:
    """The folder holding the multiplier C models (``multiplers/``), or ``root`` itself."""
    for folder in CIRCUIT_FOLDERS:
        if (root / folder).is_dir():
            return root / folder
    return root


def index_circuits(root: Path) -> dict[str, list[Path]]:
    """Every C model under the checkout's multiplier folder: name -> its files (sorted paths)."""
    index: dict[str, list[Path]] = {}
    for path in sorted(circuits_folder(root).rglob("*.c")):
        index.setdefault(path.stem, []).append(path)
    return index


def find_circuit(name: str, root: Path) -> Path:
    """The C file of ``name`` (or of its name on the other branch, see ``V2022_NAMES``)."""
    index = index_circuits(root)
    candidates = [name] + [other for other in (V2022_NAMES.get(name), MASTER_NAMES.get(name))
                           if other and name not in COLLIDING_NAMES]
    for candidate in candidates:
        if candidate in index:
            paths = index[candidate]
            if candidate != name:
                log.info("EvoApproxLib: %s is not in %s; using %s, the same circuit under its %s name",
                         name, root, candidate, "v2022" if candidate in MASTER_NAMES else "master")
            if len(paths) > 1:
                log.debug("EvoApproxLib: %s is in %d folders; using %s", candidate, len(paths), paths[0])
            return paths[0]
    if not index:
        raise CircuitNotFoundError(f"EvoApproxLib circuit {name!r} not found: no C models under "
                                   f"{circuits_folder(root)} (is {root} an EvoApproxLib checkout?)")
    closest = difflib.get_close_matches(name, list(index), n=5, cutoff=0.0)
    raise CircuitNotFoundError(f"EvoApproxLib circuit {name!r} not found under {root} "
                               f"({len(index)} circuits; closest: {', '.join(closest)})")


def looks_like_circuit(name: str) -> bool:
    """True for names in EvoApproxLib's style (``mul8s_1L2D``, ``mul8x4u_03J``, ``mul7u_06Q``)."""
    return _NAME_DOMAINS.match(name) is not None


def master_name(name: str) -> str:
    """The master-branch name of a circuit name (a colliding name is taken as master's)."""
    return name if name in COLLIDING_NAMES else MASTER_NAMES.get(name, name)


def operand_domains(path: Path) -> tuple[OperandDomain, OperandDomain]:
    """Operand domains from the circuit name (``mul8x4u_...``), else from its folder (``8x8_signed``)."""
    match = _NAME_DOMAINS.match(path.stem)
    if match:
        bits_a = int(match.group(1))
        bits_b = int(match.group(2) or bits_a)
        signed = match.group(3).lower() == "s"
    else:
        folder = next((m for m in map(_FOLDER_DOMAINS.fullmatch, (p.name for p in path.parents)) if m), None)
        if folder is None:
            raise ApproxrunError(f"{path}: cannot tell the operand widths: expected a name like mul8s_XXX / "
                                 "mul8x4u_XXX or a folder like 8x8_signed")
        bits_a, bits_b = int(folder.group(1)), int(folder.group(2))
        signed = folder.group(3).lower() == "signed"
    if max(bits_a, bits_b) > 8:
        raise ApproxrunError(f"{path.stem}: {bits_a}x{bits_b}-bit operands; approxrun LUTs hold operands "
                             "of at most 8 bits (256x256)")
    return OperandDomain(signed, bits_a), OperandDomain(signed, bits_b)


# --------------------------------------------------------------------------- parsing the C file

@dataclass(frozen=True)
class HeaderValue:
    """One header figure with its printed text (whose last digit tells the print rounding)."""

    value: float
    text: str

    @property
    def print_unit(self) -> float:
        """One unit of the last significant printed digit (trailing zeros of an integer are not significant)."""
        mantissa, _, exponent = self.text.lower().lstrip("+-").partition("e")
        whole, _, fraction = mantissa.partition(".")
        if fraction:
            unit = 10.0 ** -len(fraction)
        else:
            digits = whole.lstrip("0")
            unit = 10.0 ** (len(digits) - len(digits.rstrip("0"))) if digits else 1.0
        return unit * 10.0 ** int(exponent or 0)


def parse_header(text: str) -> dict[str, HeaderValue]:
    """The ``// KEY = value [unit]`` metric lines of a C model, keyed as in ``HEADER_KEYS``."""
    header = {}
    for key, number in _HEADER_LINE.findall(text):
        field = HEADER_KEYS.get(key.upper())
        if field and field not in header:
            header[field] = HeaderValue(float(number), number)
    return header


@dataclass(frozen=True)
class CType:
    text: str
    signed: bool


@dataclass(frozen=True)
class Signature:
    """The C function of a circuit: result type and parameters in declared order.

    The first declared parameter takes the activation (approxrun's operand A, the LUT row), the
    second the weight, whatever their names: ``params`` holds (operand 'A'|'B', declared name, type).
    """

    function: str
    result: CType
    params: tuple[tuple[str, str, CType], ...]

    @property
    def activation_first_named_b(self) -> bool:
        """True when the parameter named B comes first (it then takes the activation)."""
        return self.params[0][1].upper() == "B"

    def __str__(self) -> str:
        params = ", ".join(f"{ctype.text} {declared}" for _, declared, ctype in self.params)
        return f"{self.result.text} {self.function}({params})"


def _ctype(words: str) -> CType:
    text = " ".join(words.split())
    base = [w for w in text.split() if w not in ("const", "volatile")]
    if not base:
        raise ValueError("no type")
    if len(base) == 1 and base[0].endswith("_t"):
        return CType(base[0], not base[0].startswith("u"))
    return CType(" ".join(base), "unsigned" not in base)


def parse_signature(text: str, function: str, path: Path | str = "") -> Signature:
    """Find ``function``'s definition; its parameters must be named A and B (any case, any order);
    the first declared one takes the activation (see :class:`Signature`)."""
    code = _COMMENTS.sub(" ", text)
    match = re.search(rf"\b({_TYPE_WORDS})\s+{re.escape(function)}\s*\(([^)]*)\)\s*\{{", code)
    if match is None:
        raise ApproxrunError(f"{path}: no definition of function {function}(...) returning an integer")
    params = []
    for declaration in match.group(2).split(","):
        words = re.findall(r"[A-Za-z_]\w*", declaration)
        operand = words[-1].upper() if words else ""
        if len(words) < 2 or operand not in ("A", "B"):
            raise ApproxrunError(f"{path}: parameter {declaration.strip()!r} of {function}: expected "
                                 "operands named A and B (in any order)")
        params.append((operand, words[-1], _ctype(" ".join(words[:-1]))))
    if sorted(p[0] for p in params) != ["A", "B"]:
        raise ApproxrunError(f"{path}: {function} must take exactly the two operands A and B, "
                             f"found ({match.group(2).strip()})")
    positional = tuple((role, declared, ctype) for role, (_, declared, ctype) in zip("AB", params))
    return Signature(function, _ctype(match.group(1)), positional)


# --------------------------------------------------------------------------- compiling and evaluating

def find_compiler() -> str:
    """Path of the system C compiler."""
    for name in COMPILERS:
        found = shutil.which(name)
        if found:
            return found
    raise ApproxrunError(f"no C compiler found on PATH (looked for {', '.join(COMPILERS)}); "
                         "EvoApproxLib C models need one to build their LUTs (e.g. apt install gcc)")


def _driver_source(file_name: str, signature: Signature, domain_a: OperandDomain,
                   domain_b: OperandDomain) -> str:
    """C code that prints the circuit's output bits for every (A, B) pair, A-major, numerical order."""
    values = {"A": "a", "B": "b"}
    masks = {"A": (1 << domain_a.bits) - 1, "B": (1 << domain_b.bits) - 1}
    args = ", ".join(values[op] if ctype.signed else f"({values[op]} & {masks[op]}LL)"
                     for op, _, ctype in signature.params)
    out_mask = (1 << (domain_a.bits + domain_b.bits)) - 1
    return f"""/* generated by approxrun: evaluates {signature.function} on every operand pair */
#include <stdio.h>
#include "{file_name}"

int main(void)
{{
    for (long long a = {domain_a.qmin}LL; a <= {domain_a.qmax}LL; ++a) {{
        for (long long b = {domain_b.qmin}LL; b <= {domain_b.qmax}LL; ++b) {{
            unsigned long long out = (unsigned long long) {signature.function}({args});
            printf("%llu\\n", out & {out_mask}ULL);
        }}
    }}
    return 0;
}}
"""


def _compile_error(stderr: str, file_name: str, path: Path) -> str:
    """One line: the compiler's first error line, located in the user's file when it is there."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    line = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no message")
    if line.startswith(file_name + ":"):
        return f"EvoApproxLib C model does not compile: {path}{line[len(file_name):]}"
    return f"EvoApproxLib C model {path} does not compile: {line}"


def evaluate_circuit(path: Path, content: bytes, signature: Signature, domain_a: OperandDomain,
                     domain_b: OperandDomain, compiler: str) -> np.ndarray:
    """The circuit's products over the operand domains (int64 [2^bits_a, 2^bits_b], numerical order).

    The output bits (bits_a + bits_b of them) are read as a two's-complement number for signed
    circuits, whatever the C result type, and as an unsigned number otherwise.
    """
    file_name = f"{signature.function}.c"
    with tempfile.TemporaryDirectory(prefix="approxrun-evoapprox-") as tmp:
        Path(tmp, file_name).write_bytes(content)
        Path(tmp, "approxrun_driver.c").write_text(_driver_source(file_name, signature, domain_a, domain_b))
        command = [compiler, "-O1", "-w", "-o", "approxrun_driver", "approxrun_driver.c"]
        try:
            built = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ApproxrunError(f"{path}: the C compiler ({compiler}) took longer than "
                                 f"{COMPILE_TIMEOUT_S} s") from None
        except OSError as exc:
            raise ApproxrunError(f"{path}: cannot run the C compiler {compiler} ({exc})") from None
        if built.returncode != 0:
            raise ApproxrunError(_compile_error(built.stderr, file_name, path))
        try:
            ran = subprocess.run([str(Path(tmp, "approxrun_driver"))], cwd=tmp, capture_output=True,
                                 text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ApproxrunError(f"{path}: evaluating the circuit took longer than {RUN_TIMEOUT_S} s") from None
        except OSError as exc:
            raise ApproxrunError(f"{path}: cannot run the compiled circuit in {tmp} ({exc.strerror}); "
                                 "point TMPDIR at a folder that allows executables") from None
        if ran.returncode != 0:
            raise ApproxrunError(f"{path}: the compiled circuit failed (exit status {ran.returncode})")
    outputs = np.array(ran.stdout.split(), dtype=np.int64)
    shape = (domain_a.qmax - domain_a.qmin + 1, domain_b.qmax - domain_b.qmin + 1)
    if outputs.size != shape[0] * shape[1]:
        raise ApproxrunError(f"{path}: the compiled circuit printed {outputs.size} products, "
                             f"expected {shape[0] * shape[1]}")
    out_bits = domain_a.bits + domain_b.bits
    if domain_a.signed or domain_b.signed:
        outputs = np.where(outputs >= 1 << (out_bits - 1), outputs - (1 << out_bits), outputs)
    return outputs.reshape(shape)


def assemble_lut(table: np.ndarray, domain_a: OperandDomain, domain_b: OperandDomain) -> np.ndarray:
    """Byte-indexed LUT from a numerical-order table; codes outside the domains keep the exact product."""
    lut = exact_lut(domain_a.signed, domain_b.signed)
    _, _, ia, ib = domain_grid(domain_a, domain_b)
    lut[np.ix_(ia, ib)] = table
    return lut


# --------------------------------------------------------------------------- the LUT cache

def lut_cache_dir() -> Path:
    """``$APPROXRUN_CACHE``, else ``~/.cache/approxrun/luts``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "approxrun" / "luts"


def _cache_path(stem: str, content: bytes, domain_a: OperandDomain, domain_b: OperandDomain) -> Path:
    key = hashlib.sha256(content + f"\0{CACHE_FORMAT}|{domain_a}|{domain_b}".encode()).hexdigest()
    return lut_cache_dir() / f"{stem}-{key[:24]}.npz"


def _load_cached(path: Path, sha256: str) -> np.ndarray | None:
    """The cached LUT, or None when absent, unreadable or built from other content."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            lut, meta = data["lut"].astype(np.int64), json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("EvoApproxLib: ignoring unreadable cache entry %s (%s)", path, exc)
        return None
    if lut.shape != (256, 256) or meta.get("sha256") != sha256:
        log.warning("EvoApproxLib: ignoring cache entry %s (LUT shape %s, built from %s)", path, lut.shape,
                    meta.get("source"))
        return None
    return lut


def _store_cached(path: Path, lut: np.ndarray, meta: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, lut=lut.astype(np.int32), meta=np.array(json.dumps(meta)))
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:  # a read-only cache only costs a rebuild next time
        log.warning("EvoApproxLib: cannot write the LUT cache %s (%s)", path, exc)


# --------------------------------------------------------------------------- building multipliers

def metric_disagreements(printed: dict[str, HeaderValue], metrics: ErrorMetrics,
                         label: str = "header") -> list[str]:
    """Printed metrics that differ from the LUT's by more than one unit of their last printed digit."""
    found = []
    for key in CHECKED_METRICS:
        figure = printed.get(key)
        if figure is None or not np.isfinite(figure.value):
            continue
        computed = getattr(metrics, key)
        if abs(computed - figure.value) > figure.print_unit * (1 + 1e-9):
            found.append(f"{key} {figure.text} ({label}) vs {computed:.6g} (LUT)")
    return found


def published_disagreements(metrics: ErrorMetrics, published: Mapping, printed: Mapping | None = None) -> list[str]:
    """Like :func:`metric_disagreements` for a catalogue entry's ``published`` figures (numbers), with
    their printed texts when known (``printed``: the last printed digit sets the tolerance)."""
    printed = printed or {}
    figures = {key: HeaderValue(float(published[key]), str(printed.get(key, published[key])))
               for key in CHECKED_METRICS if published.get(key) is not None}
    return metric_disagreements(figures, metrics, "published")


def _matches_published(metrics: ErrorMetrics, published: Mapping) -> bool:
    """True when MAE, WCE, EP and MSE (enough to tell the two candidates apart) match the published ones."""
    keys = ("mae", "wce", "ep_percent", "mse")
    complete = all(published.get(key) is not None for key in keys)
    return complete and not published_disagreements(metrics, {key: published[key] for key in keys})


def identify_circuit(stem: str, metrics: ErrorMetrics) -> tuple[str | None, str]:
    """Which master circuit a file named ``stem`` holds, and a sentence saying so.

    For the names used on both branches the LUT's metrics are matched against the published
    figures (catalogue) of the two candidates.
    """
    if stem in COLLIDING_NAMES:
        candidates = {stem: "master", MASTER_NAMES[stem]: "v2022"}
        entries = catalogue_entries()
        matched = [m for m in candidates if _matches_published(metrics, entries.get(m, {}).get("published") or {})]
        if len(matched) != 1:
            return None, (f"{stem} names different circuits on branches master and v2022 (= master "
                          f"{MASTER_NAMES[stem]}); its LUT matches the published figures of neither")
        master = matched[0]
        branch = candidates[master]
        what = "master's circuit" if branch == "master" else f"branch v2022's circuit (= master {master})"
        return master, (f"{stem} names different circuits on branches master and v2022; this file holds "
                        f"{what}, identified by its error metrics")
    if stem in MASTER_NAMES:
        return MASTER_NAMES[stem], f"{stem} is the v2022 name of master {MASTER_NAMES[stem]}"
    if stem in V2022_NAMES:
        return stem, f"{stem} is a master name (v2022: {V2022_NAMES[stem]})"
    return None, ""


def multiplier_from_c_file(path: str | os.PathLike, name: str | None = None) -> Multiplier:
    """Build (or load from the cache) the multiplier of one EvoApproxLib C model."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ApproxrunError(f"EvoApproxLib C model {path}: cannot read ({exc.strerror})") from None
    text = content.decode("utf-8", errors="replace")
    signature = parse_signature(text, path.stem, path)
    domain_a, domain_b = operand_domains(path)  # the widths of the parameters named A and B
    if signature.activation_first_named_b:
        domain_a, domain_b = domain_b, domain_a
    header = parse_header(text)
    sha256 = hashlib.sha256(content).hexdigest()
    cache_path = _cache_path(path.stem, content, domain_a, domain_b)
    lut = _load_cached(cache_path, sha256)
    if lut is not None:
        log.info("EvoApproxLib: %s LUT from the cache %s", path.stem, cache_path)
    else:
        compiler = find_compiler()
        log.info("EvoApproxLib: building the LUT of %s from %s with %s", path.stem, path, compiler)
        lut = assemble_lut(evaluate_circuit(path, content, signature, domain_a, domain_b, compiler),
                           domain_a, domain_b)
        meta = {"circuit": path.stem, "source": str(path), "sha256": sha256,
                "signature": str(signature), "compiler": compiler, "domains": [str(domain_a), str(domain_b)],
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _store_cached(cache_path, lut, meta)

    multiplier = Multiplier(name or path.stem, lut, domain_a, domain_b, cost=_header_cost(header))
    master, identity = identify_circuit(path.stem, multiplier.metrics)
    if path.stem in COLLIDING_NAMES:
        log.info("EvoApproxLib: %s", identity)
    mismatch = metric_disagreements(header, multiplier.metrics)
    if mismatch:
        log.warning("EvoApproxLib %s: LUT metrics disagree with the file header beyond print rounding: %s",
                    path, "; ".join(mismatch))
    multiplier.description = " ".join(filter(None, [
        f"EvoApproxLib {path.stem} ({domain_a}x{domain_b}) from {path};", identity and f"{identity};",
        f"C signature {signature}"]))
    multiplier.extra.update({
        "source": str(path), "sha256": sha256,
        "signature": str(signature), "header_metrics": {k: v.value for k, v in header.items()},
        "header_mismatch": mismatch, "evoapprox_circuit": master, "cache": str(cache_path),
    })
    return multiplier


def _header_cost(header: dict[str, HeaderValue]) -> Cost | None:
    power = header.get("pdk45_pwr_mw")
    if power is None:
        return None
    area, delay = header.get("pdk45_area_um2"), header.get("pdk45_delay_ns")
    return Cost(power.value, "power", "mW", HEADER_COST_SOURCE, area=area and area.value,
                delay=delay and delay.value)


def evoapprox_multiplier(name: str, root: str | os.PathLike | None = None) -> Multiplier:
    """The multiplier of EvoApproxLib circuit ``name`` from the checkout (``root`` or ``$EVOAPPROX_ROOT``)."""
    checkout = checkout_root(root)
    path = find_circuit(name, checkout)
    multiplier = multiplier_from_c_file(path, name=name)
    found = multiplier.extra["evoapprox_circuit"]
    wanted = master_name(name) if name not in COLLIDING_NAMES else None
    if found and wanted and found != wanted:
        log.warning("EvoApproxLib: asked for %s (master %s) but %s holds master %s", name, wanted, path, found)
    return multiplier
