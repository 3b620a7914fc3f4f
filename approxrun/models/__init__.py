"""Model builders: ``build_model(name, num_classes, in_channels, image_size)``.

Own architectures (LeNet5, CIFAR ResNets, VGG-BN) plus any torchvision classification model by
name, with its classifier and first convolution adapted to the dataset; ``model_from_config`` adds
a user's own factory (``model._target_``) and torchvision's published weights (``model.weights``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torchvision
from torch import nn

from approxrun.config.schema import FactoryModelConfig
from approxrun.errors import ApproxrunError, ConfigError
from approxrun.models.lenet5 import lenet5
from approxrun.models.resnet_cifar import resnet8, resnet14, resnet20, resnet32
from approxrun.models.vgg import vgg11_bn, vgg16_bn
from approxrun.targets import instantiate
from approxrun.weights import is_weights_name, pretrained_torchvision

BUILDERS = {
    "lenet5": lenet5,
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "vgg11_bn": vgg11_bn,
    "vgg16_bn": vgg16_bn,
}


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first Conv2d ``in_channels`` inputs (the dataset's), keeping its other settings."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        child.dilation, child.groups, child.bias is not None, child.padding_mode))
                return


def torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _replace_first_conv(model, in_channels)
    return model


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if name in BUILDERS:
        try:
            return BUILDERS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        except ValueError as exc:
            raise ApproxrunError(f"model {name}: {exc}") from None
    if name in torchvision_names():
        return torchvision_model(name, num_classes, in_channels)
    raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(BUILDERS)} "
                         "or a torchvision classification model name")


# keys of a model config that are approxrun's own, not arguments of a ``_target_`` factory
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(FactoryModelConfig))


def model_from_config(cfg: Mapping, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The model a ``model`` config describes: ``_target_`` (any factory returning an nn.Module; it is
    offered ``num_classes``, ``in_channels`` and ``image_size`` when it takes them), a torchvision
    model with published weights (``weights: DEFAULT``; its classes are the weights' categories), or
    a builder by ``name``. Weights files are loaded by the caller (before or after conversion)."""
    weights = cfg.get("weights")
    if cfg.get("_target_"):
        model = instantiate(cfg, "model", reserved=MODEL_KEYS,
                            offered=dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size))
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model._target_={cfg['_target_']}: returned {type(model).__name__}, "
                                 "expected a torch.nn.Module")
        return model
    if isinstance(weights, str) and is_weights_name(weights):
        model = pretrained_torchvision(cfg["name"], weights, in_channels)
        classes = _output_features(model)
        if classes is not None and classes < num_classes:
            raise ConfigError(f"model.weights={weights}: the weights know {classes} classes, "
                                 f"the dataset has {num_classes}")
        return model
    return build_model(cfg["name"], num_classes, in_channels, image_size)


def _output_features(model: nn.Module) -> int | None:
    """Outputs of the last Linear layer (the classes of a classifier), if there is one."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


__all__ = ["build_model", "model_from_config", "torchvision_names", "BUILDERS"]
