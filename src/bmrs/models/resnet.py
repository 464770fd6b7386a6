"""ResNet-18 / ResNet-50 with torchvision's module and parameter names (no torchvision needed).

A ``state_dict`` saved from ``torchvision.models.resnet18()`` / ``resnet50()`` loads with
``strict=True`` into the plain model (``noise=False``), and into the noisy model with only the noise
keys (``*.bmrs_noise.*``) missing — see :func:`bmrs.models.load_pretrained`.  Noise layers go after
every BatchNorm, including the BatchNorm of each downsample shortcut.
"""

from __future__ import annotations

from typing import Type, Union

import torch
from torch import Tensor, nn

from ..nn import attach
from ._checks import positive_int, noise_options

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "batchnorm_names"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """relu(branch(x) + shortcut), the shortcut being x or ``downsample(x)`` (the branch runs first)."""

    downsample: nn.Module | None

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(_ResidualBlock):
    """Two 3×3 convs with a residual shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_ResidualBlock):
    """1×1 reduce → 3×3 (stride here, as torchvision's "ResNet v1.5") → 1×1 expand, with a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))


class ResNet(nn.Module):
    """torchvision's ResNet (same attribute names and initialisation).

    ``small_input=True`` swaps the ImageNet stem (7×7 stride-2 conv + 3×3 max-pool) for the CIFAR
    stem (3×3 stride-1 conv, ``maxpool`` an ``nn.Identity``), keeping every name.
    """

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def batchnorm_names(model: nn.Module) -> list[str]:
    """Names of every BatchNorm module of ``model`` (the noise targets of the ResNets).

    Examples:
        >>> from bmrs.models import resnet18, batchnorm_names
        >>> len(batchnorm_names(resnet18(noise=False)))
        20
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _build(block, layers, num_classes, in_channels, small_input, noise, builder) -> ResNet:
    positive_int("num_classes", num_classes, builder)
    positive_int("in_channels", in_channels, builder)
    model = ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, small_input=bool(small_input))
    options = noise_options(noise, builder)
    return model if options is None else attach(model, targets=batchnorm_names(model), **options)


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False, noise: bool | dict = True) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes), noise after each of its 20 BatchNorms.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.models import resnet18
        >>> model = resnet18(num_classes=10, small_input=True)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> len(bmrs.noise_layers(model))
        20
    """
    return _build(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, small_input, noise, "resnet18")


def resnet50(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False, noise: bool | dict = True) -> ResNet:
    """ResNet-50 (25,557,032 parameters with 1000 classes), noise after each of its 53 BatchNorms.

    Examples:
        >>> import bmrs
        >>> from bmrs.models import resnet50
        >>> len(bmrs.noise_layers(resnet50(num_classes=10)))
        53
    """
    return _build(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, small_input, noise, "resnet50")
