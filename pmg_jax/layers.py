"""Layers that behave like their PyTorch counterparts (init, BatchNorm statistics, max-pool
gradients), with gradients written for XLA:CPU speed where its own are slow, and the large
3x3 convolutions computed on CPU with Winograd's minimal filtering (`winograd_conv3x3`)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from pmg_jax import xla_options

Dtype = Any


def torch_default_uniform(fan_in: int):
    """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torchvision's ResNet conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0) -> jax.Array:
    """NHWC x HWIO convolution with symmetric zero padding (PyTorch's `padding=`).

    An unpadded 1x1 convolution (ResNet's bottleneck and downsample convolutions, the
    granularity blocks' first layer) goes through `pointwise_conv`, whose gradients are
    GEMMs. A 3x3 "same" convolution that `use_winograd` picks runs, on CPU only, as
    `winograd_conv3x3` (the same values to float32 rounding, a quarter of the multiplies);
    on other platforms, whose convolution libraries choose their own algorithms, and for
    every other convolution, it is `lax.conv_general_dilated`.
    """
    if kernel.shape[:2] == (1, 1) and padding == 0:
        return pointwise_conv(x, kernel, strides)
    if use_winograd(x.shape, kernel.shape, strides, padding, x.dtype):
        return jax.lax.platform_dependent(x, kernel, cpu=winograd_conv3x3, default=_direct_conv3x3)
    return _direct_conv(x, kernel, strides, padding)


