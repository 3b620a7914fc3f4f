"""What a run reports besides its stages' own files: the multiplier's description in
``metrics.json``, the layer table ``layers.csv``, and the summary table printed at the end."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from approxrun.energy import relative_cost
from approxrun.layers import approx_layers
from approxrun.multipliers.multiplier import Multiplier
from approxrun.utils.files import atomic_write_text


def describe_multiplier(multiplier: Multiplier, exact_power: float) -> dict:
    cost = multiplier.cost
    return {"name": multiplier.name, "domain_a": str(multiplier.domain_a), "domain_b": str(multiplier.domain_b),
            "cost": None if cost is None else {"value": cost.value, "kind": cost.kind, "unit": cost.unit,
                                               "source": cost.source},
            "relative_cost": relative_cost(multiplier, exact_power), "metrics": multiplier.metrics.as_dict()}


def write_layers(path: Path, model, opcounts: dict, shares: dict) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "type", "weight_shape", "opcount", "opcount_share", "fan_in", "multiplier", "sigma"])
    for name, layer in approx_layers(model):
        writer.writerow([name, type(layer).__name__, "x".join(map(str, layer.weight.shape)), opcounts[name],
                         f"{shares.get(name, 0):.6f}", layer.fan_in, layer.multiplier.name,
                         f"{layer.sigma.item():.6f}"])
    atomic_write_text(path, buf.getvalue())


def print_summary(stages: list[dict], metrics: dict, out_dir: Path) -> None:
    """The stages' table (a stage not trained because of ``model.weights`` says so) and the run folder."""
    rows = [("stage", "test acc", "time s", "cached", "rel. energy")]
    for stage in stages:
        r = metrics["stages"][stage["name"]]
        energy = r.get("relative_energy")
        rows.append((stage["name"], f"{r['test_accuracy']:.4f}", f"{r['wall_time_s']:.1f}",
                     "skipped" if r.get("skipped") else "yes" if r["cached"] else "no",
                     "-" if energy is None else f"{energy:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [f"{stage['name']}: not trained, the test accuracy of {metrics['stages'][stage['name']]['skipped']}"
              for stage in stages if metrics["stages"][stage["name"]].get("skipped")]
    last = metrics["stages"][stages[-1]["name"]]
    if last.get("multipliers"):  # the multipliers the final stage ran with, and their relative cost
        costs = last.get("relative_costs") or {}
        lines.append(f"multipliers ({stages[-1]['name']}, relative cost): " + ", ".join(
            f"{layer} {name}" + ("" if costs.get(name) is None else f" {costs[name]:.3f}")
            for layer, name in last["multipliers"].items()))
    print("\n".join(lines) + f"\noutputs: {out_dir}", flush=True)
