"""The gradient and select stages (approxrun.stages.agn) on a toy problem, and the agn schedule end to end."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from approxrun.data import build_data
from approxrun.energy import relative_cost
from approxrun.errors import ApproxrunError
from approxrun.layers import approx_layers, approximate, count_ops
from approxrun.multipliers import MultiplierResolver
from approxrun.stages import StageContext, stage_kind
from approxrun.stages.agn import noise_reward

LIBRARY = ["exact", "truncated_6", "truncated_8", "drum_4", "drum_6", "perforated_0_2"]


def _context(tmp_path: Path, multiplier: str = "exact", seed: int = 0) -> StageContext:
    """A two-layer MLP on synthetic 8x8 images after one epoch of quantization-aware training."""
    torch.manual_seed(seed)
    data = build_data({"name": "synthetic", "num_classes": 4, "channels": 1, "image_size": 8, "train_size": 256,
                       "val_size": 64, "test_size": 64, "split_seed": 0}, tmp_path)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
    resolver = MultiplierResolver(None)
    approximate(model, multiplier=resolver(multiplier))
    count_ops(model, data.train[0][0].unsqueeze(0))
    config = {"seed": seed, "dataset": {"eval_batch_size": 64}}
    ctx = StageContext(model, data, data.loaders(32, 64, seed), torch.device("cpu"), resolver(multiplier), config,
                       tmp_path, resolver)
    _run(ctx, "quant", epochs=1, optimizer={"lr": 0.01})
    return ctx


def _run(ctx: StageContext, kind: str, **cfg):
    result = stage_kind(kind).run(ctx, {"name": kind, "kind": kind, **cfg})
    ctx.state.update(result.state)
    return result


def _gradient(ctx: StageContext, lmbd: float, **extra):
    return _run(ctx, "gradient", epochs=2, optimizer={"lr": 0.02}, lmbd=lmbd, sigma_max=0.5, initial_noise=0.05,
                sample_size=64, rows=128, **extra)


def test_noise_reward_saturates_at_sigma_max():
    sigmas = {"a": torch.tensor(0.7, requires_grad=True), "b": torch.tensor(-0.3, requires_grad=True)}
    shares = {"a": 0.75, "b": 0.25}
    reward = noise_reward(sigmas, shares, sigma_max=0.5)
    reward.backward()
    assert reward.item() == pytest.approx(0.75 * 0.5 + 0.25 * 0.3)
    assert sigmas["a"].grad.item() == 0.0  # saturated: no pull beyond sigma_max
    assert sigmas["b"].grad.item() == pytest.approx(-0.25)  # |sigma| grows in either direction
    above = noise_reward({"a": torch.tensor(3.0), "b": torch.tensor(-0.3)}, shares, sigma_max=0.5)
    assert above.item() == pytest.approx(reward.item())


def test_larger_lambda_gives_larger_sigma(tmp_path):
    start = _context(tmp_path)
    learned = {}
    for lmbd in (0.0, 1.0):
        ctx = copy.deepcopy(start)
        ctx.artifact_dir = tmp_path / f"lmbd{lmbd}"
        ctx.artifact_dir.mkdir()
        result = _gradient(ctx, lmbd)
        learned[lmbd] = result.metrics["sigma"]
        assert len(result.metrics["sigma_history"]) == 2
        assert result.state["sigma"] == learned[lmbd]
        assert (ctx.artifact_dir / "sigma.png").stat().st_size > 1000
        with open(ctx.artifact_dir / "sigma.csv") as f:
            assert [r["layer"] for r in csv.DictReader(f)] == ["1", "3"]
    for layer in learned[0.0]:
        assert abs(learned[1.0][layer]) > abs(learned[0.0][layer]) + 0.05, learned


def test_gradient_reports_whether_the_multiplier_fits(tmp_path):
    ctx = _context(tmp_path, multiplier="drum_4")
    metrics = _gradient(ctx, 0.2).metrics
    fit = metrics["multiplier_fit"]
    assert fit["multiplier"] == "drum_4"
    for layer in ("1", "3"):
        entry = fit["layers"][layer]
        assert entry["predicted_std"] > 0 and entry["tolerated_std"] > 0
        assert entry["fits"] == (entry["predicted_std"] <= entry["tolerated_std"])
    with open(tmp_path / "multiplier_fit.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["fits"] for r in rows] == ["yes" if fit["layers"][r["layer"]]["fits"] else "no" for r in rows]


def test_select_is_deterministic_for_a_seed_and_deploys_the_assignment(tmp_path):
    ctx = _context(tmp_path)
    _gradient(ctx, 0.5)
    results, tables = [], []
    for i in range(2):
        run = copy.deepcopy(ctx)
        run.artifact_dir = tmp_path / f"select{i}"
        run.artifact_dir.mkdir()
        results.append(_run(run, "select", sample_size=64, rows=128, exact_power_mw=0.425,
                            library={"name": "test", "multipliers": LIBRARY}))
        tables.append((run.artifact_dir / "assignment.csv").read_text())
        assert {name: layer.multiplier.name for name, layer in approx_layers(run.model)} == \
            results[-1].state["assignment"]
    assert results[0].state == results[1].state and tables[0] == tables[1]
    metrics = results[0].metrics
    assert 0 < metrics["relative_energy"] <= 1.0 and 0 <= metrics["test_accuracy"] <= 1
    rows = list(csv.DictReader(tables[0].splitlines()))
    assert [r["chosen"] for r in rows] == [results[0].state["assignment"][r["layer"]] for r in rows]
    costs = {name: relative_cost(ctx.resolve_multiplier(name), 0.425) for name in LIBRARY}
    for layer, entry in metrics["layers"].items():
        fitting = [name for name, std in entry["predicted_std"].items() if std <= entry["tolerated_std"]]
        assert entry["chosen"] in fitting and "exact" in fitting
        assert entry["relative_cost"] == min(costs[name] for name in fitting)
    assert (tmp_path / "select0" / "selection.png").stat().st_size > 1000


def test_select_without_gradient_stage_is_refused(tmp_path):
    ctx = _context(tmp_path)
    with pytest.raises(ApproxrunError, match="needs the noise tolerances of a gradient stage"):
        _run(ctx, "select")


@pytest.mark.parametrize("schedule", ["agn", "uniform"])
def test_sweep_preset_composes_with_both_schedules(schedule):
    GlobalHydra.instance().clear()
    with initialize_config_module("approxrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=lenet5_fashion_sweep", f"schedule={schedule}", "lmbd=0.5"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert [float(v) for v in cfg.hydra.sweeper.params.lmbd.split(",")] == [0.2, 0.5, 1.0, 2.0]
    assert cfg.schedule.name == schedule and cfg.dataset.name == "fashion_mnist"
    if schedule == "agn":
        assert cfg.schedule.stages.gradient.lmbd == 0.5
        assert cfg.schedule.stages.select.library.name == "builtin"


@pytest.mark.slow
def test_agn_schedule_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "EVOAPPROX_ROOT"}
    result = subprocess.run(["approxrun", "experiment=smoke", "schedule=agn", f"hydra.run.dir={run_dir}",
                             f"cache.dir={tmp_path / 'cache'}", "schedule.stages.select.sample_size=32"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert list(metrics["stages"]) == ["baseline", "quant", "gradient", "select", "approx"]
    select, approx = metrics["stages"]["select"], metrics["stages"]["approx"]
    assert 0 < metrics["relative_energy"] <= 1.0
    assert metrics["relative_energy"] == pytest.approx(select["relative_energy"])
    assert approx["multipliers"] == select["multipliers"]
    with open(run_dir / "assignment.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
    assert {r["layer"]: r["chosen"] for r in rows} == select["multipliers"]
    for name in ("sigma.csv", "sigma.png", "selection.png"):
        assert (run_dir / name).stat().st_size > 0
    # the library is part of the select stage's cache key: another library (bundled EvoApproxLib
    # circuits, no checkout needed) is not served from the cache
    other = subprocess.run(["approxrun", "experiment=smoke", "schedule=agn", "library=evoapprox_mul8s",
                            f"hydra.run.dir={tmp_path / 'evo'}", f"cache.dir={tmp_path / 'cache'}",
                            "schedule.stages.select.sample_size=32"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert other.returncode == 0, other.stderr[-2000:]
    evo = json.loads((tmp_path / "evo" / "metrics.json").read_text())["stages"]
    assert evo["baseline"]["cached"] and not evo["select"]["cached"]
    assert all(name.startswith("mul8s_") for name in evo["select"]["multipliers"].values())
