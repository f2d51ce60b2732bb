"""Image models: a small tanh CNN (28x28 and 8x8 images) and a small GroupNorm ResNet (any size).

Both normalise with GroupNorm, never BatchNorm: BatchNorm mixes the examples of a batch, which
breaks per-example gradient clipping in DP-SGD.
"""

from __future__ import annotations

import torch
from torch import nn

from models.registry import register_model
from models.task import TaskSpec

_GROUPS = 8  # every channel count below is a multiple of 8


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels)


class SmallCNN(nn.Module):
    """Two conv blocks (conv3x3 + GroupNorm + tanh + maxpool 2) and two Linear layers.

    tanh rather than ReLU: bounded activations keep per-example gradients small, so less of the
    signal is lost to clipping under DP-SGD.
    """

    def __init__(self, in_channels: int, side: int, num_classes: int, width: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.norm1 = _group_norm(width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.norm2 = _group_norm(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.Tanh()
        self.flatten = nn.Flatten()
        pooled = side // 4  # two 2x2 poolings
        self.fc1 = nn.Linear(2 * width * pooled * pooled, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.norm1(self.conv1(x))))
        x = self.pool(self.act(self.norm2(self.conv2(x))))
        return self.fc2(self.act(self.fc1(self.flatten(x))))


# Image side -> (conv width, hidden units). 28x28 is the Fashion-MNIST design (~421k parameters,
# ~92% test accuracy); 8x8 (sklearn digits) is scaled down in proportion (~14k parameters).
_CNN_SIZES: dict[int, tuple[int, int]] = {28: (32, 128), 8: (16, 64)}


def _cnn_fits(spec: TaskSpec) -> bool:
    _, height, width = spec.input_shape
    return height == width and height in _CNN_SIZES


@register_model(
    "cnn",
    kinds=("image",),
    needs="28x28 or 8x8 images",
    fits=_cnn_fits,
)
def build_cnn(spec: TaskSpec) -> nn.Module:
    channels, side, _ = spec.input_shape
    width, hidden = _CNN_SIZES[side]
    return SmallCNN(channels, side, spec.num_classes, width=width, hidden=hidden)


class BasicBlock(nn.Module):
    """Two conv3x3 + GroupNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _group_norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-8 style: a conv stem, then one BasicBlock per stage at 16/32/64 channels
    (stages 2 and 3 halve the resolution), global average pooling and a Linear head.

    One block per stage keeps DP-SGD affordable on CPUs; adaptive pooling makes it fit any image size.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            _group_norm(widths[0]),
            nn.ReLU(),
        )
        blocks = []
        previous = widths[0]
        for index, width in enumerate(widths):
            blocks.append(BasicBlock(previous, width, stride=1 if index == 0 else 2))
            previous = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.stages(self.stem(x)))))


@register_model("resnet", kinds=("image",))
def build_resnet(spec: TaskSpec) -> nn.Module:
    return SmallResNet(spec.input_shape[0], spec.num_classes)
