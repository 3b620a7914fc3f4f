"""The installed ``approxrun`` command end to end (subprocesses, temporary folders)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from approxrun.cli import GROUPS, group_options
from approxrun.config import stage_configs, to_container

pytestmark = pytest.mark.slow


def approxrun(*args, cwd: Path, env_extra=None, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "approxrun"] if module else ["approxrun"]
    env = {k: v for k, v in os.environ.items() if k != "EVOAPPROX_ROOT"}
    env.update(env_extra or {})
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage_cache")


def test_every_config_group_option_composes():
    for group in GROUPS:
        for option in group_options(group):
            overrides = [f"{group}={option}"]
            if group == "multiplier" and option == "file":
                overrides.append("multiplier.path=lut.npy")
            if option == "custom":  # a user's own factory (examples/tiny_nets.py)
                overrides.append(f"{group}._target_=examples.tiny_nets."
                                 + ("small_cnn" if group == "model" else "stripes"))
            GlobalHydra.instance().clear()
            with initialize_config_module("approxrun.conf", version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            assert cfg.model.name and cfg.schedule.order, (group, option)
            if group in ("schedule", "experiment", "model"):  # every stage entry holds only known settings
                assert stage_configs(to_container(cfg)), (group, option)
    GlobalHydra.instance().clear()


def test_info_shows_packaged_config_path(tmp_path):
    result = approxrun("--info", "searchpath", cwd=tmp_path)
    assert result.returncode == 0
    assert "pkg://approxrun.conf" in result.stdout


def test_help_lists_config_groups(tmp_path):
    result = approxrun("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("model:", "dataset:", "multiplier:", "schedule:", "experiment:"):
        assert group in result.stdout


def test_default_run_with_smoke_preset(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = approxrun("experiment=smoke", f"hydra.run.dir={run_dir}", f"cache.dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # the default flow is the method's: a per-layer choice from the built-in library
    assert list(metrics["stages"]) == ["baseline", "quant", "gradient", "select", "approx"]
    for name, stage in metrics["stages"].items():
        assert 0.0 <= stage["test_accuracy"] <= 1.0
        assert stage["cached"] is False
        assert (run_dir / "checkpoints" / f"{name}.pt").is_file()
        if name != "select":  # the one stage that does not train
            assert (run_dir / f"curves_{name}.png").stat().st_size > 1000
    stages = metrics["stages"]
    assert "relative_energy" not in stages["gradient"] and "relative_energy" not in stages["quant"]
    assert 0 < stages["approx"]["relative_energy"] <= 1.0
    assert stages["approx"]["relative_energy"] == pytest.approx(stages["select"]["relative_energy"])
    gradient_row = next(line for line in result.stdout.splitlines() if line.startswith("gradient"))
    assert gradient_row.split()[-1] == "-"
    assert "multipliers (approx, relative cost): features.0 " in result.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / "approxrun.log").stat().st_size > 0
    with open(run_dir / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
    assert int(rows[0]["opcount"]) == 6 * 25 * 24 * 24 and int(rows[0]["fan_in"]) == 25
    assert "outputs:" in result.stdout


def test_approx_stage_with_builtin_multiplier_reuses_cache(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = approxrun("experiment=smoke", "stage=approx", "multiplier=drum_4", f"hydra.run.dir={run_dir}",
                       f"cache.dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics["stages"]
    assert stages["approx"]["multipliers"]["features.0"] == "drum_4"
    assert stages["approx"]["relative_energy"] == pytest.approx(16 / 64)  # drum_4's proxy
    # baseline and quant do not depend on the multiplier: the smoke run above computed them
    assert stages["baseline"]["cached"] and stages["quant"]["cached"] and not stages["approx"]["cached"]
    # the same run from a cold start: every stage computed, the approx stage exactly as above
    cold_dir = tmp_path / "cold"
    result = approxrun("experiment=smoke", "stage=approx", "multiplier=drum_4", "cache.enabled=false",
                       f"hydra.run.dir={cold_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    cold = json.loads((cold_dir / "metrics.json").read_text())["stages"]
    for stage in ("baseline", "quant", "approx"):
        assert not cold[stage]["cached"]
        assert (cold[stage]["test_accuracy"], cold[stage]["test_loss"]) == \
            (stages[stage]["test_accuracy"], stages[stage]["test_loss"])


def test_lut_strategies_train_identically(tmp_path, cache_dir):
    """Every LUT GEMM strategy is exact: approximate retraining through the gather and through
    low-rank GEMMs gives the same metrics, to the last bit."""
    results = {}
    for strategy in ("gather", "lowrank"):
        run_dir = tmp_path / strategy
        result = approxrun("experiment=smoke", "schedule=uniform", "multiplier=drum_4", f"lut.strategy={strategy}",
                           "cache.enabled=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        approx = json.loads((run_dir / "metrics.json").read_text())["stages"]["approx"]
        history = [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in approx["history"]]
        results[strategy] = (approx["test_accuracy"], approx["test_loss"], history)
    assert results["gather"] == results["lowrank"]


def test_sweep_writes_summary_and_reuses_cache(tmp_path, cache_dir):
    args = ["-m", "dataset=synthetic", "schedule=uniform", "model.train.baseline.epochs=1",
            "multiplier=exact,truncated_8",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache.dir={cache_dir}"]
    first = approxrun(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    sweep = tmp_path / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert any("multiplier=exact" in j for j in jobs) and any("multiplier=truncated_8" in j for j in jobs)
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "2 jobs, 2 completed" in (sweep / "summary.md").read_text()

    args[4] = f"hydra.sweep.dir={tmp_path / 'again'}"
    second = approxrun(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    for metrics_file in (tmp_path / "again").glob("*/metrics.json"):
        stages = json.loads(metrics_file.read_text())["stages"]
        assert all(stage["cached"] for stage in stages.values())

    report = subprocess.run(["approxrun-report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0 and "multiplier=truncated_8" in report.stdout


def test_python_module_entry_point(tmp_path, cache_dir):
    result = approxrun("dataset=synthetic", "schedule.order=[baseline]", "model.train.baseline.epochs=1",
                       f"hydra.run.dir={tmp_path / 'run'}", f"cache.dir={cache_dir}", cwd=tmp_path, module=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("approxrun: error:")
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["foo=bar"], "foo"),
    (["model=nonexistent"], "model=nonexistent"),
    (["multiplier=not_a_design"], "not_a_design"),
    (["dataset=mnist", "dataset.download=false"], "dataset mnist"),
    (["experiment=smoke", "model.train.quant.epochs=-1"], "epochs=-1"),
    (["quant.bits_a=9"], "quant.bits_a=9"),
    (["multiplier=file", "multiplier.path=missing.npy"], "missing.npy"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    result = approxrun(*args, f"hydra.run.dir={run_dir}", f"data_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert expected in _one_line_error(result)
    assert not (run_dir / "checkpoints").exists()
    if (run_dir / "metrics.json").exists():
        assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
