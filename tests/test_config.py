"""The config schema: composition on top of it, one checked place for value ranges, stage settings
checked against their kind, the deprecated ``checkpoint`` key, multiplier names without files, and a
command line that does not import torch."""

from __future__ import annotations

import dataclasses
import logging
from importlib import resources
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from approxrun.multipliers.catalogue import catalogue_entries
from approxrun.cli import expand_arguments, group_options
from approxrun.config import ConfigError, load_config, stage_configs
from approxrun.config.schema import GradientSettings, QuantConfig, RunConfig


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("approxrun.conf", version_base="1.3"):
            return compose("config", overrides=expand_arguments(list(overrides)))
    finally:
        GlobalHydra.instance().clear()


def test_the_schema_is_the_base_of_the_composed_config():
    cfg = _compose()
    assert set(cfg) == {f.name for f in dataclasses.fields(RunConfig)}
    assert OmegaConf.get_type(cfg.quant) is QuantConfig
    config = load_config(cfg)
    assert config["quant"] == dataclasses.asdict(QuantConfig()) and config["multiplier"]["name"] == "auto"


@pytest.mark.parametrize("key, value, expected", [
    ("quant.bits_a", 1, "quant.bits_a=1: expected null or a whole number from 2 to 8"),
    ("quant.observer", "best", "quant.observer='best': expected one of minmax, "),
    ("quant.grad", "exact", "quant.grad='exact': expected one of ste, lut"),
    ("lut.strategy", "fastest", "lut.strategy='fastest': expected one of auto, gather, lowrank"),
    ("lut.lookup_cost", 0, "lut.lookup_cost=0.0: expected null or a number > 0"),
    ("energy.exact_power_mw", -1, "energy.exact_power_mw=-1.0: expected null or a number > 0"),
    ("dataset.batch_size", 0, "dataset.batch_size=0: expected a whole number >= 1"),
    ("dataset.val_fraction", 1.5, "dataset.val_fraction=1.5: expected a number from 0 to 1"),
    ("model.train.baseline.epochs", -1, "model.train.baseline.epochs=-1: expected a whole number >= 0"),
    ("model.train.approx.optimizer.lr", 0, "model.train.approx.optimizer.lr=0.0: expected a number > 0"),
    ("model.train.quant.scheduler.name", "cyclic", "model.train.quant.scheduler.name='cyclic': expected one of"),
])
def test_values_out_of_range_are_refused_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as error:
        load_config(_compose(f"{key}={value}"))
    assert str(error.value).startswith(expected)


def test_stage_settings_are_checked_against_their_kind():
    stages = {s["name"]: s for s in stage_configs(load_config(_compose("schedule=agn")))}
    defaults = {f.name: f.default for f in dataclasses.fields(GradientSettings) if f.name not in ("kind", "name")}
    assert {key: stages["gradient"][key] for key in defaults} == defaults  # written once, in the schema
    assert stages["select"]["library"]["name"] == "builtin" and stages["select"]["exact_power_mw"] is None
    assert stages["gradient"]["epochs"] == 3 and stages["gradient"]["optimizer"]["lr"] == 1.0e-3  # model.train
    with pytest.raises(ConfigError, match=r"^schedule.stages.gradient.sigma_max=0.0: expected a number > 0"):
        stage_configs(load_config(_compose("schedule=agn", "schedule.stages.gradient.sigma_max=0")))
    with pytest.raises(ConfigError, match=r"^stage approx: epochs=-4: expected a whole number >= 0"):
        stage_configs(load_config(_compose("++schedule.stages.approx.epochs=-4")))
    with pytest.raises(ConfigError, match="schedule.stages.approx.lmbd: not a setting of a approx stage"):
        stage_configs(load_config(_compose("++schedule.stages.approx.lmbd=1")))


def test_a_plain_mapping_is_checked_like_a_composed_config():
    config = OmegaConf.to_container(_compose(), resolve=True)
    config["quant"]["bitz"] = 4
    with pytest.raises(ConfigError, match="quant.bitz"):
        load_config(config)
    del config["quant"]["bitz"]
    config["seed"] = "abc"
    with pytest.raises(ConfigError, match="seed"):
        load_config(config)


