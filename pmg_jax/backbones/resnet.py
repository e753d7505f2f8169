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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmg_jax.backbones.registry import Backbone, UnsupportedWeights
from pmg_jax.kernels import max_pool
from pmg_jax.layers import BatchNorm, Conv, checkpointed, split_tiles, stitch_tiles

STAGE_SIZES: dict[str, tuple[int, ...]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}
BOTTLENECK = {"resnet18": False, "resnet34": False, "resnet50": True, "resnet101": True, "resnet152": True}
# timm's ResNet-D variants (deep stem, average-pool shortcut) and the ResNet whose blocks they share.
RESNET_D = {
    "resnet18d": "resnet18",
    "resnet34d": "resnet34",
    "resnet50d": "resnet50",
    "resnet101d": "resnet101",
    "resnet152d": "resnet152",
}


def base_arch(arch: str) -> str:
    """The torchvision ResNet whose block type and counts `arch` has (itself, or a ResNet-D's base)."""
    return RESNET_D.get(arch, arch)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) of NHWC `x`.

    An odd side gets a last window of one row (column), averaged over what it covers.
    """
    pad = [(0, x.shape[1] % 2), (0, x.shape[2] % 2)]
    return nn.avg_pool(x, (2, 2), (2, 2), pad, count_include_pad=False).astype(x.dtype)


def shortcut(
    x: jax.Array, features: int, strides: int, avg_down: bool, train: bool, dtype: Any, bn: Callable[[str], BatchNorm]
) -> jax.Array:
    """The downsampling shortcut, made in the calling block's scope so its names sit beside the block's own.

    torchvision: a 1x1 conv with the stride and BN (`downsample_0`, `downsample_1`). ResNet-D
    (`avg_down`): a 2x2 average pool where strided (timm's `downsample.0`, no parameters), then
    a stride-1 1x1 conv and BN (`downsample_1`, `downsample_2`). `bn(name)` makes the block's BatchNorm.
    """
    if avg_down:
        x = avg_pool_ceil(x) if strides > 1 else x
        x = Conv(features, 1, dtype=dtype, name="downsample_1")(x)
        return bn(name="downsample_2")(x, train)
    x = Conv(features, 1, strides, dtype=dtype, name="downsample_0")(x)
    return bn(name="downsample_1")(x, train)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet18/34)."""

    planes: int
    strides: int
    downsample: bool
    dtype: Any = jnp.float32
    avg_down: bool = False  # ResNet-D's average-pool shortcut
    bn_group_size: int = 0
    bn_group_stats: str = "mean"
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = functools.partial(
            BatchNorm, momentum=0.1, dtype=self.dtype, group_size=self.bn_group_size, group_stats=self.bn_group_stats
        )
        y = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y, train))
        y = Conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
        y = bn(name="bn2")(y, train)
        if self.downsample:
            x = shortcut(x, self.planes, self.strides, self.avg_down, train, self.dtype, bn)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carrying the stride, torchvision v1.5) -> 1x1 x4 (ResNet50+)."""

    planes: int
    strides: int
    downsample: bool
    dtype: Any = jnp.float32
    avg_down: bool = False  # ResNet-D's average-pool shortcut
    bn_group_size: int = 0
    bn_group_stats: str = "mean"
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = functools.partial(
            BatchNorm, momentum=0.1, dtype=self.dtype, group_size=self.bn_group_size, group_stats=self.bn_group_stats
        )
        y = Conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y, train))
        y = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(bn(name="bn2")(y, train))
        y = Conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y)
        y = bn(name="bn3")(y, train)
        if self.downsample:
            x = shortcut(x, self.planes * 4, self.strides, self.avg_down, train, self.dtype, bn)
        return nn.relu(y + x)


def _stem(first: Conv, rest: tuple[Conv, ...], bns: tuple[BatchNorm, ...], x: jax.Array, train: bool) -> jax.Array:
    """Each conv (`first`, then `rest`), its BN and a ReLU in turn, then the 3x3 stride-2 max pool."""
    for conv, bn in zip((first, *rest), bns, strict=True):
        x = nn.relu(bn(conv(x), train))
    return max_pool(x, 3, 2, 1)


def _stage(first: nn.Module, rest: tuple[nn.Module, ...], x: jax.Array, train: bool) -> jax.Array:
    """The residual blocks of one stage in turn."""
    x = first(x, train)
    for block in rest:
        x = block(x, train)
    return x


class ResNet(nn.Module):
    """ResNet trunk; returns (layer1, layer2, layer3, layer4) NHWC maps.

    `width` is the stem/first-stage width (64 in torchvision and timm; small values give
    tiny test models; a ResNet-D's deep stem starts at width/2, timm's `stem_width`),
    `stage_sizes` overrides the blocks per stage of `arch`. `remat` recomputes the stem and
    each stage in the backward from the map it reads (only stage outputs are saved; the modules
    keep their names); `bn_group_size` / `bn_group_stats` go to every BatchNorm. `tiles[i]` > 1 runs
    stage i + 1 on that many squared tiles of its input and stitches them back (PMG-V2; 0: untiled).
    """

    arch: str = "resnet50"
    width: int = 64
    stage_sizes: Sequence[int] | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    bn_group_size: int = 0
    bn_group_stats: str = "mean"
    tiles: Sequence[int] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        base = base_arch(self.arch)
        block = Bottleneck if BOTTLENECK[base] else BasicBlock
        sizes = tuple(self.stage_sizes or STAGE_SIZES[base])
        avg_down = self.arch in RESNET_D
        groups = {"bn_group_size": self.bn_group_size, "bn_group_stats": self.bn_group_stats}
        bn = functools.partial(
            BatchNorm, momentum=0.1, dtype=self.dtype, group_size=self.bn_group_size, group_stats=self.bn_group_stats
        )
        stem, stage = (checkpointed(_stem, 4), checkpointed(_stage, 3)) if self.remat else (_stem, _stage)
        if avg_down:  # timm's deep stem `conv1`: 3x3/2 conv, BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv (indices 0-6)
            half = self.width // 2
            convs = (
                Conv(half, 3, 2, 1, dtype=self.dtype, name="conv1_0"),
                Conv(half, 3, 1, 1, dtype=self.dtype, name="conv1_3"),
                Conv(self.width, 3, 1, 1, dtype=self.dtype, name="conv1_6"),
            )
            bns = (bn(name="conv1_1"), bn(name="conv1_4"), bn(name="bn1"))
        else:
            convs, bns = (Conv(self.width, 7, 2, 3, dtype=self.dtype, name="conv1"),), (bn(name="bn1"),)
        x = stem(convs[0], convs[1:], bns, x, train)
        stages = []
        in_ch = self.width
        for i, n_blocks in enumerate(sizes):
            planes = self.width * 2**i
            blocks = []
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (strides != 1 or in_ch != planes * block.expansion)
                blocks.append(
                    block(
                        planes,
                        strides,
                        downsample,
                        dtype=self.dtype,
                        avg_down=avg_down,
                        name=f"layer{i + 1}_{j}",
                        **groups,
                    )
                )
                in_ch = planes * block.expansion
            n = self.tiles[i] if i < len(self.tiles) else 0
            x = stitch_tiles(stage(blocks[0], tuple(blocks[1:]), split_tiles(x, n), train), n)
            stages.append(x)
        return tuple(stages)


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
        raise UnsupportedWeights(
            "a timm ResNet with "
            + (
                "a deep stem but a strided-conv shortcut (resnet*c)"
                if deep_stem
                else "an average-pool shortcut but a 7x7 stem"
            )
            + ": only torchvision's ResNet and ResNet-D (deep stem and average-pool shortcut)"
        )
    if deep_stem:
        stem = tuple(shapes.get(f"conv1.{i}.weight", (0,))[0] for i in (0, 3, 6))
        if stem != (stem[2] // 2, stem[2] // 2, stem[2]):
            raise UnsupportedWeights(
                f"a timm ResNet whose deep stem has {stem} channels: only ResNet-D's "
                f"(width/2, width/2, width) is supported"
            )
    width = shapes["conv1.6.weight" if deep_stem else "conv1.weight"][0]
    bottleneck = "layer1.0.conv3.weight" in shapes
    standard = [n for n in STAGE_SIZES if BOTTLENECK[n] == bottleneck and STAGE_SIZES[n] == sizes]
    name = standard[0] if standard else ("resnet50" if bottleneck else "resnet18")
    return {"name": f"{name}d" if deep_stem else name, "width": width, "stage_sizes": () if standard else sizes}


BACKBONES = tuple(
    Backbone(
        name=name,
        build=functools.partial(ResNet, arch=name),
        width=64,
        stage_sizes=STAGE_SIZES[base_arch(name)],
        channels=lambda width, sizes, name=name: stage_channels(name, width),
        stage_of=_stage_of,
        infer=infer_resnet,
        torch_ignore=("fc.",),
        options=("remat", "bn_group_size", "bn_group_stats", "tiles"),
    )
    for name in (*STAGE_SIZES, *RESNET_D)
)
