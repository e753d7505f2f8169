"""torchvision-compatible ResNet (v1.5) and timm's ResNet-D in Flax Linen, returning the four stage maps.

Submodule names mirror torchvision's attribute names (`conv1`, `bn1`, `layer3_2`,
`downsample_0`, ...) and, for ResNet-D, timm's (`conv1_0` ... `conv1_6`, `downsample_1`,
`downsample_2`), so that a PyTorch state dict maps onto the parameters by a purely
mechanical rename (see `pmg_jax.convert`).

ResNet-D ("Bag of Tricks", He et al. 2019; timm's `resnet18d` ... `resnet152d`) differs in
two places: a deep stem of three 3x3 convolutions (width/2, width/2, width channels, the
first with stride 2, each but the last followed by BN and ReLU) in place of the 7x7 one,
and a shortcut that downsamples by a 2x2 average pool (stride 2, ceil mode, padding left
out of the average) before a stride-1 1x1 conv and BN.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from pmg_jax.backbones.registry import Backbone, UnsupportedWeights
from pmg_jax.kernels import max_pool
from pmg_jax.layers import BatchNorm, Conv

STAGE_SIZES: dict[str, tuple[int, ...]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}
BOTTLENECK = {"resnet18": False, "resnet34": False, "resnet50": True, "resnet101": True, "resnet152": True}
# timm's ResNet-D variants (deep stem, average-pool shortcut) and the ResNet whose blocks they share.
RESNET_D = {"resnet18d": "resnet18", "resnet34d": "resnet34", "resnet50d": "resnet50", "resnet101d": "resnet101",
            "resnet152d": "resnet152"}


def base_arch(arch: str) -> str:
    """The torchvision ResNet whose block type and counts `arch` has (itself, or a ResNet-D's base)."""
    return RESNET_D.get(arch, arch)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) of NHWC `x`.

    An odd side gets a last window of one row (column), averaged over what it covers.
    """
    pad = [(0, x.shape[1] % 2), (0, x.shape[2] % 2)]
    return nn.avg_pool(x, (2, 2), (2, 2), pad, count_include_pad=False).astype(x.dtype)


def shortcut(x: jax.Array, features: int, strides: int, avg_down: bool, train: bool, dtype: Any) -> jax.Array:
    """The downsampling shortcut, made in the calling block's scope so its names sit beside the block's own.

    torchvision: a 1x1 conv with the stride and BN (`downsample_0`, `downsample_1`). ResNet-D
    (`avg_down`): a 2x2 average pool where strided (timm's `downsample.0`, no parameters), then
    a stride-1 1x1 conv and BN (`downsample_1`, `downsample_2`).
    """
    if avg_down:
        x = avg_pool_ceil(x) if strides > 1 else x
        x = Conv(features, 1, dtype=dtype, name="downsample_1")(x)
        return BatchNorm(momentum=0.1, dtype=dtype, name="downsample_2")(x, train)
    x = Conv(features, 1, strides, dtype=dtype, name="downsample_0")(x)
    return BatchNorm(momentum=0.1, dtype=dtype, name="downsample_1")(x, train)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet18/34)."""

    planes: int
    strides: int
    downsample: bool
    dtype: Any = jnp.float32
    avg_down: bool = False  # ResNet-D's average-pool shortcut
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(momentum=0.1, dtype=self.dtype, name=name)
        y = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn("bn1")(y, train))
        y = Conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
        y = bn("bn2")(y, train)
        if self.downsample:
            x = shortcut(x, self.planes, self.strides, self.avg_down, train, self.dtype)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carrying the stride, torchvision v1.5) -> 1x1 x4 (ResNet50+)."""

    planes: int
    strides: int
    downsample: bool
    dtype: Any = jnp.float32
    avg_down: bool = False  # ResNet-D's average-pool shortcut
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(momentum=0.1, dtype=self.dtype, name=name)
        y = Conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn("bn1")(y, train))
        y = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(bn("bn2")(y, train))
        y = Conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y)
        y = bn("bn3")(y, train)
        if self.downsample:
            x = shortcut(x, self.planes * 4, self.strides, self.avg_down, train, self.dtype)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet trunk; returns (layer1, layer2, layer3, layer4) NHWC maps.

    `width` is the stem/first-stage width (64 in torchvision and timm; small values give
    tiny test models; a ResNet-D's deep stem starts at width/2, timm's `stem_width`),
    `stage_sizes` overrides the blocks per stage of `arch`.
    """

    arch: str = "resnet50"
    width: int = 64
    stage_sizes: Sequence[int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        base = base_arch(self.arch)
        block = Bottleneck if BOTTLENECK[base] else BasicBlock
        sizes = tuple(self.stage_sizes or STAGE_SIZES[base])
        avg_down = self.arch in RESNET_D
        if avg_down:
            x = self._deep_stem(x, train)
        else:
            x = Conv(self.width, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(BatchNorm(momentum=0.1, dtype=self.dtype, name="bn1")(x, train))
        x = max_pool(x, 3, 2, 1)
        stages = []
        in_ch = self.width
        for i, n_blocks in enumerate(sizes):
            planes = self.width * 2**i
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (strides != 1 or in_ch != planes * block.expansion)
                x = block(planes, strides, downsample, dtype=self.dtype, avg_down=avg_down,
                          name=f"layer{i + 1}_{j}")(x, train)
                in_ch = planes * block.expansion
            stages.append(x)
        return tuple(stages)

    def _deep_stem(self, x: jax.Array, train: bool) -> jax.Array:
        """timm's deep stem `conv1`: 3x3/2 conv, BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv (indices 0-6)."""
        half = self.width // 2
        for conv, bn, features, strides in ((0, 1, half, 2), (3, 4, half, 1)):
            x = Conv(features, 3, strides, 1, dtype=self.dtype, name=f"conv1_{conv}")(x)
            x = nn.relu(BatchNorm(momentum=0.1, dtype=self.dtype, name=f"conv1_{bn}")(x, train))
        return Conv(self.width, 3, 1, 1, dtype=self.dtype, name="conv1_6")(x)


def stage_channels(name: str, width: int = 64) -> tuple[int, ...]:
    """Output channels of the four stages of a backbone."""
    expansion = 4 if BOTTLENECK[base_arch(name)] else 1
    return tuple(width * 2**i * expansion for i in range(4))


def _stage_of(path: tuple[str, ...]) -> int:
    """conv1 / bn1: the stem (0); layer{k}_{j}/...: stage k."""
    return int(path[0][len("layer")]) if path[0].startswith("layer") else 0


def infer_resnet(shapes: Mapping[str, tuple[int, ...]]) -> dict | None:
    """{'name', 'width', 'stage_sizes'} of a torchvision ResNet's or timm ResNet(-D)'s state dict shapes, None
    for another family; UnsupportedWeights for timm's other stems and shortcuts, which this module does not build."""
    deep_stem = "conv1.0.weight" in shapes
    sizes = tuple(len({k.split(".")[1] for k in shapes if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    if not (deep_stem or "conv1.weight" in shapes) or not all(sizes):
        return None
    avg_down = "layer2.0.downsample.2.weight" in shapes
    if deep_stem != avg_down:
        raise UnsupportedWeights("a timm ResNet with " + ("a deep stem but a strided-conv shortcut (resnet*c)"
                                 if deep_stem else "an average-pool shortcut but a 7x7 stem") +
                                 ": only torchvision's ResNet and ResNet-D (deep stem and average-pool shortcut)")
    if deep_stem:
        stem = tuple(shapes.get(f"conv1.{i}.weight", (0,))[0] for i in (0, 3, 6))
        if stem != (stem[2] // 2, stem[2] // 2, stem[2]):
            raise UnsupportedWeights(f"a timm ResNet whose deep stem has {stem} channels: only ResNet-D's "
                                     f"(width/2, width/2, width) is supported")
    width = shapes["conv1.6.weight" if deep_stem else "conv1.weight"][0]
    bottleneck = "layer1.0.conv3.weight" in shapes
    standard = [n for n in STAGE_SIZES if BOTTLENECK[n] == bottleneck and STAGE_SIZES[n] == sizes]
    name = standard[0] if standard else ("resnet50" if bottleneck else "resnet18")
    return {"name": f"{name}d" if deep_stem else name, "width": width, "stage_sizes": () if standard else sizes}


BACKBONES = tuple(
    Backbone(name=name, build=functools.partial(ResNet, arch=name), width=64, stage_sizes=STAGE_SIZES[base_arch(name)],
             channels=lambda width, sizes, name=name: stage_channels(name, width), stage_of=_stage_of,
             infer=infer_resnet, torch_ignore=("fc.",))
    for name in (*STAGE_SIZES, *RESNET_D))
