"""VGG with batch norm for small images: the torchvision layer plan, a global-average-pooled
512-wide classifier, so any input size of at least 32x32 works."""

from __future__ import annotations

from torch import nn

PLANS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, plan, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg11_bn(num_classes=10, in_channels=3, image_size=32):
    return VGG(PLANS["vgg11_bn"], num_classes, in_channels)


def vgg16_bn(num_classes=10, in_channels=3, image_size=32):
    return VGG(PLANS["vgg16_bn"], num_classes, in_channels)
