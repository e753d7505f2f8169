"""Layers that behave like their PyTorch counterparts: initialisation, explicit symmetric padding,
BatchNorm's statistics (biased to normalise, unbiased for the running variance), max pooling.

The operations themselves come from `pmg_jax.kernels`, which picks a platform's fast path or
plain XLA (`kernels.use`); the values are PyTorch's either way."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmg_jax import kernels

Dtype = Any
GROUP_STATS = ("mean", "first")  # BatchNorm.group_stats: which running statistics ghost BatchNorm keeps


def torch_default_uniform(fan_in: int):
    """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torchvision's ResNet conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def checkpointed(fn: Callable, train_argnum: int) -> Callable:
    """`fn`, whose leading arguments are modules (named in the caller's scope), as one rematerialised region:
    nothing inside it is saved for the backward (jax.checkpoint's nothing_saveable policy), which recomputes
    it from the region's inputs. Its argument `train_argnum` is the static train flag."""
    return nn.remat(fn, static_argnums=(train_argnum,), policy=jax.checkpoint_policies.nothing_saveable)


class Conv(nn.Module):
    """Conv with explicit symmetric padding (PyTorch semantics), NHWC; bias-free unless `bias`."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    torch_default_init: bool = False  # True: PyTorch's default init (new layers); False: torchvision ResNet init
    dtype: Dtype = jnp.float32
    bias: bool = False  # a bias, PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        init = torch_default_uniform(fan_in) if self.torch_default_init else kaiming_fan_out
        kernel = self.param("kernel", init, (k, k, x.shape[-1], self.features))
        y = kernels.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
        if self.bias:
            y = y + self.param("bias", torch_default_uniform(fan_in), (self.features,)).astype(self.dtype)
        return y


class Linear(nn.Module):
    """Dense layer with PyTorch's default init for weight and bias."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_default_uniform(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with PyTorch's statistics.

    Normalises with the biased batch variance but updates the running variance with
    the unbiased one, as torch.nn.BatchNorm does; `momentum` is PyTorch's (weight of
    the new batch). Statistics are computed in at least float32 whatever the compute dtype.
    Under jit over a sharded batch the reductions are global (synchronised BN).

    `group_size` > 0 is ghost BatchNorm: in training the batch (leading axis) is cut into
    consecutive groups of that many examples, each normalised with its own statistics, as
    each GPU of an nn.DataParallel run normalised its share. The running statistics are then
    updated once, from the groups' statistics (each group's mean and unbiased variance):
    their mean over the groups (`group_stats='mean'`: every example counts, and the running
    variance tracks the within-group variance the groups were normalised with) or those of
    the first group (`'first'`: what nn.DataParallel kept, GPU 0's replica).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    group_size: int = 0
    group_stats: str = "mean"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if train:
            if self.group_size:
                y, mean, unbiased = self._grouped(x, scale, bias)
            else:
                y, mean, var = kernels.batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * unbiased
            return y
        mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
        shift = bias - ra_mean.value * mul
        return (x * mul.astype(x.dtype) + shift.astype(x.dtype)).astype(self.dtype)

    def _grouped(self, x: jax.Array, scale: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Ghost BatchNorm: (output, mean, unbiased variance) for the running statistics."""
        g, b = self.group_size, x.shape[0]
        if b % g:
            raise ValueError(f"BatchNorm group_size={g} does not divide the batch of {b}")
        if self.group_stats not in GROUP_STATS:
            raise ValueError(f"BatchNorm group_stats must be one of {GROUP_STATS}, got {self.group_stats!r}")
        groups = x.reshape(b // g, g, *x.shape[1:])
        y, mean, var = jax.vmap(
            lambda xg: kernels.batch_norm_train(xg, scale, bias, self.epsilon, jnp.dtype(self.dtype))
        )(groups)
        n = math.prod(groups.shape[1:-1])
        unbiased = var * (n / max(n - 1, 1))
        if self.group_stats == "first":
            return y.reshape(x.shape), mean[0], unbiased[0]
        return y.reshape(x.shape), jnp.mean(mean, axis=0), jnp.mean(unbiased, axis=0)


def split_tiles(x: jax.Array, n: int) -> jax.Array:
    """NHWC `x` cut into n x n equal tiles stacked along the batch: tile (i, j) (row i, column j) of every
    image, for i then j, is batch block i * n + j (PMG-V2's block convolution order). n <= 1: `x` itself."""
    if n <= 1:
        return x
    b, h, w, c = x.shape
    tiles = x.reshape(b, n, h // n, n, w // n, c).transpose(1, 3, 0, 2, 4, 5)  # (i, j, b, tile h, tile w, c)
    return tiles.reshape(n * n * b, h // n, w // n, c)


def stitch_tiles(y: jax.Array, n: int) -> jax.Array:
    """The inverse of `split_tiles`: the n x n tiles stacked along the batch put back side by side."""
    if n <= 1:
        return y
    nb, th, tw, c = y.shape
    tiles = y.reshape(n, n, nb // (n * n), th, tw, c).transpose(2, 0, 3, 1, 4, 5)  # (b, i, tile h, j, tile w, c)
    return tiles.reshape(nb // (n * n), n * th, n * tw, c)
