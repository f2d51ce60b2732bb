"""ScatterNet models (Tramer & Boneh 2021): a fixed scattering transform, then a small trainable head.

The first stage is kymatio's Scattering2D (J=2, L=8): wavelets fixed in advance, independent of any data,
with no trainable weights. It therefore costs no privacy, and a client computes it once over its data
(common/features.py caches it) so that DP-SGD only ever trains, clips and noises the head. On 28x28 images it
gives 81 channels of 7x7 per input channel.

A `StagedModel` keeps the two stages apart: `features` (fixed) and `head` (trained, sent and averaged). Its
forward runs both, so the whole model still classifies raw images; `split_stages` hands callers the parts.

kymatio 0.3.0 imports `scipy.special.sph_harm` in its 3-D code at import time; SciPy 1.17 removed that
function (its replacement is `sph_harm_y`, with the angles swapped). Only 3-D scattering uses it, so before
importing kymatio we provide the old name as a thin alias of the new one when SciPy lacks it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from models.registry import register_model
from models.task import ModelError, TaskSpec

SCATTER_J = 2  # two octaves: 28x28 -> 7x7, the setting of Tramer & Boneh for (Fashion-)MNIST
SCATTER_L = 8  # eight orientations: 1 + J*L + L*L*J*(J-1)/2 = 81 channels per input channel
INPUT_GROUPS = 27  # GroupNorm over the 81 scattering channels in groups of 3, as in Tramer & Boneh


def _scattering2d() -> type:
    """kymatio's torch Scattering2D, importable with SciPy >= 1.17 (see the module docstring)."""
    import scipy.special

    if not hasattr(scipy.special, "sph_harm") and hasattr(scipy.special, "sph_harm_y"):
        def sph_harm(m: Any, n: Any, theta: Any, phi: Any) -> Any:
            # Old order: (order m, degree n, azimuthal theta, polar phi); new: (n, m, polar, azimuthal).
            return scipy.special.sph_harm_y(n, m, phi, theta)

        scipy.special.sph_harm = sph_harm
    try:
        from kymatio.torch import Scattering2D
    except ImportError as exc:
        raise ModelError(f"the scattering models need kymatio ({exc}); install it with "
                         "`pip install -c constraints.txt kymatio==0.3.0`") from None
    return Scattering2D


def scatter_channels(in_channels: int) -> int:
    return in_channels * (1 + SCATTER_J * SCATTER_L + SCATTER_L**2 * SCATTER_J * (SCATTER_J - 1) // 2)


class ScatterFeatures(nn.Module):
    """(N, C, H, W) images -> (N, 81*C, H/4, W/4) scattering coefficients. No trainable weights.

    `cache_key` names the transform exactly (library version, settings, input shape), so features cached
    under it are never reused for a different transform.
    """

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        scattering = _scattering2d()
        channels, height, width = input_shape
        self.input_shape = tuple(input_shape)
        self.scattering = scattering(J=SCATTER_J, L=SCATTER_L, shape=(height, width))
        self.output_shape = (scatter_channels(channels), height // 2**SCATTER_J, width // 2**SCATTER_J)
        import kymatio

        settings = f"kymatio-{kymatio.__version__}/Scattering2D/J={SCATTER_J}/L={SCATTER_L}/{self.input_shape}"
        self.cache_key = hashlib.sha256(settings.encode()).hexdigest()[:16]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:  # Poisson sampling draws empty batches; kymatio cannot transform one
            return x.new_zeros((0, *self.output_shape))
        out = self.scattering(x.contiguous())  # (N, C, 81, H/4, W/4)
        return out.reshape(len(x), *self.output_shape)


class StagedModel(nn.Module):
    """`features` (fixed, never trained or sent) followed by `head` (what federated DP-SGD trains). A feature
    stage has `output_shape` and a `cache_key` naming the transform exactly (ScatterFeatures, MiniLMFeatures)."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_stages(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(fixed feature stage or None, the trainable module). For a plain model: (None, model)."""
    if isinstance(model, StagedModel):
        return model.features, model.head
    return None, model


class ScatterLinear(nn.Module):
    """GroupNorm (no affine weights) on the scattering channels, then one Linear layer."""

    def __init__(self, feature_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = feature_shape
        self.norm = nn.GroupNorm(INPUT_GROUPS * channels // 81, channels, affine=False)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.norm(x)))


class ScatterCNN(nn.Module):
    """A small GroupNorm CNN on the scattering channels: two conv3x3 blocks, global pooling, Linear.

    tanh and GroupNorm for the same reasons as models/vision.SmallCNN (bounded activations, no batch mixing).
    """

    def __init__(self, feature_shape: tuple[int, int, int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        channels = feature_shape[0]
        self.norm = nn.GroupNorm(INPUT_GROUPS * channels // 81, channels, affine=False)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, 2 * width)
        self.act = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(self.norm(x))))
        x = self.act(self.norm2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


def _fits(spec: TaskSpec) -> bool:
    # Two octaves halve each side twice: sides must be multiples of 4 and at least 8.
    _, height, width = spec.input_shape
    return all(side % 2**SCATTER_J == 0 and side >= 2 ** (SCATTER_J + 1) for side in (height, width))


_NEEDS = "2-D images whose sides are multiples of 4 (e.g. 1x28x28 Fashion-MNIST)"


@register_model("scatter-linear", kinds=("image",), needs=_NEEDS, fits=_fits)
def build_scatter_linear(spec: TaskSpec) -> nn.Module:
    features = ScatterFeatures(spec.input_shape)
    return StagedModel(features, ScatterLinear(features.output_shape, spec.num_classes))


@register_model("scatter-cnn", kinds=("image",), needs=_NEEDS, fits=_fits)
def build_scatter_cnn(spec: TaskSpec) -> nn.Module:
    features = ScatterFeatures(spec.input_shape)
    return StagedModel(features, ScatterCNN(features.output_shape, spec.num_classes))
