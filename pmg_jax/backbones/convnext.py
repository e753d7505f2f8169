"""ConvNeXt ("A ConvNet for the 2020s", Liu et al. 2022) in Flax Linen, as timm's `convnext_*`, returning
the four stage maps.

Submodule names mirror timm's state-dict names (`stem_0`, `stages_1/downsample_1`,
`stages_2/blocks_4/mlp/fc1`, the layer scale `gamma` as a parameter), so that a timm
state dict maps onto the parameters by `pmg_jax.convert`'s mechanical rename. The
structure is timm's default (`conv_mlp=False`): every LayerNorm normalises each pixel
over its channels (eps 1e-6), which in NHWC is one and the same layer for timm's
`LayerNorm2d` (stem, downsampling) and channels-last `LayerNorm` (blocks). timm's
classifier head (`head.norm`, `head.fc`) and the identity `norm_pre` are not built:
PMG puts its own blocks and heads on the stage maps.

Parameters are float32 and computation is in `dtype`; LayerNorm statistics are always
at least float32. Stochastic depth (drop path) is active only with `train=True` and a
block rate above 0; it then draws from the 'dropout' RNG stream, so such calls need
`rngs={'dropout': key}`.

Registered as convnext_tiny / convnext_small / convnext_base: the registry's width is the
first stage's channels and its stage sizes the depths, the channels doubling at every stage
(as in all three), so config.model.width and stage_sizes make tiny ConvNeXts too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax.backbones.registry import Backbone, UnsupportedWeights
from pmg_jax.layers import split_tiles, stitch_tiles

# timm's convnext_* variants: (width = channels of the first stage, blocks per stage).
VARIANTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "convnext_tiny": (96, (3, 3, 9, 3)),
    "convnext_small": (96, (3, 3, 27, 3)),
    "convnext_base": (128, (3, 3, 27, 3)),
}

LN_EPS = 1e-6
# Conv and linear weights: std 0.02, zero biases, as timm's init (its trunc_normal_ cuts at +-2, i.e. 100 std;
# this one at 2 std). Only training from scratch sees it: PMG starts from ImageNet weights.
_init = nn.initializers.truncated_normal(0.02)


def layer_norm(dtype: Any, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the channels, its statistics two-pass and at least float32 whatever `dtype` (as torch's)."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zero whole samples of `x` with probability `rate` and scale the kept ones by 1 / (1 - rate) (timm's)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class Mlp(nn.Module):
    """Linear (4x) -> exact GELU -> Linear back, over the channels of NHWC `x` (timm's `mlp.fc1`, `mlp.fc2`)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_init, name="fc1")(x)
        y = nn.gelu(y, approximate=False)  # torch.nn.GELU's default is the erf form
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_init, name="fc2")(y)


