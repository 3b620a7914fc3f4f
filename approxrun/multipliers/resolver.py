"""Name or config entry -> :class:`Multiplier`: designs, LUT files, EvoApproxLib circuits, and the
packaged catalogue (``conf/multiplier``) whose entries add published costs and figures."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

from approxrun.errors import ApproxrunError, ConfigError
from approxrun.lut import OperandDomain
from approxrun.multipliers import evoapprox
from approxrun.multipliers.bundled import CLONE_COMMAND, Bundle
from approxrun.multipliers.catalogue import catalogue_entries
from approxrun.multipliers.designs import DESIGN_EXAMPLES, builtin_multiplier, is_builtin
from approxrun.multipliers.io import LUT_SUFFIXES, infer_format, load_lut
from approxrun.multipliers.multiplier import Cost, Multiplier

log = logging.getLogger(__name__)
# multiplier=auto: no named multiplier; the select stage chooses per layer from the library
AUTO = "auto"


def load_multiplier(path: str | os.PathLike, fmt: str | None = None, signed: bool = True,
                    name: str | None = None, cost: Cost | None = None) -> Multiplier:
    """A multiplier from a LUT file (both operands of the given signedness, 8 bits; a TFApprox ``bin``
    file always holds unsigned operands)."""
    signed = signed and infer_format(path, fmt) != "bin"
    lut = load_lut(path, fmt, signed, signed)
    domain = OperandDomain(signed)
    return Multiplier(name or Path(path).stem, lut, domain, domain, cost=cost,
                      description=f"LUT file {path}")


def resolve_multiplier(spec: Mapping, evoapprox_root: str | None = None) -> Multiplier:
    """A multiplier from its config entry (``conf/multiplier/*.yaml``), a plain mapping:

    ``name`` (a built-in design, an EvoApproxLib circuit, or the file's display name), ``signed``
    (default true; EvoApproxLib circuits take theirs from the name), ``path`` and ``format`` for a LUT
    file, ``swap_operands`` (the activation on operand B: the transposed LUT), ``cost`` (value, kind,
    unit, source, area, delay) when known and ``published`` error figures.
    A cost given here replaces the design's own (e.g. a published power figure), unless the
    EvoApproxLib file found holds another circuit than the entry names (the two names that mean
    different circuits on the library's branches).
    """
    spec = with_catalogue_entry(spec)
    name = spec.get("name") or (Path(str(spec["path"])).stem if spec.get("path") else None)
    if not name:
        raise ApproxrunError("multiplier config: key 'name' (or 'path' for a LUT file) is missing")
    signed = bool(spec.get("signed", True))
    cost = _cost(name, spec.get("cost"))
    if spec.get("path"):
        multiplier = load_multiplier(spec["path"], spec.get("format"), signed, name)
    else:
        multiplier = _by_name(name, signed, evoapprox_root)
    if spec.get("swap_operands", False) is not False:
        if spec["swap_operands"] is not True:
            raise ConfigError(f"multiplier.swap_operands={spec['swap_operands']!r}: expected true or false")
        return _resolve_costs(multiplier, name, spec, cost).swapped()
    return _resolve_costs(multiplier, name, spec, cost)


def _resolve_costs(multiplier: Multiplier, name: str, spec: Mapping, cost: Cost | None) -> Multiplier:
    """The entry's cost and published figures on ``multiplier`` (see :func:`resolve_multiplier`)."""
    circuit = multiplier.extra.get("evoapprox_circuit")
    if circuit is not None and circuit != evoapprox.master_name(name):
        log.warning("multiplier %r: the EvoApproxLib file %s holds master circuit %s; keeping its header "
                    "cost, not the catalogue entry's figures", name, multiplier.extra.get("source"), circuit)
        return multiplier
    if cost is not None:
        multiplier.cost = cost
    if spec.get("published"):
        multiplier.extra["published"] = published = dict(spec["published"])
        mismatch = evoapprox.published_disagreements(multiplier.metrics, published, spec.get("printed"))
        if mismatch:
            log.warning("multiplier %r: LUT metrics disagree with the entry's published figures: %s",
                        name, "; ".join(mismatch))
    return multiplier


def _cost(name: str, spec: Mapping | None) -> Cost | None:
    if not spec:
        return None
    try:
        return Cost(**dict(spec))
    except (TypeError, ValueError) as exc:
        raise ApproxrunError(f"multiplier {name!r}: bad cost entry {dict(spec)} ({exc})") from None


def get_multiplier(name: str, signed: bool = True, evoapprox_root: str | os.PathLike | None = None) -> Multiplier:
    """Resolve a built-in design name, a LUT file, an EvoApproxLib C file or circuit name.

    ``signed`` applies to built-in designs and LUT files; EvoApproxLib circuits take their operand
    domains from their name or folder. Circuit names are looked up in the checkout given by
    ``evoapprox_root`` or ``EVOAPPROX_ROOT``. A name with a catalogue entry brings its published
    cost and figures.
    """
    return resolve_multiplier({"name": name, "signed": signed}, evoapprox_root)


def with_catalogue_entry(spec: Mapping) -> dict:
    """``spec`` on top of the catalogue entry of its name, when it names one and no file."""
    entry = catalogue_entries().get(spec.get("name")) if not spec.get("path") else None
    if entry is None or entry.get("path"):
        return dict(spec)
    return {**entry, **{key: value for key, value in spec.items() if value is not None}}


def _by_name(name: str, signed: bool, evoapprox_root: str | os.PathLike | None) -> Multiplier:
    """A multiplier from its name alone: a design, a LUT file, a ``.c`` model, an EvoApproxLib circuit."""
    if is_builtin(name):
        return builtin_multiplier(name, signed)
    suffix = Path(name).suffix.lower()
    if suffix in LUT_SUFFIXES:
        return load_multiplier(name, signed=signed)
    if suffix == ".c":
        return evoapprox.multiplier_from_c_file(name)
    bundle = Bundle.packaged()
    bundled = bundle.lookup(name) is not None
    try:
        return evoapprox.evoapprox_multiplier(name, evoapprox_root)  # a user's checkout comes first
    except evoapprox.CircuitNotFoundError as exc:
        if bundled:
            return bundle.multiplier(name)
        raise ConfigError(f"unknown multiplier {name!r}: not a built-in design ({', '.join(DESIGN_EXAMPLES)}; "
                          f"numbers are parameters), not a LUT file ({', '.join(LUT_SUFFIXES)}), and not "
                          f"an EvoApproxLib circuit: {exc}") from None
    except evoapprox.RootNotSetError:
        if bundled:
            return bundle.multiplier(name)
        if evoapprox.looks_like_circuit(name):
            raise ConfigError(f"EvoApproxLib circuit {name!r} is not bundled with approxrun (bundled: the 8x8 "
                              f"mul8s/mul8u Pareto circuits); get the library: {CLONE_COMMAND}") from None
        raise ConfigError(f"unknown multiplier {name!r}: not a built-in design ({', '.join(DESIGN_EXAMPLES)}; "
                          f"numbers are parameters), not a LUT file ({', '.join(LUT_SUFFIXES)}), and not "
                          f"a bundled EvoApproxLib circuit (others: {CLONE_COMMAND})") from None


def run_multiplier_spec(spec: Mapping, library: Mapping | None) -> Mapping:
    """The run's multiplier entry: ``multiplier=auto`` stands for the library's exact multiplier
    (``library.exact``; its operand domains set the quantization before a selection)."""
    if spec.get("name") != AUTO:
        return spec
    exact = (library or {}).get("exact")
    if not exact:
        raise ConfigError(f"multiplier=auto needs library.exact (the library's exact multiplier); library "
                          f"{(library or {}).get('name')!r} names none")
    return {"name": exact, "swap_operands": spec.get("swap_operands", False)}


class MultiplierResolver:
    """Multiplier names and config entries -> Multiplier objects, each resolved once per run.

    Stages resolve the per-layer names of an assignment through it; a name resolved before (e.g.
    the run's own multiplier, from its config entry) gives the same object. ``lut_settings``
    (``strategy``, ``lookup_cost``: the run's ``lut`` section) configure each multiplier's engine.
    """

    def __init__(self, evoapprox_root: str | None, lut_settings: Mapping | None = None):
        self.evoapprox_root = evoapprox_root
        self.lut_settings = dict(lut_settings or {})
        self._by_spec: dict[str, Multiplier] = {}
        self._by_name: dict[str, Multiplier] = {}

    def from_spec(self, spec: Mapping) -> Multiplier:
        key = json.dumps(dict(spec), sort_keys=True, default=str)
        if key not in self._by_spec:
            multiplier = resolve_multiplier(spec, evoapprox_root=self.evoapprox_root)
            multiplier.engine.configure(**self.lut_settings)  # the run's LUT route settings
            self._by_spec[key] = self._by_name.setdefault(multiplier.name, multiplier)
        return self._by_spec[key]

    def __call__(self, name: str) -> Multiplier:
        """The multiplier of that name: one resolved before in this run, else the catalogue's or a design."""
        if name not in self._by_name:
            self.from_spec({"name": name})
        return self._by_name[name]
