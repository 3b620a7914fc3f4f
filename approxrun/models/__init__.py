"""Model builders: ``build_model(name, num_classes, in_channels, image_size)``.

Own architectures (LeNet5, CIFAR ResNets, VGG-BN) plus any torchvision classification model by
name, with its classifier and first convolution adapted to the dataset.
"""

from __future__ import annotations

import torchvision
from torch import nn

from approxrun.errors import ApproxrunError, ConfigError
from approxrun.models.lenet5 import lenet5
from approxrun.models.resnet_cifar import resnet8, resnet14, resnet20, resnet32
from approxrun.models.vgg import vgg11_bn, vgg16_bn

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


__all__ = ["build_model", "torchvision_names", "BUILDERS"]
