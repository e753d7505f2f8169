"""Platform fast paths for PMG's layers, behind one switch (`use`).

XLA:CPU runs some of PMG's operations far below memory or GEMM speed; these kernels compute the
same values faster there: the large 3x3 convolutions with Winograd's minimal filtering
(`winograd_conv3x3`, CPU only), 1x1 convolutions, train-mode BatchNorm and the stem's max pool
with hand-written gradients, and BatchNorm's channel sums in the form the compiler reduces
fastest. `pmg_jax.layers` calls `conv2d`, `batch_norm_train` and `max_pool`; which
implementation they trace is `current()`, set for a block of code (and so for whatever is traced
in it) with `use(...)`: "auto" (the default: the fast paths where they pay), "xla" (plain XLA
operations and JAX's own gradients everywhere), or a `Kernels` naming each choice (A/B runs).
The choice is made when a function is traced, and `jax.jit` reuses a function's trace whatever the
context is at its next call: bind the choice to the function with `traced` instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax import xla_options


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which implementation each fast path uses."""

    winograd: str = "auto"  # auto: 3x3 convolutions where use_winograd says it pays, on CPU | off
    channel_sum: str = "auto"  # auto (see channel_sum) | gemv | reduce
    gradients: str = "custom"  # custom: the hand-written gradients | autodiff: JAX's own

    def __post_init__(self):
        for field, allowed in (
            ("winograd", ("auto", "off")),
            ("channel_sum", ("auto", "gemv", "reduce")),
            ("gradients", ("custom", "autodiff")),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"kernels {field} must be one of {allowed}, got {getattr(self, field)!r}")


PRESETS = {"auto": Kernels(), "xla": Kernels(winograd="off", channel_sum="reduce", gradients="autodiff")}
_CURRENT: contextvars.ContextVar[Kernels] = contextvars.ContextVar("pmg_jax_kernels", default=PRESETS["auto"])


def resolve(choice: str | Kernels) -> Kernels:
    """A preset name ('auto', 'xla') or a Kernels, as a Kernels."""
    if isinstance(choice, Kernels):
        return choice
    if choice not in PRESETS:
        raise ValueError(f"kernels must be one of {tuple(PRESETS)} or a Kernels, got {choice!r}")
    return PRESETS[choice]