def _direct_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    p = padding
    return jax.lax.conv_general_dilated(
        x, kernel,
        window_strides=(strides, strides),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _direct_conv(x, kernel, 1, 1)


# Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional
# Neural Networks", 2016), from the interpolation points 0, 1, -1, 2, -2 and infinity:
# a 4x4 output tile is A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d and 3x3 filter g.
_WINO_BT = np.array([[4, 0, -5, 0, 1, 0],
                     [0, -4, -4, 1, 1, 0],
                     [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0],
                     [0, 4, 0, -5, 0, 1]], np.float64)
_WINO_G = np.array([[1 / 4, 0, 0],
                    [-1 / 6, -1 / 6, -1 / 6],
                    [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6],
                    [0, 0, 1]], np.float64)
_WINO_AT = np.array([[1, 1, 1, 1, 1, 0],
                     [0, 1, -1, 2, -2, 0],
                     [0, 1, 1, 4, 4, 0],
                     [0, 1, -1, 8, -8, 1]], np.float64)
_WINO_OUT, _WINO_TILE = _WINO_AT.shape

# Where `winograd_conv3x3` beats XLA:CPU's Eigen convolution (bench/RESULTS.md, "Speed work"):
# float32, at least this many input and output channels, and at least this many output
# pixels (batch x height x width), so that the transforms' memory traffic and the kernel
# transform are paid for by the multiplies saved.
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_PIXELS = 3136  # 4 x 28 x 28


def use_winograd(x_shape, kernel_shape, strides: int, padding: int, dtype) -> bool:
    """Whether `conv2d` computes this convolution with `winograd_conv3x3` on CPU."""
    n, h, w, c = x_shape
    return (tuple(kernel_shape[:2]) == (3, 3) and strides == 1 and padding == 1
            and jnp.dtype(dtype) == jnp.float32
            and min(c, kernel_shape[3]) >= WINOGRAD_MIN_CHANNELS and n * h * w >= WINOGRAD_MIN_PIXELS)


def _combine(coefficients, parts):
    """sum_i coefficients[i] * parts[i], skipping zero terms (the transforms are sparse)."""
    total = None
    for c, part in zip(coefficients, parts):
        if c == 0:
            continue
        term = part if c == 1 else -part if c == -1 else part * jnp.asarray(c, part.dtype)
        total = term if total is None else total + term
    return total


def _tiles_along(x: jax.Array, axis: int, count: int):
    """The _WINO_TILE strided views of `x` along `axis` whose k-th row of tile t is row 4t + k."""
    return [jax.lax.slice_in_dim(x, k, k + (count - 1) * _WINO_OUT + 1, _WINO_OUT, axis) for k in range(_WINO_TILE)]


def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """G g G^T of a (3, 3, C, K) kernel: the (6, 6, C, K) filters in the Winograd domain."""
    rows = [_combine(_WINO_G[a], [kernel[i] for i in range(3)]) for a in range(_WINO_TILE)]
    return jnp.stack([jnp.stack([_combine(_WINO_G[b], [r[j] for j in range(3)]) for b in range(_WINO_TILE)])
                      for r in rows])


@jax.custom_vjp
def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3 convolution with stride 1 and zero padding 1 of NHWC `x` by a HWIO `kernel`,
    computed with Winograd's F(4x4, 3x3): 36 GEMMs of (tiles, C) x (C, K) instead of the
    direct convolution's 144 multiplies per 4x4 output tile.

    The transforms are sparse sums of strided views that XLA fuses. Float32 error is about
    ten times the direct convolution's (about 1e-5 of the output's scale; tests check it).
    The input gradient is the same kind of convolution (of the output gradient by the kernel
    flipped in space, its channel axes swapped) and is computed the same way; the kernel
    gradient is the direct convolution's. Autodiff through the transforms ran 3-5x slower.
    """
    return _winograd(x, winograd_kernel(kernel), transposed=False)


def _winograd(x: jax.Array, u: jax.Array, transposed: bool) -> jax.Array:
    """The F(4x4, 3x3) convolution of NHWC `x` by the Winograd-domain filters `u` (6, 6, C, K)
    (`winograd_kernel`); with `transposed`, by the filters with C and K swapped (x then has K
    channels and the result C), which the GEMMs do without moving `u`."""
    n, h, w, c = x.shape
    k_out = u.shape[2] if transposed else u.shape[3]
    contract = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    th, tw = -(-h // _WINO_OUT), -(-w // _WINO_OUT)  # output tiles per column, per row
    # 1 of zero padding on each side, plus enough at the end to fill the last tiles
    xp = jnp.pad(x, ((0, 0), (1, th * _WINO_OUT - h + 1), (1, tw * _WINO_OUT - w + 1), (0, 0)))
    rows = _tiles_along(xp, 1, th)
    m = {}
    for a in range(_WINO_TILE):
        cols = _tiles_along(_combine(_WINO_BT[a], rows), 2, tw)
        for b in range(_WINO_TILE):
            v = _combine(_WINO_BT[b], cols).reshape(n * th * tw, c)
            m[a, b] = jax.lax.dot_general(v, u[a, b], contract).reshape(n, th, tw, k_out)
    out_rows = []
    for i in range(_WINO_OUT):
        partial = [_combine(_WINO_AT[i], [m[a, b] for a in range(_WINO_TILE)]) for b in range(_WINO_TILE)]
        out_rows.append(jnp.stack([_combine(_WINO_AT[j], partial) for j in range(_WINO_OUT)], axis=3))
    y = jnp.stack(out_rows, axis=2)  # (n, th, 4, tw, 4, k_out)
    return y.reshape(n, th * _WINO_OUT, tw * _WINO_OUT, k_out)[:, :h, :w]


def _winograd_fwd(x, kernel):
    return winograd_conv3x3(x, kernel), (x, kernel)


def _winograd_bwd(res, g):
    x, kernel = res
    # the transpose of a stride-1 "same" 3x3 convolution: the kernel flipped in space, its
    # channel axes swapped; the swap happens inside the GEMMs (measured 1.1-1.65x faster than
    # XLA's own input gradient at the shapes use_winograd picks, and slower with an explicit transpose)
    dx = _winograd(g, winograd_kernel(jnp.flip(kernel, (0, 1))), transposed=True).astype(x.dtype)
    _, kernel_vjp = jax.vjp(lambda k: _direct_conv3x3(x, k), kernel)
    return dx, kernel_vjp(g)[0]


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def _contract_rows(a: jax.Array, b: jax.Array, acc) -> jax.Array:
    """a^T b over every axis but the last: (..., C) x (..., D) -> (C, D), as one 2-d GEMM.

    Written on 2-d views because XLA:CPU hands a 2-d dot that contracts the leading axis
    straight to Eigen, whereas a dot that contracts several axes is first rewritten around
    a physical transpose of both operands.
    """
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def _subsample(x: jax.Array, strides: int) -> jax.Array:
    """Every `strides`-th row and column of NHWC `x` from the first: the grid a stride samples."""
    return x[:, ::strides, ::strides, :] if strides > 1 else x


def _onto_grid(values: jax.Array, height: int, width: int, offset: tuple[int, int], strides: int) -> jax.Array:
    """Transpose of strided sampling: NHWC `values` placed every `strides` rows and columns,
    from `offset`, on a zero (height, width) grid (interior and edge padding, no scatter)."""
    zero = jnp.zeros((), values.dtype)
    config = [(0, 0, 0)]
    for full, taken, start in ((height, values.shape[1], offset[0]), (width, values.shape[2], offset[1])):
        config.append((start, full - start - ((taken - 1) * strides + 1), strides - 1))
    return jax.lax.pad(values, zero, config + [(0, 0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: int = 1) -> jax.Array:
    """A 1x1 convolution (kernel (1, 1, C, D)) with stride `strides`, as a matmul.

    The custom gradient exists for speed, not for different values: autodiff of a
    convolution gives XLA:CPU a kernel-gradient convolution for which it first transposes
    both activations into (C, H, W, N) order, fused into the BatchNorm backward, at a
    fraction of memory speed. Here the kernel gradient is one GEMM that contracts the
    leading axis of 2-d views of the NHWC activations, which needs no transpose.
    """
    return jnp.einsum("bhwc,cd->bhwd", _subsample(x, strides), kernel[0, 0])


def _pointwise_fwd(x, kernel, strides):
    return pointwise_conv(x, kernel, strides), (x, kernel)


def _pointwise_bwd(strides, res, g):
    x, kernel = res
    acc = jnp.promote_types(g.dtype, jnp.float32)
    d_kernel = _contract_rows(_subsample(x, strides), g, acc).astype(kernel.dtype)[None, None]
    d_xs = jnp.einsum("bhwd,cd->bhwc", g, kernel[0, 0]).astype(x.dtype)
    if strides > 1:
        d_xs = _onto_grid(d_xs, x.shape[1], x.shape[2], (0, 0), strides)
    return d_xs, d_kernel


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


def _sum_rows(a: jax.Array) -> jax.Array:
    return jnp.dot(jnp.ones((a.shape[0],), a.dtype), a, precision=jax.lax.Precision.HIGHEST)


def channel_sum_gemv(a: jax.Array) -> jax.Array:
    """Sum of `a` (..., C) over every axis but the last, as matrix-vector products.

    XLA:CPU lowers a reduction over the leading axes of an NHWC activation as a tree of
    reduce-windows that runs 10-20x slower than reading the array once; a GEMV with a
    vector of ones reads it once, at memory speed. A 4-d array is summed in two levels,
    over (N, H) for every (W, C) and then over W, so that each sum adds about sqrt(N*H*W)
    terms rather than all of them: float32 rounding stays close to a pairwise tree's.
    """
    if a.ndim == 4:
        partial = _sum_rows(a.reshape(a.shape[0] * a.shape[1], a.shape[2] * a.shape[3]))
        return _sum_rows(partial.reshape(a.shape[2], a.shape[3]))
    return _sum_rows(a.reshape(-1, a.shape[-1]))


def channel_sum_reduce(a: jax.Array) -> jax.Array:
    """Sum of `a` (..., C) over every axis but the last, as one XLA reduction."""
    return jnp.sum(a, axis=tuple(range(a.ndim - 1)))


def channel_sum(a: jax.Array) -> jax.Array:
    """Sum of `a` (..., C) over every axis but the last: a plain reduction, which compilers
    fuse with the elementwise work that produces its input, except where the training step
    runs on an XLA:CPU without YNNPACK reductions (`xla_options.fast_reductions`), where it is
    `channel_sum_gemv`. (Train-mode BatchNorm runs in the training step only.)

    Where the forms differ, the one to use is chosen when the program is lowered
    (`lax.platform_dependent`), so one traced function serves every platform.
    """
    if xla_options.fast_reductions("cpu"):
        return channel_sum_reduce(a)
    return jax.lax.platform_dependent(a, cpu=channel_sum_gemv, default=channel_sum_reduce)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, out_dtype):
    """Train-mode batch normalisation of `x` over every axis but the last.

    Returns (y, mean, var): the normalised output in `out_dtype` and the batch mean and
    biased variance in at least float32. Every reduction, forward and backward, is a
    `channel_sum`; the backward is the closed-form BatchNorm gradient.
    """
    y, mean, var, _ = _bn_forward(x, scale, bias, epsilon, out_dtype)
    return y, mean, var


def _bn_forward(x, scale, bias, epsilon, out_dtype):
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 -> f32; f64 stays f64
    xf = x.astype(acc)
    n = math.prod(x.shape[:-1])
    mean = channel_sum(xf) / n
    var = channel_sum(jnp.square(xf - mean)) / n  # two-pass: exact enough for parity
    rstd = jax.lax.rsqrt(var + epsilon)
    mul = scale.astype(acc) * rstd
    shift = bias.astype(acc) - mean * mul
    y = (x * mul.astype(x.dtype) + shift.astype(x.dtype)).astype(out_dtype)
    return y, mean, var, rstd


def _bn_fwd(x, scale, bias, epsilon, out_dtype):
    y, mean, var, rstd = _bn_forward(x, scale, bias, epsilon, out_dtype)
    return (y, mean, var), (x, scale, mean, rstd)


def _bn_bwd(epsilon, out_dtype, res, cotangents):
    x, scale, mean, rstd = res
    g, g_mean, g_var = cotangents
    acc = mean.dtype
    centred = x.astype(acc) - mean
    gf = g.astype(acc)
    n = math.prod(x.shape[:-1])
    d_bias = channel_sum(gf)
    d_scale = channel_sum(gf * centred) * rstd  # sum of g * x_hat
    mul = scale.astype(acc) * rstd
    # dx = mul * (g - mean(g) - x_hat * mean(g * x_hat)) plus the paths through the
    # returned statistics: d mean / dx = 1/n, d var / dx = 2 (x - mean) / n.
    coef = (2.0 * g_var - mul * rstd * d_scale) / n
    const = (g_mean - mul * d_bias) / n
    dx = gf * mul + centred * coef + const
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


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
        return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)


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
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))
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


def _pool_taps(x: jax.Array, window: int, strides: int, padding: int):
    """The window*window strided views of `x` (NHWC, padded with -inf) that a max pool compares."""
    p, s = padding, strides
    # jnp.pad with a Python constant: the same HLO as lax.pad, and the form jax2onnx (0.17) converts
    # with a symbolic batch (its lax.pad rule requires static shapes), for pmg_jax.export
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    ho = (x.shape[1] + 2 * p - window) // s + 1
    wo = (x.shape[2] + 2 * p - window) // s + 1
    taps = []
    for i in range(window):
        for j in range(window):
            taps.append(jax.lax.slice(
                xp, (0, i, j, 0), (xp.shape[0], i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, xp.shape[3]),
                (1, s, s, 1)))
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int = 3, strides: int = 2, padding: int = 1) -> jax.Array:
    """Max pooling over square windows of NHWC `x`, padded with -inf (torch.nn.MaxPool2d).

    Written as an elementwise maximum of strided views, with a backward that sends each
    output's gradient to the first maximum of its window in row-major order, as PyTorch
    does. XLA:CPU's own max-pool gradient (select-and-scatter with index iotas the size
    of the input) costs several times more at ResNet's stem.
    """
    out = None
    for tap in _pool_taps(x, window, strides, padding):
        out = tap if out is None else jnp.maximum(out, tap)
    return out


def _max_pool_fwd(x, window, strides, padding):
    out = max_pool(x, window, strides, padding)
    return out, (x, out)


def _max_pool_bwd(window, strides, padding, res, g):
    x, out = res
    p = padding
    taken = jnp.zeros(out.shape, bool)
    dx = None
    for t, tap in enumerate(_pool_taps(x, window, strides, padding)):
        first = (tap == out) & ~taken
        taken = taken | first
        # place the output-grid values back on the padded input grid, then crop the padding
        part = _onto_grid(jnp.where(first, g, jnp.zeros((), g.dtype)), x.shape[1] + 2 * p, x.shape[2] + 2 * p,
                          divmod(t, window), strides)
        dx = part if dx is None else dx + part
    return (dx[:, p:p + x.shape[1], p:p + x.shape[2], :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
