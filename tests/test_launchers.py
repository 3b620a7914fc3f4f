"""Sweeps through Hydra's joblib and submitit launchers (the ``launchers`` extra): every job runs in
another process, the summary is built in the launching process from the job folders, and a failing
job is listed as failed while the others complete, with a non-zero exit at the end."""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from approxrun.lut import exact_lut
from approxrun.multipliers.io import save_lut

pytestmark = pytest.mark.slow
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs the launchers extra")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the launchers extra")

TINY = ["dataset=synthetic", "device=cpu", "cache.enabled=false", "schedule.order=[baseline]",
        "model.train.baseline.epochs=1"]
# the process id in every log line, to tell where each job ran
PID_LOG_FORMAT = "hydra.job_logging.formatters.simple.format='pid=%(process)d %(message)s'"


def _sweep(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, str, Path]:
    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("EVOAPPROX_ROOT", None)
    process = subprocess.Popen(["approxrun", "-m", *TINY, *args, PID_LOG_FORMAT, f"hydra.sweep.dir={sweep_dir}"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=300)
    return process, stdout, stderr, sweep_dir


def _summary(sweep_dir: Path) -> dict[str, dict]:
    with open(sweep_dir / "summary.csv") as f:
        return {row["overrides"]: row for row in csv.DictReader(f)}


def _job_pids(sweep_dir: Path) -> set[int]:
    pids = set()
    for log in sweep_dir.glob("*/approxrun.log"):
        pids |= {int(pid) for pid in re.findall(r"^pid=(\d+) ", log.read_text(), re.M)}
    return pids


def test_joblib_sweep_isolates_failing_jobs_and_summarises_all(tmp_path):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    save_lut(exact_lut(True, True), good)
    np.save(bad, np.zeros((16, 16), dtype=np.int32))
    process, stdout, stderr, sweep_dir = _sweep(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "multiplier=file",
        f"multiplier.path={good},{bad}", "model.train.baseline.optimizer.lr=0.01,1e12")

    assert process.returncode == 1, stderr[-3000:]
    rows = _summary(sweep_dir)
    assert len(rows) == 4 == len(list(sweep_dir.glob("*/metrics.json")))
    status = {(Path(re.search(r"multiplier.path=(\S+)", k).group(1)).name,
               float(re.search(r"lr=(\S+)", k).group(1))): row for k, row in rows.items()}
    assert status["good.npy", 0.01]["status"] == "completed"
    assert 0.0 <= float(status["good.npy", 0.01]["acc_baseline"]) <= 1.0
    assert status["good.npy", 1e12]["status"] == "failed"
    assert "loss became nan" in status["good.npy", 1e12]["error"]
    for lr in (0.01, 1e12):
        assert status["bad.npy", lr]["status"] == "failed"
        assert f"LUT file {bad}: shape (16, 16)" in status["bad.npy", lr]["error"]
    assert "4 jobs, 1 completed, failed:" in (sweep_dir / "summary.md").read_text()
    assert f"sweep summary: {sweep_dir / 'summary.md'}" in stdout
    assert stderr.count("approxrun: error:") == 3
    assert _job_pids(sweep_dir) and process.pid not in _job_pids(sweep_dir)  # jobs ran in worker processes


def test_submitit_local_sweep_builds_a_complete_summary(tmp_path):
    process, stdout, stderr, sweep_dir = _sweep(tmp_path, "hydra/launcher=submitit_local", "seed=1,2")

    assert process.returncode == 0, stderr[-3000:]
    rows = _summary(sweep_dir)
    assert sorted(overrides.split()[-1] for overrides in rows) == ["seed=1", "seed=2"]
    assert {row["status"] for row in rows.values()} == {"completed"}
    assert all(0.0 <= float(row["acc_baseline"]) <= 1.0 for row in rows.values())
    assert "2 jobs, 2 completed" in (sweep_dir / "summary.md").read_text()
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2  # submitit's own job records
    assert _job_pids(sweep_dir) and process.pid not in _job_pids(sweep_dir)


def test_slurm_launcher_config_extends_submitit_slurm_with_one_gpu_per_job():
    GlobalHydra.instance().clear()
    with initialize_config_module("approxrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.max_num_timeout > 0 and launcher.array_parallelism > 0 and launcher.timeout_min > 0
