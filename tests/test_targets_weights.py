"""A user's own model and data by ``_target_``, trained weights by ``model.weights`` (file or a
torchvision weights name), and the preprocessing published with torchvision weights: the functions,
then the installed command end to end (marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from approxrun.data import DataBundle, build_data
from approxrun.errors import ApproxrunError
from approxrun.models import model_from_config
from approxrun.targets import instantiate, locate
from approxrun.weights import (is_weights_name, load_strict, read_weights_file, torchvision_weights,
                               weights_preprocessing)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the examples/ folder, as `python -m approxrun` from the repository sees it
from examples.tiny_nets import small_cnn, stripes  # noqa: E402


@pytest.mark.parametrize("path, message", [
    ("no_such_pkg.nets.build", "no module named 'no_such_pkg'"),
    ("examples.tiny_nets.large_cnn", "has no attribute 'large_cnn'"),
    ("examples.tiny_nets.math", "not callable"),
    ("build", "expected a dotted path"),
])
def test_locate_names_key_and_problem(path, message):
    with pytest.raises(ApproxrunError) as err:
        locate(path, "model._target_")
    assert str(err.value).startswith(f"model._target_={path}") and message in str(err.value)


def test_instantiate_offers_only_accepted_arguments_and_builds_nested_targets():
    built = instantiate({"_target_": "examples.tiny_nets.small_cnn", "width": 4, "name": "ignored"}, "model",
                        reserved=("name",), offered={"num_classes": 3, "in_channels": 2, "image_size": 99})
    assert built[0].in_channels == 2 and built[-1].out_features == 3 and built[0].out_channels == 4
    nested = instantiate({"_target_": "builtins.dict", "inner": {"_target_": "torch.nn.Dropout", "p": 0.25}}, "model")
    assert isinstance(nested["inner"], nn.Dropout) and nested["inner"].p == 0.25
    with pytest.raises(ApproxrunError, match=r"model\._target_=examples.tiny_nets.small_cnn: calling it with "
                                             r"num_classes, wdth failed \(TypeError"):
        instantiate({"_target_": "examples.tiny_nets.small_cnn", "wdth": 4}, "model", offered={"num_classes": 3})


def test_model_from_config_with_target_returns_a_module_or_fails():
    model = model_from_config({"_target_": "examples.tiny_nets.small_cnn", "name": "x", "weights": None,
                               "train": {}}, 7, 3, 12)
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 7)
    with pytest.raises(ApproxrunError, match="returned OrderedDict, expected a torch.nn.Module"):
        model_from_config({"_target_": "collections.OrderedDict"}, 7, 3, 12)


def test_dataset_from_target_infers_classes_channels_and_size():
    data = build_data({"_target_": "examples.tiny_nets.stripes", "name": "s", "batch_size": 8, "classes": 3,
                       "train_size": 40, "test_size": 20}, "/nonexistent")
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 1, 12)
    assert len(data.train) == 40 and len(data.test) == 20 and data.val is data.test
    train, test = stripes(8, 8)
    given = build_data({"_target_": "builtins.dict", "train": train, "test": test, "num_classes": 9}, "/x")
    assert given.num_classes == 9 and isinstance(given, DataBundle)
    with pytest.raises(ApproxrunError, match=r"dataset._target_=builtins.list: returned list"):
        build_data({"_target_": "builtins.list"}, "/x")


def test_weights_names_and_files():
    assert is_weights_name("DEFAULT") and is_weights_name("IMAGENET1K_V1")
    assert is_weights_name("ResNet18_Weights.IMAGENET1K_V1") and not is_weights_name("weights/model.pt")
    assert torchvision_weights("resnet18", "DEFAULT") is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ApproxrunError, match="not a weights name of resnet18"):
        torchvision_weights("resnet18", "IMAGENET22K")
    with pytest.raises(ApproxrunError, match="weights of another model"):
        torchvision_weights("resnet18", "VGG11_Weights.IMAGENET1K_V1")
    with pytest.raises(ApproxrunError, match="model 'lenet5' is not a torchvision model"):
        torchvision_weights("lenet5", "DEFAULT")


def test_strict_loading_lists_the_first_mismatches(tmp_path):
    model = small_cnn(num_classes=4)
    other = small_cnn(num_classes=5, width=8)
    state = other.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.bias"]
    torch.save(state, tmp_path / "w.pt")
    weights = read_weights_file(str(tmp_path / "w.pt"))
    with pytest.raises(ApproxrunError) as err:
        weights.load_into(model)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"model.weights={tmp_path / 'w.pt'}: does not fit the model")
    assert "missing 0.bias" in line and "unexpected extra.weight" in line and "shape 7.weight [5, 64] vs [4, 64]" in line
    load_strict(model, small_cnn(num_classes=4).state_dict(), "x")  # same architecture: loads
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    assert not read_weights_file(str(tmp_path / "wrapped.pt")).approximate


def test_weights_preprocessing_is_the_published_transform():
    preprocess = weights_preprocessing({"name": "resnet18", "weights": "IMAGENET1K_V1"}, {"preprocess": "auto"})
    assert preprocess.image_size == 224 and preprocess.source == "IMAGENET1K_V1"
    assert list(preprocess.eval.mean) == [0.485, 0.456, 0.406]
    assert weights_preprocessing({"name": "resnet18", "weights": "w.pt"}, {"preprocess": "auto"}) is None
    assert weights_preprocessing({"name": "resnet18", "weights": "w.pt"},
                                 {"preprocess": "IMAGENET1K_V1"}).image_size == 224


# --- the installed command -------------------------------------------------------------------------------------

def _examples_on_path(cwd: Path) -> str:
    """A folder that holds only a link to examples/: on PYTHONPATH it makes the example module
    importable without putting the repository's source tree (approxrun/ without its conf/) ahead of
    the installed package."""
    folder = cwd.parent / f"{cwd.name}-pythonpath"
    folder.mkdir(exist_ok=True)
    if not (folder / "examples").exists():
        (folder / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    return str(folder)


def approxrun(*args, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EVOAPPROX_ROOT"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=_examples_on_path(cwd), **(env_extra or {}))
    return subprocess.run(["approxrun", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_own_model_and_dataset_by_target_then_weights_from_its_checkpoint(tmp_path):
    common = ["model._target_=examples.tiny_nets.small_cnn", "+model.width=8", "dataset._target_=examples.tiny_nets.stripes",
              "+dataset.train_size=512", "experiment=smoke", "model.train.baseline.epochs=4", "device=cpu", f"cache.dir={tmp_path / 'cache'}"]
    first = approxrun(*common, "stage=quant", f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["stages"]["quant"]["test_accuracy"] > 0.8
    assert "ApproxConv2d" in (tmp_path / "first" / "layers.csv").read_text()

    checkpoint = tmp_path / "first" / "checkpoints" / "baseline.pt"
    second = approxrun(*common, f"model.weights={checkpoint}", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    stages = json.loads((tmp_path / "second" / "metrics.json").read_text())["stages"]
    assert stages["baseline"]["skipped"] == f"model.weights={checkpoint}" and stages["baseline"]["epochs"] == 0
    assert stages["baseline"]["test_accuracy"] == metrics["stages"]["baseline"]["test_accuracy"]
    assert stages["approx"]["epochs"] == 1
    baseline_row = next(line for line in second.stdout.splitlines() if line.startswith("baseline"))
    assert "skipped" in baseline_row and "not trained" in second.stdout


def _tiny_imagenet_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    from PIL import Image
    for split in ("train", "val"):
        for synset in ("n01440764", "n01443537", "n01484850"):
            folder = root / split / synset
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_pretrained_evaluation_on_an_image_folder(tmp_path):
    """The paper experiment: published weights (random weights in torchvision's cache stand in
    offline) evaluated under a multiplier, with the weights' own preprocessing."""
    torch_home = tmp_path / "torch_home"
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(),
               torch_home / "hub" / "checkpoints" / Path(weights.url).name)
    _tiny_imagenet_folder(tmp_path / "imagenet")
    result = approxrun("schedule=eval", "model=mobilenet_v3_small", "model.weights=IMAGENET1K_V1", "dataset=imagefolder",
                       f"dataset.root={tmp_path / 'imagenet'}", "dataset.num_workers=0", "multiplier=drum_6",
                       "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                       env_extra={"TORCH_HOME": str(torch_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    stage = metrics["stages"]["eval"]
    assert set(stage["multipliers"].values()) == {"drum_6"} and stage["calibrated_layers"] > 50
    assert 0 <= stage["test_accuracy"] <= stage["test_top5"] <= 1 and stage["images_per_s"] > 0
    config = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert "weights: IMAGENET1K_V1" in config
    log = (tmp_path / "run" / "approxrun.log").read_text()
    assert "6 test images" in log and "images/s" in log and "top-5" in log


@pytest.mark.slow
def test_torchvision_weights_offline_fail_with_one_line(tmp_path):
    result = approxrun("schedule=eval", "model=resnet18", "model.weights=DEFAULT", "dataset=synthetic", "dataset.channels=3",
                       "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                       env_extra={"TORCH_HOME": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
                                  "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("approxrun: error: model.weights=DEFAULT: could not fetch ResNet18_Weights.IMAGENET1K_V1")
    assert "offline?" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