def current() -> Kernels:
    """The kernels that code traced now uses."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(choice: str | Kernels) -> Iterator[Kernels]:
    """Trace with these kernels inside the block."""
    token = _CURRENT.set(resolve(choice))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def traced(fn: Callable, choice: str | Kernels) -> Callable:
    """`fn` that traces its body with these kernels, whatever is current when it is traced (for jit)."""
    choice = resolve(choice)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use(choice):
            return fn(*args, **kwargs)

    return wrapped


def conv2d(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0) -> jax.Array:
    """NHWC x HWIO convolution with symmetric zero padding (PyTorch's `padding=`).

    With custom gradients, an unpadded 1x1 convolution (ResNet's bottleneck and downsample
    convolutions, the granularity blocks' first layer) goes through `pointwise_conv`, whose
    gradients are GEMMs. A 3x3 "same" convolution that `use_winograd` picks runs, on CPU only,
    as `winograd_conv3x3` (the same values to float32 rounding, a quarter of the multiplies);
    on other platforms, whose convolution libraries choose their own algorithms, and for every
    other convolution, it is `lax.conv_general_dilated`.
    """
    choice = current()
    if kernel.shape[:2] == (1, 1) and padding == 0 and choice.gradients == "custom":
        return pointwise_conv(x, kernel, strides)
    if choice.winograd == "auto" and use_winograd(x.shape, kernel.shape, strides, padding, x.dtype):
        return jax.lax.platform_dependent(x, kernel, cpu=winograd_conv3x3, default=_direct_conv3x3)
    return _direct_conv(x, kernel, strides, padding)


def _direct_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    p = padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _direct_conv(x, kernel, 1, 1)


# Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional
# Neural Networks", 2016), from the interpolation points 0, 1, -1, 2, -2 and infinity:
# a 4x4 output tile is A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d and 3x3 filter g.
_WINO_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
_WINO_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
_WINO_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)
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
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and strides == 1
        and padding == 1
        and jnp.dtype(dtype) == jnp.float32
        and min(c, kernel_shape[3]) >= WINOGRAD_MIN_CHANNELS
        and n * h * w >= WINOGRAD_MIN_PIXELS
    )


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
    return jnp.stack(
        [jnp.stack([_combine(_WINO_G[b], [r[j] for j in range(3)]) for b in range(_WINO_TILE)]) for r in rows]
    )


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


def channel_sum(a: jax.Array, form: str | None = None) -> jax.Array:
    """Sum of `a` (..., C) over every axis but the last, in `form` (default `current().channel_sum`).

    'auto': a plain reduction, which compilers fuse with the elementwise work that produces
    its input, except where the training step runs on an XLA:CPU without YNNPACK reductions
    (`xla_options.fast_reductions`), where it is `channel_sum_gemv`. (Train-mode BatchNorm runs
    in the training step only.) Where the forms differ, the one to use is chosen when the
    program is lowered (`lax.platform_dependent`), so one traced function serves every platform.
    """
    form = form or current().channel_sum
    if form == "gemv":
        return channel_sum_gemv(a)
    if form == "reduce" or xla_options.fast_reductions("cpu"):
        return channel_sum_reduce(a)
    return jax.lax.platform_dependent(a, cpu=channel_sum_gemv, default=channel_sum_reduce)


def batch_norm_train(x, scale, bias, epsilon: float, out_dtype):
    """Train-mode batch normalisation of `x` over every axis but the last.

    Returns (y, mean, var): the normalised output in `out_dtype` and the batch mean and
    biased variance in at least float32. Every reduction, forward and backward, is a
    `channel_sum`; with custom gradients the backward is the closed-form BatchNorm gradient,
    else JAX differentiates the forward.
    """
    choice = current()
    if choice.gradients == "autodiff":
        return _bn_forward(x, scale, bias, epsilon, out_dtype, choice.channel_sum)[:3]
    return _batch_norm_train(x, scale, bias, epsilon, out_dtype, choice.channel_sum)


# The channel-sum form is passed in rather than read from `current()` inside, so the rule's forward
# and backward (traced when JAX differentiates, maybe elsewhere) use the form chosen where it is called.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(x, scale, bias, epsilon: float, out_dtype, form: str):
    y, mean, var, _ = _bn_forward(x, scale, bias, epsilon, out_dtype, form)
    return y, mean, var


def _bn_forward(x, scale, bias, epsilon, out_dtype, form):
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 -> f32; f64 stays f64
    xf = x.astype(acc)
    n = math.prod(x.shape[:-1])
    mean = channel_sum(xf, form) / n
    var = channel_sum(jnp.square(xf - mean), form) / n  # two-pass: exact enough for parity
    rstd = jax.lax.rsqrt(var + epsilon)
    mul = scale.astype(acc) * rstd
    shift = bias.astype(acc) - mean * mul
    y = (x * mul.astype(x.dtype) + shift.astype(x.dtype)).astype(out_dtype)
    return y, mean, var, rstd


def _bn_fwd(x, scale, bias, epsilon, out_dtype, form):
    y, mean, var, rstd = _bn_forward(x, scale, bias, epsilon, out_dtype, form)
    return (y, mean, var), (x, scale, mean, rstd)


def _bn_bwd(epsilon, out_dtype, form, res, cotangents):
    x, scale, mean, rstd = res
    g, g_mean, g_var = cotangents
    acc = mean.dtype
    centred = x.astype(acc) - mean
    gf = g.astype(acc)
    n = math.prod(x.shape[:-1])
    d_bias = channel_sum(gf, form)
    d_scale = channel_sum(gf * centred, form) * rstd  # sum of g * x_hat
    mul = scale.astype(acc) * rstd
    # dx = mul * (g - mean(g) - x_hat * mean(g * x_hat)) plus the paths through the
    # returned statistics: d mean / dx = 1/n, d var / dx = 2 (x - mean) / n.
    coef = (2.0 * g_var - mul * rstd * d_scale) / n
    const = (g_mean - mul * d_bias) / n
    dx = gf * mul + centred * coef + const
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def _pool_taps(x: jax.Array, window: int, strides: int, padding: int):
    """The window*window strided views of `x` (NHWC, padded with -inf) that a max pool compares."""
    p, s = padding, strides
    # jnp.pad with a constant is the same HLO as lax.pad, and the form jax2onnx converts with a symbolic batch
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    ho = (x.shape[1] + 2 * p - window) // s + 1
    wo = (x.shape[2] + 2 * p - window) // s + 1
    taps = []
    for i in range(window):
        for j in range(window):
            taps.append(
                jax.lax.slice(
                    xp,
                    (0, i, j, 0),
                    (xp.shape[0], i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, xp.shape[3]),
                    (1, s, s, 1),
                )
            )
    return taps


def max_pool(x: jax.Array, window: int = 3, strides: int = 2, padding: int = 1) -> jax.Array:
    """Max pooling over square windows of NHWC `x`, padded with -inf (torch.nn.MaxPool2d).

    With custom gradients it is an elementwise maximum of strided views, with a backward that
    sends each output's gradient to the first maximum of its window in row-major order, as
    PyTorch does; XLA:CPU's own max-pool gradient (select-and-scatter with index iotas the size
    of the input) costs several times more at ResNet's stem. Else it is `lax.reduce_window`.
    """
    if current().gradients == "autodiff":
        pads = ((padding, padding), (padding, padding))
        # by keyword: while converting, jax2onnx swaps in an nn.max_pool that takes only keywords after x
        return nn.max_pool(x, window_shape=(window, window), strides=(strides, strides), padding=pads)
    return _max_pool(x, window, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: int = 3, strides: int = 2, padding: int = 1) -> jax.Array:
    out = None
    for tap in _pool_taps(x, window, strides, padding):
        out = tap if out is None else jnp.maximum(out, tap)
    return out


def _max_pool_fwd(x, window, strides, padding):
    out = _max_pool(x, window, strides, padding)
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
        part = _onto_grid(
            jnp.where(first, g, jnp.zeros((), g.dtype)),
            x.shape[1] + 2 * p,
            x.shape[2] + 2 * p,
            divmod(t, window),
            strides,
        )
        dx = part if dx is None else dx + part
    return (dx[:, p : p + x.shape[1], p : p + x.shape[2], :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