def test_the_deprecated_checkpoint_key_still_sets_the_initial_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="approxrun"):
        config = load_config(_compose("schedule=eval", "checkpoint=weights.pt"))
    assert config["init_weights"] == "weights.pt" and "checkpoint" not in config
    assert [r.getMessage() for r in caplog.records] == [
        "config key 'checkpoint' is deprecated: use init_weights=PATH (the weights to start from)"]


def test_any_design_name_is_a_multiplier_choice_without_a_file():
    assert "exact" in group_options("multiplier") and "drum_5" not in group_options("multiplier")
    assert expand_arguments(["multiplier=exact,drum_5"]) == ["multiplier=exact,drum_5"]  # job folders keep the name
    assert _compose("multiplier=drum_5").multiplier.name == "drum_5"
    assert _compose("multiplier=mul8s_1L2D").multiplier.name == "mul8s_1L2D"  # bundled: facts in its catalogue
    assert catalogue_entries()["mul8s_1L2D"]["cost"]["kind"] == "power"
    assert expand_arguments(["multiplier=lut.npy"]) == ["multiplier=file", "multiplier.path=lut.npy"]
    files = sorted(p.name for p in resources.files("approxrun.conf").joinpath("multiplier").iterdir()
                   if p.name.endswith(".yaml"))
    assert files == ["file.yaml"]  # EvoApproxLib facts live in the bundle's catalogue


def test_the_command_line_modules_do_not_import_torch(tmp_path):
    code = "import sys, approxrun.cli, approxrun.lut_tool, approxrun.conf; print('torch' in sys.modules)"
    # outside the repository: `python -c` puts the current folder first, and the installed package is wanted
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("override, expected", [
    ("seed=abc", "Error merging override seed=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("quant.bitz=3", "quant.bitz: not a config key (keys of quant: bits_a, bits_b,"),
    ("schedule.order=[baseline", "cannot parse 'schedule.order=[baseline': "),
])
def test_composition_errors_are_one_line_and_exit_status_2(tmp_path, override, expected):
    result = subprocess.run([sys.executable, "-m", "approxrun", override, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"approxrun: error: {expected}")
    assert not (tmp_path / "run").exists()


def test_factory_nodes_are_open_and_built_in_nodes_closed():
    config = load_config(_compose("model._target_=examples.tiny_nets.small_cnn", "+model.width=8",
                                  "dataset._target_=examples.tiny_nets.stripes", "+dataset.train_size=64"))
    assert config["model"]["width"] == 8 and config["model"]["name"] == "examples.tiny_nets.small_cnn"
    assert config["dataset"]["train_size"] == 64 and "val_fraction" not in config["dataset"]  # not a built-in's key
    plain = OmegaConf.to_container(_compose("dataset._target_=examples.tiny_nets.stripes", "+dataset.classes=3"))
    assert load_config(plain)["dataset"]["classes"] == 3  # a notebook's mapping: the same classes
    with pytest.raises(ConfigError, match=r"^model.width: not a config key \(keys of model: name, weights, train\)"):
        load_config(_compose("+model.width=8"))
    with pytest.raises(ConfigError, match=r"^dataset.batch_size=0: expected a whole number >= 1"):
        load_config(_compose("dataset._target_=examples.tiny_nets.stripes", "dataset.batch_size=0"))
    with pytest.raises(ConfigError, match=r"^dataset.train_size=0: expected null or a whole number >= 1"):
        load_config(_compose("dataset=synthetic", "dataset.train_size=0"))


def test_new_keys_are_schema_fields():
    config = load_config(_compose("schedule=eval", "threads=3", "model.weights=DEFAULT"))
    assert config["threads"] == "3" and config["model"]["weights"] == "DEFAULT"
    assert stage_configs(config)[0]["calibration_batches"] == 4
    with pytest.raises(ConfigError, match=r"^schedule.stages.eval.calibration_batches=-1: expected a whole number >= 0"):
        stage_configs(load_config(_compose("schedule=eval", "schedule.stages.eval.calibration_batches=-1")))
