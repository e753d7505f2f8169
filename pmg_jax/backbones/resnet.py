"""torchvision-compatible ResNet (v1.5) in Flax Linen, returning the four stage maps.

Submodule names mirror torchvision's attribute names (`conv1`, `bn1`, `layer3_2`,
`downsample_0`, ...) so that a PyTorch state dict maps onto the parameters by a
purely mechanical rename (see `pmg_jax.convert`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from pmg_jax.backbones.registry import Backbone
from pmg_jax.kernels import max_pool
from pmg_jax.layers import BatchNorm, Conv, checkpointed

STAGE_SIZES: dict[str, tuple[int, ...]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}
BOTTLENECK = {"resnet18": False, "resnet34": False, "resnet50": True, "resnet101": True, "resnet152": True}


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet18/34)."""

    planes: int
    strides: int
    downsample: bool
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    bn_group_stats: str = "mean"
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(momentum=0.1, dtype=self.dtype, group_size=self.bn_group_size,
                                    group_stats=self.bn_group_stats, name=name)
        y = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn("bn1")(y, train))
        y = Conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
        y = bn("bn2")(y, train)
        if self.downsample:
            x = Conv(self.planes, 1, self.strides, dtype=self.dtype, name="downsample_0")(x)
            x = bn("downsample_1")(x, train)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carrying the stride, torchvision v1.5) -> 1x1 x4 (ResNet50+)."""

    planes: int
    strides: int
    downsample: bool
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    bn_group_stats: str = "mean"
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(momentum=0.1, dtype=self.dtype, group_size=self.bn_group_size,
                                    group_stats=self.bn_group_stats, name=name)
        y = Conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn("bn1")(y, train))
        y = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(bn("bn2")(y, train))
        y = Conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y)
        y = bn("bn3")(y, train)
        if self.downsample:
            x = Conv(self.planes * 4, 1, self.strides, dtype=self.dtype, name="downsample_0")(x)
            x = bn("downsample_1")(x, train)
        return nn.relu(y + x)


def _stem(conv: Conv, bn: BatchNorm, x: jax.Array, train: bool) -> jax.Array:
    """7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max pool."""
    return max_pool(nn.relu(bn(conv(x), train)), 3, 2, 1)


def _stage(first: nn.Module, rest: tuple[nn.Module, ...], x: jax.Array, train: bool) -> jax.Array:
    """The residual blocks of one stage in turn."""
    x = first(x, train)
    for block in rest:
        x = block(x, train)
    return x


class ResNet(nn.Module):
    """ResNet trunk; returns (layer1, layer2, layer3, layer4) NHWC maps.

    `width` is the stem/first-stage width (64 in torchvision; small values give tiny
    test models), `stage_sizes` overrides the blocks per stage of `arch`. `remat` recomputes
    the stem and each stage in the backward from the map it reads (only stage outputs are
    saved; the modules keep their names); `bn_group_size` / `bn_group_stats` go to every BatchNorm.
    """

    arch: str = "resnet50"
    width: int = 64
    stage_sizes: Sequence[int] | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    bn_group_size: int = 0
    bn_group_stats: str = "mean"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        block = Bottleneck if BOTTLENECK[self.arch] else BasicBlock
        sizes = tuple(self.stage_sizes or STAGE_SIZES[self.arch])
        groups = {"bn_group_size": self.bn_group_size, "bn_group_stats": self.bn_group_stats}
        stem, stage = (checkpointed(_stem, 3), checkpointed(_stage, 3)) if self.remat else (_stem, _stage)
        x = stem(Conv(self.width, 7, 2, 3, dtype=self.dtype, name="conv1"),
                 BatchNorm(momentum=0.1, dtype=self.dtype, group_size=self.bn_group_size,
                           group_stats=self.bn_group_stats, name="bn1"), x, train)
        stages = []
        in_ch = self.width
        for i, n_blocks in enumerate(sizes):
            planes = self.width * 2**i
            blocks = []
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (strides != 1 or in_ch != planes * block.expansion)
                blocks.append(block(planes, strides, downsample, dtype=self.dtype, name=f"layer{i + 1}_{j}",
                                    **groups))
                in_ch = planes * block.expansion
            x = stage(blocks[0], tuple(blocks[1:]), x, train)
            stages.append(x)
        return tuple(stages)


def stage_channels(name: str, width: int = 64) -> tuple[int, ...]:
    """Output channels of the four stages of a backbone."""
    expansion = 4 if BOTTLENECK[name] else 1
    return tuple(width * 2**i * expansion for i in range(4))


def _stage_of(path: tuple[str, ...]) -> int:
    """conv1 / bn1: the stem (0); layer{k}_{j}/...: stage k."""
    return int(path[0][len("layer")]) if path[0].startswith("layer") else 0


def infer_resnet(shapes: Mapping[str, tuple[int, ...]]) -> dict | None:
    """{'name', 'width', 'stage_sizes'} of a torchvision/timm ResNet state dict's shapes, or None."""
    stem = shapes.get("conv1.weight")
    sizes = tuple(len({k.split(".")[1] for k in shapes if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    if stem is None or not all(sizes):
        return None
    bottleneck = "layer1.0.conv3.weight" in shapes
    standard = [n for n in STAGE_SIZES if BOTTLENECK[n] == bottleneck and STAGE_SIZES[n] == sizes]
    name = standard[0] if standard else ("resnet50" if bottleneck else "resnet18")
    return {"name": name, "width": stem[0], "stage_sizes": () if standard else sizes}


BACKBONES = tuple(
    Backbone(name=name, build=functools.partial(ResNet, arch=name), width=64, stage_sizes=STAGE_SIZES[name],
             channels=lambda width, sizes, name=name: stage_channels(name, width), stage_of=_stage_of,
             infer=infer_resnet, torch_ignore=("fc.",), options=("remat", "bn_group_size", "bn_group_stats"))
    for name in STAGE_SIZES)
