"""Sweep summaries built from the job folders (``approxrun-report SWEEP_DIR`` rebuilds one).

Each job folder holds ``metrics.json`` (written by the job itself, also when it failed) and Hydra's
``.hydra/overrides.yaml``; the summary is ``summary.csv``, ``summary.md`` and ``summary.png``
(accuracy against relative energy, one point per job).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path

from approxrun.utils.files import atomic_write_text
from approxrun.utils.plots import plt, save_figure


def _overrides(job: Path) -> str:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    items = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return " ".join(items)


def collect(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    """(stage names in order of first appearance, one row per job folder with a metrics.json)."""
    stage_names: list[str] = []
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: _job_order(p.parent.name)):
        job = metrics_file.parent
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            metrics = {"status": "failed", "error": f"unreadable metrics.json ({exc})", "stages": {}}
        row = {"job": job.name, "overrides": _overrides(job), "status": metrics.get("status", "unknown"),
               "error": metrics.get("error") or "", "relative_energy": metrics.get("relative_energy"),
               "multiplier": multipliers_used(metrics)}
        for name, stage in (metrics.get("stages") or {}).items():
            if name not in stage_names:
                stage_names.append(name)
            row[f"acc_{name}"] = stage.get("test_accuracy")
        stages = list((metrics.get("stages") or {}).values())
        row["final_accuracy"] = stages[-1].get("test_accuracy") if stages else None
        rows.append(row)
    return stage_names, rows


def multipliers_used(metrics: dict) -> str:
    """The multipliers of a job's last stage that assigned them per layer: one name, or e.g.
    ``drum_4 x2 + exact`` for a heterogeneous assignment; otherwise the run's multiplier."""
    for stage in reversed(list((metrics.get("stages") or {}).values())):
        if stage.get("multipliers"):
            counts = Counter(stage["multipliers"].values())
            if len(counts) == 1:
                return next(iter(counts))
            return " + ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())
    return (metrics.get("multiplier") or {}).get("name", "")


def _job_order(name: str):
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (10**9, name)


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(sweep_dir: str | Path) -> list[dict]:
    """Write summary.csv/.md/.png for the job folders in ``sweep_dir``; returns the rows."""
    sweep_dir = Path(sweep_dir)
    stage_names, rows = collect(sweep_dir)
    columns = ["job", "overrides", "status"] + [f"acc_{s}" for s in stage_names] + \
        ["relative_energy", "multiplier", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in columns])
    atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    failed = [r["job"] for r in rows if r["status"] != "completed"]
    md.append("")
    md.append(f"{len(rows)} jobs, {len(rows) - len(failed)} completed" +
              (f", failed: {', '.join(failed)}" if failed else ""))
    atomic_write_text(sweep_dir / "summary.md", "\n".join(md) + "\n")
    _plot(rows, sweep_dir / "summary.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [r for r in rows if r["status"] == "completed" and r.get("final_accuracy") is not None]
    for r in points:
        x = r["relative_energy"] if r["relative_energy"] is not None else float("nan")
        ax.scatter([x], [r["final_accuracy"]], s=40)
        ax.annotate(r["overrides"] or r["job"], (x, r["final_accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="relative energy (cost vs exact multiplier)", ylabel="test accuracy (last stage)",
           title=f"sweep: {len(points)} completed of {len(rows)} jobs")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="approxrun-report", description="Rebuild a sweep summary.")
    parser.add_argument("sweep_dir", help="a multirun folder holding one folder per job")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir)
    if not sweep.is_dir():
        print(f"approxrun-report: error: {sweep} is not a folder", file=sys.stderr)
        return 2
    rows = write_summary(sweep)
    if not rows:
        print(f"approxrun-report: error: no job folders with metrics.json in {sweep}", file=sys.stderr)
        return 2
    print((sweep / "summary.md").read_text(), end="")
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
