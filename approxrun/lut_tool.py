"""``approxrun-lut``: list, inspect, convert and plot multiplier LUTs.

A multiplier is given by name (a built-in design, a catalogue entry of ``conf/multiplier/``, an
EvoApproxLib circuit of the checkout in ``--root`` / ``EVOAPPROX_ROOT``) or by file (a LUT file or an
EvoApproxLib ``.c`` model). Bad input prints one line on stderr and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import textwrap
from pathlib import Path

import numpy as np

from approxrun.errors import ApproxrunError
from approxrun.lut import code_to_index
from approxrun.multipliers import DESIGN_EXAMPLES, FORMATS, Multiplier, get_multiplier, save_lut
from approxrun.multipliers import evoapprox
from approxrun.multipliers.catalogue import catalogue_entries
from approxrun.multipliers.designs import is_builtin
from approxrun.utils.files import atomic_write_bytes

PROG = "approxrun-lut"
USAGE_ERROR = 2
METRIC_ROWS = (("MAE", "mae"), ("MAE%", "mae_percent"), ("WCE", "wce"), ("WCE%", "wce_percent"),
               ("MRE%", "mre_percent"), ("EP%", "ep_percent"), ("MSE", "mse"),
               ("err.mean", "error_mean"), ("err.std", "error_std"))


def _multiplier(spec: str, args) -> Multiplier:
    """A name goes through its catalogue entry when there is one (published cost), as in a run."""
    return get_multiplier(spec, signed=not args.unsigned, evoapprox_root=args.root)


def _wrapped(names, indent: str = "  ") -> str:
    return textwrap.fill(" ".join(names), width=100, initial_indent=indent, subsequent_indent=indent)


def cmd_list(args) -> None:
    print("Built-in designs (numbers are parameters):")
    print(_wrapped(DESIGN_EXAMPLES))
    entries = catalogue_entries()
    print("Catalogue (conf/multiplier):")
    for name, entry in entries.items():
        if entry.get("bundled"):
            continue
        cost = entry.get("cost")
        if cost:
            figure = f"{cost['value']} {cost['unit']} ({cost['kind']}; {cost['source']})"
        else:
            figure = "the design's cost proxy" if is_builtin(name) else "no cost given"
        print(f"  {name:<16} {figure}")
    _list_bundled([entry for entry in entries.values() if entry.get("bundled")])
    try:
        root = evoapprox.checkout_root(args.root)
    except evoapprox.RootNotSetError:
        print(f"EvoApproxLib: no checkout (pass --root or set {evoapprox.ROOT_ENV})")
        return
    groups: dict[str, list[str]] = {}
    for name, paths in evoapprox.index_circuits(root).items():
        groups.setdefault(paths[0].parent.parent.name, []).append(name)
    print(f"EvoApproxLib circuits under {root}:" + ("" if groups else " none"))
    for group, names in sorted(groups.items()):
        print(f"  {group} ({len(names)}):")
        print(_wrapped(sorted(names), "    "))


def cmd_bundle(args) -> None:
    from approxrun.multipliers.bundled import build_bundle, package_bundle_dir

    out = Path(args.out) if args.out else package_bundle_dir()
    entries = build_bundle(args.root_dir, out)
    size = sum((out / e["file"]).stat().st_size for e in entries)
    kinds = ", ".join(f"{sum(e['name'].startswith(p) for e in entries)} {p}" for p in ("mul8s", "mul8u"))
    print(f"wrote {len(entries)} circuits ({kinds}; {size / 1e6:.2f} MB of tables) and catalogue.json to {out}")


BUNDLED_COLUMNS = (("PWR mW", "pdk45_pwr_mw"), ("AREA um2", "pdk45_area_um2"), ("DELAY ns", "pdk45_delay_ns"),
                   ("MAE", "mae"), ("WCE", "wce"), ("EP%", "ep_percent"), ("MRE%", "mre_percent"), ("MSE", "mse"))


def _list_bundled(entries: list[dict]) -> None:
    """The bundled EvoApproxLib circuits with their published figures (no checkout needed)."""
    print(f"EvoApproxLib circuits bundled with approxrun ({len(entries)}; published figures, PDK45):")
    print(f"  {'name':<12}" + "".join(f"{label:>12}" for label, _ in BUNDLED_COLUMNS))
    for entry in entries:
        published = entry["published"]
        print(f"  {entry['name']:<12}" + "".join(f"{_format_number(published.get(key)):>12}"
                                                   for _, key in BUNDLED_COLUMNS))


def _format_number(value) -> str:
    return "-" if value is None else f"{value:.6g}"


def cmd_show(args) -> None:
    m = _multiplier(args.multiplier, args)
    header = m.extra.get("header_metrics", {})
    published = m.extra.get("published", {})
    print(f"{m.name}: {m.description}")
    print(f"operands: A (activation) {m.domain_a}, B (weight) {m.domain_b}")
    print(f"symmetric: {'yes' if m.is_symmetric else 'no'}; exact: {'yes' if m.is_exact else 'no'}")
    columns = ["LUT"] + (["header"] if header else []) + (["published"] if published else [])
    print(f"  {'metric':<12}" + "".join(f"{c:>14}" for c in columns))
    metrics = m.metrics.as_dict()
    for label, key in METRIC_ROWS:
        row = [metrics[key]] + ([header.get(key)] if header else []) + ([published.get(key)] if published else [])
        print(f"  {label:<12}" + "".join(f"{_format_number(v):>14}" for v in row))
    if m.extra.get("header_mismatch"):
        print("header disagrees with the LUT: " + "; ".join(m.extra["header_mismatch"]))
    cost = m.cost
    if cost is None:
        print("cost: unknown")
    else:
        extras = [f"area {cost.area:g} um2" if cost.area is not None else "",
                  f"delay {cost.delay:g} ns" if cost.delay is not None else ""]
        print(f"cost: {cost.value:g} {cost.unit} ({cost.kind}), source: {cost.source}"
              + "".join(f", {e}" for e in extras if e))


def cmd_convert(args) -> None:
    m = _multiplier(args.multiplier, args)
    save_lut(m.lut, args.out, args.to, m.domain_a.signed, m.domain_b.signed)
    print(f"wrote {args.out} ({args.to or Path(args.out).suffix.lstrip('.')}; {m.name}, "
          f"A {m.domain_a}, B {m.domain_b})")


def error_plane(m: Multiplier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operand values of A and B (numerical order) and the error (LUT - exact) over their plane."""
    va, vb = m.domain_a.values(), m.domain_b.values()
    return va, vb, m.error_table[np.ix_(code_to_index(va), code_to_index(vb))]


