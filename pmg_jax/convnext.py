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
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# timm's convnext_* variants: (blocks per stage, channels per stage).
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
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
        y = nn.Conv(c, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=c, dtype=self.dtype,
                    kernel_init=_init, name="conv_dw")(x)
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
            x = nn.Conv(self.dim, (2, 2), strides=2, padding="VALID", dtype=self.dtype, kernel_init=_init,
                        name="downsample_1")(x)
        for j, rate in enumerate(self.drop_path_rates):
            x = Block(rate, self.layer_scale_init, dtype=self.dtype, name=f"blocks_{j}")(x, train)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt trunk; returns the outputs of its four stages (strides 4, 8, 16, 32) as NHWC maps.

    `drop_path_rate` is the stochastic-depth rate of the last block; the rates rise
    linearly from 0 over all blocks, as timm's. `layer_scale_init=None` leaves out
    the layer scale. `VARIANTS` holds timm's depths and dims; any others make tiny test models.
    """

    depths: Sequence[int]
    dims: Sequence[int]
    drop_path_rate: float = 0.0
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 depths and 4 dims, got {tuple(self.depths)} and {tuple(self.dims)}")
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        x = nn.Conv(self.dims[0], (4, 4), strides=4, padding="VALID", dtype=self.dtype, kernel_init=_init,
                    name="stem_0")(x)
        x = layer_norm(self.dtype, "stem_1")(x)
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            x = Stage(dim, tuple(rates[start:start + depth]), downsample=i > 0, layer_scale_init=self.layer_scale_init,
                      dtype=self.dtype, name=f"stages_{i}")(x, train)
            start += depth
            stages.append(x)
        return tuple(stages)
