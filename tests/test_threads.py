"""The ``threads`` setting: how many threads a job may use, and a local sweep sharing the cores."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from approxrun.cli import concurrent_jobs, sweep_jobs
from approxrun.errors import ApproxrunError
from approxrun.threads import ThreadBudget, available_cpus, thread_budget, torch_threads


@pytest.mark.parametrize("setting, jobs, env, cpus, expected", [
    (3, 4, {"OMP_NUM_THREADS": "2"}, 8, (3, "threads setting")),
    ("auto", 4, {"OMP_NUM_THREADS": "2"}, 8, (2, "OMP_NUM_THREADS")),
    ("auto", 1, {}, 8, (8, "8 CPUs in the affinity mask")),
    ("auto", 3, {}, 8, (2, "8 CPUs in the affinity mask shared by 3 concurrent jobs")),
    ("auto", 16, {}, 8, (1, "8 CPUs in the affinity mask shared by 16 concurrent jobs")),
    ("auto", 1, {"SLURM_CPUS_PER_TASK": "4"}, 64, (4, "SLURM_CPUS_PER_TASK=4")),
    ("auto", 2, {"SLURM_CPUS_PER_TASK": "4"}, 64, (2, "SLURM_CPUS_PER_TASK=4 shared by 2 concurrent jobs")),
    ("auto", 1, {"SLURM_CPUS_PER_TASK": "128"}, 8, (8, "8 CPUs in the affinity mask")),
])
def test_thread_budget(setting, jobs, env, cpus, expected):
    assert thread_budget(setting, jobs, env=env, cpus=cpus) == ThreadBudget(*expected)


@pytest.mark.parametrize("setting", [0, -2, "many", 1.5, True])
def test_bad_thread_settings(setting):
    with pytest.raises(ApproxrunError, match="threads="):
        thread_budget(setting, env={})


def test_torch_threads_restores_the_pool():
    before = torch.get_num_threads()
    with torch_threads(ThreadBudget(1, "test")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert available_cpus() >= 1


def test_concurrent_jobs_of_local_launchers():
    joblib = OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                               "n_jobs": 2})
    local = OmegaConf.create({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"})
    slurm = OmegaConf.create({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"})
    basic = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    env = {"APPROXRUN_SWEEP_JOBS": "4"}
    assert concurrent_jobs(joblib, env) == 2 and concurrent_jobs(local, env) == 4
    assert concurrent_jobs(slurm, env) == 1 and concurrent_jobs(basic, env) == 1
    assert concurrent_jobs(joblib, {"APPROXRUN_SWEEP_JOBS": "1"}) == 1


def test_sweep_jobs_counts_choices():
    assert sweep_jobs(["multiplier=exact,drum_6,drum_4", "seed=0,1", "device=cpu"]) == 6
    assert sweep_jobs(["seed=range(4)"]) is None


@pytest.mark.slow
def test_submitit_local_sweep_shares_the_cores(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the launchers extra")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "EVOAPPROX_ROOT")}
    sweep = tmp_path / "sweep"
    result = subprocess.run(["approxrun", "-m", "hydra/launcher=submitit_local", "dataset=synthetic", "device=cpu",
                             "cache.enabled=false", "schedule.order=[baseline]", "model.train.baseline.epochs=1",
                             "seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = [json.loads(p.read_text())["threads"] for p in sorted(sweep.glob("*/metrics.json"))]
    expected = {"count": max(1, available_cpus() // 2),
                "source": f"{available_cpus()} CPUs in the affinity mask shared by 2 concurrent jobs"}
    assert threads == [expected, expected]
    assert "torch threads: " in next(sweep.glob("*/approxrun.log")).read_text()