def cmd_plot(args) -> None:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    m = _multiplier(args.multiplier, args)
    out = Path(args.out or f"{m.name}_error.png")
    va, vb, err = error_plane(m)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    heat, hist = fig.subplots(1, 2, width_ratios=[1.2, 1])
    bound = max(float(np.abs(err).max()), 1.0)
    image = heat.imshow(err, origin="lower", aspect="auto", cmap="RdBu_r", interpolation="nearest",
                        norm=TwoSlopeNorm(0.0, -bound, bound),
                        extent=(vb[0] - 0.5, vb[-1] + 0.5, va[0] - 0.5, va[-1] + 0.5))
    heat.set_xlabel(f"B (weight, {m.domain_b})")
    heat.set_ylabel(f"A (activation, {m.domain_a})")
    heat.set_title(f"{m.name}: LUT - exact product")
    fig.colorbar(image, ax=heat, label="error")
    values, counts = np.unique(err, return_counts=True)
    if values.size <= 64:
        hist.bar(values, counts / err.size, width=0.8 * (np.diff(values).min() if values.size > 1 else 1.0))
    else:
        hist.hist(err.ravel(), bins=64, weights=np.full(err.size, 1.0 / err.size))
    hist.set_xlabel("error")
    hist.set_ylabel("share of operand pairs")
    hist.set_title(f"MAE {m.metrics.mae:.4g}, WCE {m.metrics.wce:.4g}, EP {m.metrics.ep_percent:.4g} %")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out}")


