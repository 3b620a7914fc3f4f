"""Sweep summaries from job folders: columns, the multipliers of heterogeneous jobs, failed jobs."""

import csv
import json

from approxrun.report import multipliers_used, write_summary


def _job(folder, metrics, overrides=()):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_heterogeneous_jobs_list_their_assignment(tmp_path):
    uniform = {"status": "completed", "multiplier": {"name": "drum_6"}, "relative_energy": 0.56,
               "stages": {"quant": {"test_accuracy": 0.9},
                          "approx": {"test_accuracy": 0.89, "multipliers": {"c1": "drum_6", "c2": "drum_6"}}}}
    mixed = {"status": "completed", "multiplier": {"name": "exact"}, "relative_energy": 0.3,
             "stages": {"quant": {"test_accuracy": 0.9},
                        "select": {"multipliers": {"c1": "drum_4", "c2": "drum_4", "f1": "drum_6", "f2": "exact"}},
                        "retrain": {"test_accuracy": 0.899}}}
    failed = {"status": "failed", "error": "lut.strategy='x': expected one of auto, gather, lowrank",
              "multiplier": {"name": "exact"}, "stages": {}}
    _job(tmp_path / "0_multiplier=drum_6", uniform, ["multiplier=drum_6"])
    _job(tmp_path / "1_schedule=agn", mixed, ["schedule=agn"])
    _job(tmp_path / "2_lut.strategy=x", failed, ["lut.strategy=x"])
    assert multipliers_used(uniform) == "drum_6"
    assert multipliers_used(mixed) == "drum_4 x2 + drum_6 + exact"
    assert multipliers_used(failed) == "exact"

    rows = write_summary(tmp_path)
    assert [r["final_accuracy"] for r in rows] == [0.89, 0.899, None]
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["multiplier"] for r in table] == ["drum_6", "drum_4 x2 + drum_6 + exact", "exact"]
    assert table[2]["status"] == "failed" and "lut.strategy" in table[2]["error"]
    assert "3 jobs, 2 completed, failed: 2_lut.strategy=x" in (tmp_path / "summary.md").read_text()