class Block(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Mlp -> layer scale -> drop path, plus the input."""

    drop_path_rate: float = 0.0
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        y = nn.Conv(
            c,
            (7, 7),
            padding=((3, 3), (3, 3)),
            feature_group_count=c,
            dtype=self.dtype,
            kernel_init=_init,
            name="conv_dw",
        )(x)
        y = layer_norm(self.dtype, "norm")(y)
        y = Mlp(4 * c, dtype=self.dtype, name="mlp")(y)
        if self.layer_scale_init is not None:
            gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (c,))
            y = y * gamma.astype(y.dtype)
        if train and self.drop_path_rate > 0:
            y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
        return x + y


class Stage(nn.Module):
    """Optional LayerNorm + 2x2/2 conv downsampling (`downsample_0`, `downsample_1`), then the blocks."""

    dim: int
    drop_path_rates: Sequence[float]
    downsample: bool
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.downsample:
            x = layer_norm(self.dtype, "downsample_0")(x)
            x = nn.Conv(
                self.dim, (2, 2), strides=2, padding="VALID", dtype=self.dtype, kernel_init=_init, name="downsample_1"
            )(x)
        for j, rate in enumerate(self.drop_path_rates):
            x = Block(rate, self.layer_scale_init, dtype=self.dtype, name=f"blocks_{j}")(x, train)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt trunk; returns the outputs of its four stages (strides 4, 8, 16, 32) as NHWC maps.

    `drop_path_rate` is the stochastic-depth rate of the last block; the rates rise
    linearly from 0 over all blocks, as timm's. `layer_scale_init=None` leaves out
    the layer scale. `build` makes the registered ones (`VARIANTS`: timm's widths and depths).
    """

    depths: Sequence[int]
    dims: Sequence[int]
    drop_path_rate: float = 0.0
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32
    tiles: Sequence[int] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 depths and 4 dims, got {tuple(self.depths)} and {tuple(self.dims)}")
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        x = nn.Conv(
            self.dims[0], (4, 4), strides=4, padding="VALID", dtype=self.dtype, kernel_init=_init, name="stem_0"
        )(x)
        x = layer_norm(self.dtype, "stem_1")(x)
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            n = self.tiles[i] if i < len(self.tiles) else 0
            x = Stage(
                dim,
                tuple(rates[start : start + depth]),
                downsample=i > 0,
                layer_scale_init=self.layer_scale_init,
                dtype=self.dtype,
                name=f"stages_{i}",
            )(split_tiles(x, n), train)
            x = stitch_tiles(x, n)
            start += depth
            stages.append(x)
        return tuple(stages)


def stage_channels(width: int, stage_sizes: Sequence[int]) -> tuple[int, ...]:
    """Channels of each stage: `width`, doubling at every stage."""
    return tuple(width * 2**i for i in range(len(stage_sizes)))


def build(
    width: int,
    stage_sizes: Sequence[int],
    dtype: Any,
    name: str,
    drop_path_rate: float = 0.0,
    tiles: Sequence[int] = (),
) -> ConvNeXt:
    """The registry's constructor: a ConvNeXt of `stage_sizes` blocks whose channels start at `width`."""
    return ConvNeXt(
        tuple(stage_sizes), stage_channels(width, stage_sizes), drop_path_rate, dtype=dtype, tiles=tiles, name=name
    )


def _stage_of(path: tuple[str, ...]) -> int:
    """stem_*: the stem (0); stages_{i}/...: stage i + 1 (its downsampling included)."""
    return int(path[0][len("stages_") :]) + 1 if path[0].startswith("stages_") else 0


def _indices(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> set[str]:
    """The distinct components that follow `prefix` (which ends with a dot) in the names."""
    return {k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)}


def infer_convnext(shapes: Mapping[str, tuple[int, ...]]) -> dict | None:
    """{'name', 'width', 'stage_sizes'} of a timm ConvNeXt state dict's shapes, None for another family;
    UnsupportedWeights for the ConvNeXts this module does not build (conv-MLP, other channel ratios)."""
    if "stem.0.weight" not in shapes:
        return None
    depths = tuple(len(_indices(shapes, f"stages.{i}.blocks.")) for i in range(len(_indices(shapes, "stages."))))
    if len(depths) != 4 or not all(depths):
        raise UnsupportedWeights(f"a ConvNeXt without 4 stages of blocks (blocks per stage {depths})")
    if len(shapes.get("stages.0.blocks.0.mlp.fc1.weight", ())) != 2:
        raise UnsupportedWeights(
            "a ConvNeXt with 1x1-convolution MLPs (timm's conv_mlp=True, e.g. convnext_atto to "
            "convnext_nano): only the Linear-MLP form (conv_mlp=False, the default) is supported"
        )
    dims = tuple(shapes[f"stages.{i}.blocks.0.conv_dw.weight"][0] for i in range(4))
    if dims != stage_channels(dims[0], depths):
        raise UnsupportedWeights(
            f"a ConvNeXt with channels {dims}: only those that double at every stage (width x 1, 2, 4, 8) are supported"
        )
    name = next((n for n, v in VARIANTS.items() if v == (dims[0], depths)), None)
    return {"name": name or "convnext_tiny", "width": dims[0], "stage_sizes": () if name else depths}


BACKBONES = tuple(
    Backbone(
        name=name,
        build=build,
        width=width,
        stage_sizes=depths,
        channels=stage_channels,
        stage_of=_stage_of,
        infer=infer_convnext,
        torch_ignore=("head.", "norm_pre."),
        options=("drop_path_rate", "tiles"),
    )
    for name, (width, depths) in VARIANTS.items()
)