def cmd_calibrate(args) -> None:
    """The LUT routes' measured costs on this machine (cached per machine key; --refresh re-measures)."""
    from approxrun.ops.lowrank.calibration import GEMM_WIDTHS, calibration_dir  # imports torch
    from approxrun.ops.lowrank.measurement import load_or_measure

    cal = load_or_measure(refresh=args.refresh)
    cpu = cal.machine["cpu"]
    print(f"machine: {cpu['model']}; flags: {' '.join(cpu['flags']) or '-'}; torch {cal.machine['torch']} "
          f"({cal.machine['capability']}), {cal.machine['threads']} threads; ISA env: {cal.machine['isa_env'] or '-'}")
    print(f"cache: {calibration_dir()}" + ("; measured on a busy machine (measured again once it is quiet)"
                                           if cal.measured_busy else ""))
    print(f"gather (torch ops): {cal.gather_lookup * 1e9:.3g} ns/lookup, {cal.gather_row * 1e9:.3g} ns/row, "
          f"{cal.gather_table * 1e9:.3g} ns/table entry; direct {cal.direct_lookup * 1e9:.3g} ns/lookup")
    print(f"gather (compiled kernel): {cal.native_lookup * 1e9:.3g} ns/lookup direct, "
          f"tables {cal.native_table_entry * 1e9:.3g} ns/entry + {cal.native_row_add * 1e9:.3g} ns/8-lane row add, "
          f"{cal.native_table_bytes // 1024 or '-'} KiB per tile of k")
    if math.isfinite(cal.native_permute_group):
        print(f"in-register permutes (AVX-512 VBMI): {cal.native_permute_group * 1e9:.3g} ns/64-lane lookup, "
              f"{cal.native_permute_code * 1e9:.3g} ns/code transposed")
    else:
        print("in-register permutes: not built here (needs AVX-512 VBMI)")
    if math.isfinite(cal.native_map_mac):
        print(f"compiled float32 low rank ({cal.native_map_lanes} lanes): {cal.native_map_entry * 1e9:.3g} ns/map read, "
              f"{1e-9 / cal.native_map_mac:.3g} GMAC/s")
    if math.isfinite(cal.native_pair_mac):
        print(f"compiled int16 low rank (map pairs): {cal.native_pair_entry * 1e9:.3g} ns/pair read, "
              f"{2e-9 / cal.native_pair_mac:.3g} GMAC/s")
    for dtype, rates in cal.gemm.items():
        print(f"{dtype} GEMM: " + ", ".join(f"N={n}: {1e-9 / r:.3g} GMAC/s" for n, r in zip(GEMM_WIDTHS, rates)))
    print(f"maps: {cal.map_entry * 1e9:.3g} ns/float entry, {cal.word_index * 1e9:.3g} ns/int8 word, "
          f"{cal.pair_index * 1e9:.3g} ns/byte pair; int8 call {cal.int8_call * 1e6:.3g} us; "
          f"int8 GEMM exact: {cal.int8_exact}")
    print(f"convolution windows unfolded: {cal.unfold_entry * 1e9:.3g} ns/element")
    print("fixed cost per call: " + (", ".join(f"{route} {seconds * 1e6:.3g} us" for route, seconds
                                               in cal.call_overhead.items()) or "-"))


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one-line errors like any other bad input."""

    def error(self, message):
        raise ApproxrunError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    common = _Parser(add_help=False)
    common.add_argument("--root", default=None,
                        help=f"EvoApproxLib checkout (default: ${evoapprox.ROOT_ENV})")
    target = _Parser(add_help=False, parents=[common])
    target.add_argument("multiplier", metavar="NAME|FILE",
                        help="built-in design, catalogue entry, EvoApproxLib circuit, LUT file or .c model")
    target.add_argument("--unsigned", action="store_true",
                        help="unsigned operands (built-in designs and LUT files; EvoApproxLib names say it)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", parents=[common], help="built-in designs, catalogue, EvoApproxLib circuits")
    commands.add_parser("show", parents=[target], help="domains, symmetry, error metrics, cost")
    convert = commands.add_parser("convert", parents=[target], help="write the LUT as npy, txt or bin")
    convert.add_argument("out", metavar="OUT")
    convert.add_argument("--to", choices=FORMATS, default=None,
                         help="npy: byte-indexed; txt: numerical order; bin: TFApprox uint16 (default: from OUT)")
    plot = commands.add_parser("plot", parents=[target], help="PNG: error heatmap and error histogram")
    plot.add_argument("--out", default=None, help="PNG file (default: NAME_error.png)")
    bundle = commands.add_parser("bundle", help="generate the bundled 8x8 EvoApproxLib tables from a checkout")
    bundle.add_argument("root_dir", metavar="ROOT",
                        help="EvoApproxLib checkout (git clone https://github.com/ehw-fit/evoapproxlib)")
    bundle.add_argument("--out", default=None, help="bundle folder (default: approxrun's package data)")
    calibrate = commands.add_parser("calibrate", help="measured costs of the LUT GEMM routes on this machine")
    calibrate.add_argument("--refresh", action="store_true", help="measure again, replacing the cached figures")
    return parser


COMMANDS = {"list": cmd_list, "show": cmd_show, "convert": cmd_convert, "plot": cmd_plot, "bundle": cmd_bundle,
            "calibrate": cmd_calibrate}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except ApproxrunError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
