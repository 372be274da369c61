"""ResNet-20/32/44/56/110 for CIFAR-10 (He et al. 2016) with "option A" shortcuts.

Module names match the public `pytorch_resnet_cifar10` checkpoints (`conv1`, `bn1`,
`layer{1,2,3}.{i}.conv1/bn1/conv2/bn2`, `linear`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .arch import Arch

BLOCKS_PER_STAGE = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        downsample = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes - in_planes) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages of n basic blocks (16/32/64 channels), global average pool, linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = BLOCKS_PER_STAGE[depth]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.pool(x).flatten(1))


def _arch(depth: int) -> Arch:
    return Arch(
        name=f"cifar_resnet{depth}",
        preset="cifar10",
        num_classes=10,
        build=lambda num_classes: CifarResNet(depth, num_classes),
    )


ARCHS = {arch.name: arch for arch in map(_arch, BLOCKS_PER_STAGE)}
ALIASES = {f"resnet{depth}": f"cifar_resnet{depth}" for depth in BLOCKS_PER_STAGE}
