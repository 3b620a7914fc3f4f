"""Trained weights to start from: ``model.weights`` is a file (a state_dict, or a stage checkpoint of
an earlier run) or a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, or the full
``ResNet18_Weights.IMAGENET1K_V1``), fetched through torchvision's own download and cache.

Keys are matched strictly; a mismatch is one line listing the first differences. A plain float
state_dict is loaded before the model is converted to approximate layers, a stage checkpoint
(approximate layers' quantizer state included) after.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from approxrun.errors import ApproxrunError, ConfigError, one_line

_WEIGHTS_NAME = re.compile(r"([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*")
SHOWN = 3  # differences listed in a mismatch error


def is_weights_name(spec: str) -> bool:
    """Whether ``model.weights`` names torchvision weights rather than a file."""
    return bool(_WEIGHTS_NAME.fullmatch(spec)) and not Path(spec).exists()


def torchvision_weights(model_name: str, spec: str):
    """The torchvision ``WeightsEnum`` member ``spec`` names for model ``model_name``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise ConfigError(f"model.weights={spec}: a torchvision weights name, but model {model_name!r} is "
                             "not a torchvision model; give a weights file") from None
    member = spec.split(".")[-1]
    if "." in spec and spec.split(".")[0] != enum.__name__:
        raise ConfigError(f"model.weights={spec}: weights of another model; {model_name} has {enum.__name__}")
    names = ["DEFAULT", *enum.__members__]
    if member not in names:
        raise ConfigError(f"model.weights={spec}: not a weights name of {model_name} (expected one of "
                             f"{', '.join(names)}) and not an existing file")
    return enum[member]


def pretrained_torchvision(model_name: str, spec: str, in_channels: int) -> nn.Module:
    """A torchvision model with its published weights (torchvision's download and cache, ``$TORCH_HOME``)."""
    import torchvision

    weights = torchvision_weights(model_name, spec)
    if in_channels != 3:
        raise ConfigError(f"model.weights={spec}: {weights} expects 3 input channels, the dataset has {in_channels}")
    try:
        return torchvision.models.get_model(model_name, weights=weights, progress=False)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, ...: offline is the usual cause
        raise ApproxrunError(f"model.weights={spec}: could not fetch {weights} from {weights.url} "
                             f"({one_line(exc)}); "
                             "offline? put the file into $TORCH_HOME/hub/checkpoints or give model.weights=PATH") from None


@dataclass
class WeightsFile:
    """A state_dict read from ``model.weights=PATH``, loaded into the model before or after conversion."""

    path: Path
    state: dict
    fingerprint: str  # the file's content hash: part of the stage cache key

    @property
    def approximate(self) -> bool:
        """A stage checkpoint of approximate layers (quantizer state) rather than a float state_dict."""
        return any(k.endswith("._extra_state") or ".act_quant." in k for k in self.state)

    def load_into(self, model: nn.Module) -> None:
        load_strict(model, self.state, f"model.weights={self.path}")


def check_weights_spec(spec) -> None:
    """``model.weights`` is null, a torchvision weights name or an existing file."""
    if spec is None or isinstance(spec, str) and spec and is_weights_name(spec):
        return
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"model.weights={spec!r}: expected a file or a torchvision weights name")
    if not Path(spec).expanduser().is_file():
        raise ConfigError(f"model.weights={spec}: no such file (nor a torchvision weights name such as "
                             "DEFAULT or IMAGENET1K_V1)")


def read_model_weights(spec: str | None) -> WeightsFile | None:
    """The state_dict of ``model.weights=PATH``; None without weights or for a torchvision weights
    name (the model builder fetches those)."""
    check_weights_spec(spec)
    return None if spec is None or is_weights_name(spec) else read_weights_file(spec)


def read_weights_file(spec: str) -> WeightsFile:
    """Read a state_dict (or ``{'state_dict': ...}``) from ``spec``; one-line errors."""
    check_weights_spec(spec)
    path = Path(spec).expanduser()
    payload = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApproxrunError(f"model.weights={spec}: not a readable weights-only torch file ({type(exc).__name__})") \
            from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ApproxrunError(f"model.weights={spec}: expected a state_dict, found {type(state).__name__}")
    return WeightsFile(path, dict(state), hashlib.sha256(payload).hexdigest()[:16])


def load_strict(model: nn.Module, state: Mapping, source: str) -> None:
    """``model.load_state_dict(state)`` with every key and shape matched; else one line naming the first
    missing, unexpected and differently shaped entries."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and isinstance(own[k], torch.Tensor) and isinstance(state[k], torch.Tensor)
              and own[k].shape != state[k].shape]
    problems = [f"{label} {', '.join(items[:SHOWN])}{f' (+{len(items) - SHOWN} more)' if len(items) > SHOWN else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
    if problems:
        raise ApproxrunError(f"{source}: does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


def weights_preprocessing(model_cfg: Mapping, dataset_cfg: Mapping):
    """The image-folder transforms published with torchvision weights, or None for the dataset's own.

    ``dataset.preprocess``: ``auto`` (the weights' own when ``model.weights`` names torchvision
    weights), ``plain`` (the dataset's resize and normalisation), or a weights name (for a weights
    file trained with that preprocessing). Evaluation uses the weights' transform as published
    (resize, centre crop, normalisation); training a random resized crop and flip with its statistics.
    """
    from torchvision import transforms as T

    from approxrun.data import Preprocessing

    choice, weights = dataset_cfg.get("preprocess", "plain"), model_cfg.get("weights")
    if choice == "auto":
        choice = weights if isinstance(weights, str) and is_weights_name(weights) else "plain"
    if choice in (None, "plain"):
        return None
    if not isinstance(choice, str) or not _WEIGHTS_NAME.fullmatch(choice):
        raise ConfigError(f"dataset.preprocess={choice!r}: expected auto, plain or a torchvision weights name")
    published = torchvision_weights(model_cfg.get("name", ""), choice).transforms()
    crop = published.crop_size[0]
    train = T.Compose([T.RandomResizedCrop(crop, interpolation=published.interpolation), T.RandomHorizontalFlip(),
                       T.ToTensor(), T.Normalize(published.mean, published.std)])
    return Preprocessing(train=train, eval=published, image_size=crop, source=choice)
