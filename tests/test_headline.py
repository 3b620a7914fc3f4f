"""The commands users meet first, run as typed with the installed script, default settings, offline
and with no EvoApproxLib checkout (the bundled circuits serve them)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_installed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EVOAPPROX_ROOT", "APPROXRUN_STAGE_CACHE")}
    env["APPROXRUN_CACHE"] = str(cwd / "lut-cache")
    return subprocess.run(["approxrun", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def run_folder(cwd: Path) -> Path:
    folders = [p.parent for p in (cwd / "outputs").glob("*/*/metrics.json")]
    assert len(folders) == 1, folders
    return folders[0]


def test_headline_command_runs_as_typed(tmp_path):
    result = run_installed("stage=gradient", "multiplier=mul8s_1L2D", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = run_folder(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "completed" and list(metrics["stages"]) == ["baseline", "quant", "gradient"]
    assert metrics["multiplier"]["name"] == "mul8s_1L2D" and metrics["multiplier"]["cost"]["kind"] == "power"
    with open(folder / "sigma.csv") as f:
        sigma = list(csv.DictReader(f))
    with open(folder / "multiplier_fit.csv") as f:
        fit = list(csv.DictReader(f))
    assert [row["layer"] for row in fit] == [row["layer"] for row in sigma] and len(fit) == 5
    assert {row["multiplier"] for row in fit} == {"mul8s_1L2D"} and {row["fits"] for row in fit} <= {"yes", "no"}
    table = result.stdout.splitlines()
    gradient_row = next(line for line in table if line.startswith("gradient"))
    assert gradient_row.split()[-1] == "-"  # no multiplier ran in the gradient stage: no relative energy


@pytest.mark.parametrize("args, exact_power", [(("multiplier=mul8s_1L2D",), 0.425),
                                               (("library=evoapprox_mul8u",), None)])
def test_named_circuit_and_unsigned_library_give_published_relative_energy(tmp_path, args, exact_power):
    result = run_installed(*args, "experiment=smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_folder(tmp_path) / "metrics.json").read_text())
    approx = metrics["stages"]["approx"]
    multipliers = set(approx["multipliers"].values())
    if exact_power is not None:
        assert multipliers == {"mul8s_1L2D"}
        assert approx["relative_energy"] == pytest.approx(0.200 / exact_power)
    else:
        assert all(name.startswith("mul8u_") for name in multipliers)
        from approxrun.multipliers.bundled import Bundle
        catalogue = Bundle.packaged().catalogue()
        reference = catalogue["mul8u_1JFF"]["published"]["pdk45_pwr_mw"]
        shares = {row["name"]: float(row["opcount_share"])
                  for row in csv.DictReader(open(run_folder(tmp_path) / "layers.csv"))}
        expected = sum(shares[layer] * catalogue[name]["published"]["pdk45_pwr_mw"] / reference
                       for layer, name in approx["multipliers"].items())
        assert approx["relative_energy"] == pytest.approx(expected, rel=1e-4)
    assert "multipliers (approx, relative cost):" in result.stdout
