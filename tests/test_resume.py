"""Kill-and-resume: a run killed with SIGKILL and rerun into the same folder ends exactly as an
uninterrupted run (CPU, fixed seed), without rerunning its completed stages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from approxrun.cli import expand_arguments
from approxrun.pipeline import run
from approxrun.training import rng_state, set_rng_state

pytestmark = pytest.mark.slow

# A small run: synthetic data, three stages, several approx epochs (the window for a kill during
# approx), no stage cache (a cache hit would skip the work the test interrupts).
APPROX_EPOCHS = 6
TOTAL_EPOCHS = 2 + 1 + APPROX_EPOCHS
ARGS = ["dataset=synthetic", "seed=3", "device=cpu", "cache.enabled=false", "multiplier=truncated_6",
        "schedule=uniform",
        "model.train.baseline.epochs=2", "model.train.quant.epochs=1", f"model.train.approx.epochs={APPROX_EPOCHS}"]
POLL_S = 0.01


def _env() -> dict:
    """One torch thread: tiny models train fastest that way on a shared CPU."""
    env = {k: v for k, v in os.environ.items() if k != "EVOAPPROX_ROOT"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(["approxrun", *ARGS, f"hydra.run.dir={run_dir}"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _resume_point(run_dir: Path) -> dict | None:
    path = run_dir / "resume.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None  # replaced atomically: never partial


def _wait_for(process: subprocess.Popen, done, what: str) -> None:
    while not done():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-2000:]}"
        time.sleep(POLL_S)


def _results(run_dir: Path) -> dict:
    """Per stage: test accuracy and the train loss of every epoch."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics["error"]
    return {name: (stage["test_accuracy"], [epoch["train_loss"] for epoch in stage["history"]])
            for name, stage in metrics["stages"].items()}


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _rerun(run_dir: Path) -> dict:
    result = subprocess.run(["approxrun", *ARGS, f"hydra.run.dir={run_dir}"], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _epochs_done(point: dict | None) -> int:
    if point is None:
        return 0
    done = sum(entry["record"]["epochs"] for entry in point["completed"])
    return done + (point["in_progress"]["epoch"] if point["in_progress"] else 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's results."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    process = _start(run_dir)
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    return _results(run_dir)


def test_killed_at_a_random_moment_resumes_to_identical_metrics(tmp_path, reference):
    rng = random.Random()
    epochs, delay = rng.randint(1, TOTAL_EPOCHS - 2), rng.uniform(0.0, 0.05)
    run_dir = tmp_path / "run"
    process = _start(run_dir)
    _wait_for(process, lambda: _epochs_done(_resume_point(run_dir)) >= epochs, f"epoch {epochs} ended")
    time.sleep(delay)
    _kill(process)
    interrupted = _resume_point(run_dir)

    metrics = _rerun(run_dir)
    assert _results(run_dir) == reference, f"killed {delay:.3f} s after {epochs} epochs"
    assert metrics["resumed"]["completed_stages"] == [entry["name"] for entry in interrupted["completed"]]


def test_killed_during_the_approx_stage_resumes_without_rerunning_earlier_stages(tmp_path, reference):
    run_dir = tmp_path / "run"
    process = _start(run_dir)

    def approx_started() -> bool:
        point = _resume_point(run_dir)
        return point is not None and (point["in_progress"] or {}).get("name") == "approx"

    _wait_for(process, approx_started, "an approx epoch ended")
    time.sleep(random.Random().uniform(0.0, 0.05))
    _kill(process)
    interrupted = _resume_point(run_dir)
    assert [entry["name"] for entry in interrupted["completed"]] == ["baseline", "quant"]
    assert interrupted["in_progress"]["name"] == "approx" and interrupted["in_progress"]["epoch"] < APPROX_EPOCHS

    metrics = _rerun(run_dir)
    assert _results(run_dir) == reference
    assert metrics["resumed"] == {"completed_stages": ["baseline", "quant"], "stage": "approx",
                                  "epoch": interrupted["in_progress"]["epoch"]}
    log = (run_dir / "approxrun.log").read_text()
    resumed_part = log[log.rindex("resuming from"):]
    assert "stage baseline" not in resumed_part and "stage quant" not in resumed_part
    assert not list(run_dir.glob(".stage-*")), "temporary stage folders left behind"


def _config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module("approxrun.conf", version_base="1.3"):
        return compose("config", overrides=expand_arguments([*ARGS, "model.train.approx.epochs=1", *overrides]))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rerun_continues_only_with_resume_true_and_the_same_configuration(tmp_path, one_thread):
    first = run(_config(), tmp_path)
    assert "resumed" not in first
    again = run(_config(), tmp_path)  # a completed run: every stage comes from the resume point
    assert again["resumed"] == {"completed_stages": ["baseline", "quant", "approx"], "stage": None, "epoch": None}
    assert {k: v["test_accuracy"] for k, v in again["stages"].items()} == \
        {k: v["test_accuracy"] for k, v in first["stages"].items()}
    assert "resumed" not in run(_config("resume=false"), tmp_path)
    assert "resumed" not in run(_config("model.train.quant.epochs=2"), tmp_path)  # another configuration
    partial = run(_config("model.train.quant.epochs=2", "schedule.order=[baseline,quant,approx,eval]",
                          "+schedule.stages.eval={kind: eval}"), tmp_path)
    assert partial["resumed"]["completed_stages"] == ["baseline", "quant", "approx"]
    assert not partial["stages"]["approx"].get("cached") and partial["stages"]["eval"]["epochs"] == 0


def test_random_states_survive_a_weights_only_checkpoint(tmp_path):
    loader_generator = torch.Generator().manual_seed(5)

    def draws():
        return (random.random(), float(np.random.standard_normal()), torch.rand(3).tolist(),
                torch.randperm(10, generator=loader_generator).tolist())

    draws()  # leave every generator mid-stream (numpy with a cached gaussian)
    np.random.standard_normal()
    torch.save(rng_state(loader_generator), tmp_path / "rng.pt")
    expected = draws()
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), loader_generator)
    assert draws() == expected
