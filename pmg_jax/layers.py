"""Layers that behave like their PyTorch counterparts: initialisation, explicit symmetric padding,
BatchNorm's statistics (biased to normalise, unbiased for the running variance), max pooling.

The operations themselves come from `pmg_jax.kernels`, which picks a platform's fast path or
plain XLA (`kernels.use`); the values are PyTorch's either way."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmg_jax import kernels

Dtype = Any


def torch_default_uniform(fan_in: int):
    """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torchvision's ResNet conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """Bias-free conv with explicit symmetric padding (PyTorch semantics), NHWC."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    torch_default_init: bool = False  # True: PyTorch's default init (new layers); False: torchvision ResNet init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        init = torch_default_uniform(fan_in) if self.torch_default_init else kaiming_fan_out
        kernel = self.param("kernel", init, (k, k, x.shape[-1], self.features))
        return kernels.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)


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
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if train:
            y, mean, var = kernels.batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * unbiased
            return y
        mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
        shift = bias - ra_mean.value * mul
        return (x * mul.astype(x.dtype) + shift.astype(x.dtype)).astype(self.dtype)


