"""The hand-written gradients in pmg_jax.kernels give the same values as autodiff / PyTorch.

conv2d's 1x1 path, its Winograd 3x3 path, batch_norm_train and max_pool have custom VJPs
for XLA:CPU speed; these tests compare them in float64 with the formulations they replace,
and the max pool with PyTorch (which sends a window's gradient to its first maximum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from truth import assert_near_truth

from pmg_jax import kernels


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _vjp(f, args, cotangent):
    """f's value and its vector-Jacobian product, as one compiled program (op by op, every new shape of every
    operation would compile on its own)."""

    def value_and_vjp(args, cotangent):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cotangent)

    return jax.jit(value_and_vjp)(args, cotangent)


@pytest.mark.parametrize(
    "shape,features,strides",
    [
        ((2, 7, 9, 5), 3, 1),
        ((2, 7, 9, 5), 3, 2),
        pytest.param((3, 8, 8, 4), 6, 2, marks=pytest.mark.slow),  # strides 2 again, larger
        ((1, 5, 6, 2), 3, 3),
    ],
)
def test_pointwise_conv_matches_lax_conv_and_its_gradients(shape, features, strides):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape, jnp.float64)
    w = jax.random.normal(kw, (1, 1, shape[-1], features), jnp.float64)

    def reference(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (strides, strides), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    want = reference(x, w)
    g = jax.random.normal(kg, want.shape, jnp.float64)
    _, (dx_want, dw_want) = _vjp(reference, (x, w), g)
    got, (dx, dw) = _vjp(lambda x, w: kernels.conv2d(x, w, strides, 0), (x, w), g)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(dx, dx_want, atol=1e-12)
    np.testing.assert_allclose(dw, dw_want, atol=1e-12)
    assert dx.shape == x.shape and dw.shape == w.shape


def _bn_reference(x, scale, bias, eps=1e-5):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("shape", [(3, 5, 6, 4), (7, 9)])
def test_batch_norm_train_matches_autodiff_of_the_textbook_formula(shape):
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    x = jax.random.normal(keys[0], shape, jnp.float64) * 3 + 1
    scale, bias = (jax.random.normal(k, shape[-1:], jnp.float64) for k in keys[1:3])
    # cotangents for y and for the returned mean and variance (all three paths)
    cts = (
        jax.random.normal(keys[3], shape, jnp.float64),
        jax.random.normal(keys[4], shape[-1:], jnp.float64),
        jax.random.normal(keys[5], shape[-1:], jnp.float64),
    )
    want, grads_want = _vjp(_bn_reference, (x, scale, bias), cts)
    got, grads = _vjp(
        lambda x, s, b: kernels.batch_norm_train(x, s, b, 1e-5, jnp.dtype(jnp.float64)), (x, scale, bias), cts
    )
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for a, b in zip(grads, grads_want):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_batch_norm_statistics_stay_accurate_in_float32():
    """The two-level channel sums keep float32 BN statistics near float64 on a large map."""
    with jax.enable_x64(False):
        x = jax.random.normal(jax.random.PRNGKey(2), (8, 56, 56, 16), jnp.float32) * 2 + 5
        _, mean, var = kernels.batch_norm_train(x, jnp.ones(16), jnp.zeros(16), 1e-5, jnp.dtype(jnp.float32))
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=2e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=2e-5)


@pytest.mark.parametrize("form", [kernels.channel_sum_gemv, kernels.channel_sum_reduce])
def test_both_channel_sum_forms_are_accurate_in_float32(form):
    """The GEMV form (XLA:CPU without YNNPACK reductions) and the plain reduction sum a large map alike."""
    with jax.enable_x64(False):
        x = jax.random.normal(jax.random.PRNGKey(3), (8, 56, 56, 16), jnp.float32) + 3
        got = np.asarray(jax.jit(form)(x))
        flat = np.asarray(jax.jit(form)(x.reshape(-1, 16)))
    want = np.asarray(x, np.float64).sum((0, 1, 2))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(flat, want, rtol=1e-5)  # one level of 25088 terms


def test_channel_sum_is_a_reduction_unless_cpu_reductions_are_slow(monkeypatch):
    from pmg_jax import xla_options

    def hlo(x, platform=None):
        traced = jax.jit(kernels.channel_sum).trace(x)
        lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
        return lowered.as_text(dialect="hlo")

    x = jnp.ones((2, 3, 4, 5), jnp.float32)
    for text in (hlo(x), hlo(x, "cuda")):  # this CPU (YNNPACK reductions) and a GPU: one reduction
        assert " reduce(" in text and " dot(" not in text
    # an XLA:CPU without YNNPACK reductions: GEMVs on CPU, still a reduction for a GPU
    monkeypatch.setattr(xla_options, "fast_reductions", lambda platform: platform != "cpu")
    y = jnp.ones((2, 3, 4, 6), jnp.float32)  # another shape: a fresh trace
    assert " dot(" in hlo(y) and " reduce(" not in hlo(y)
    assert " reduce(" in hlo(y, "cuda") and " dot(" not in hlo(y, "cuda")


def _conv3x3(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
    "shape,features",  # one tile and less than one in the fast tier; maps of several tiles, partial ones at the
    [  # edges, in the whole suite (each case compiles a float64 Winograd gradient, seconds here)
        pytest.param((2, 9, 7, 3), 5, marks=pytest.mark.slow),
        ((1, 4, 4, 2), 2),
        pytest.param((2, 13, 16, 8), 6, marks=pytest.mark.slow),
        ((1, 2, 3, 1), 1),
    ],
)
def test_winograd_conv3x3_is_the_convolution_and_has_its_gradients(shape, features):
    """In float64 F(4x4, 3x3) equals the direct convolution to rounding, also where the map is
    not a whole number of 4x4 tiles or smaller than one, and so do its gradients (the input
    gradient is itself a Winograd convolution, by the flipped kernel with its channels swapped)."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, shape, jnp.float64)
    w = jax.random.normal(kw, (3, 3, shape[-1], features), jnp.float64)
    want = _conv3x3(x, w)
    g = jax.random.normal(kg, want.shape, jnp.float64)
    _, (dx_want, dw_want) = _vjp(_conv3x3, (x, w), g)
    got, (dx, dw) = _vjp(kernels.winograd_conv3x3, (x, w), g)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-11)
    np.testing.assert_allclose(dx, dx_want, atol=1e-11)
    np.testing.assert_allclose(dw, dw_want, atol=1e-11)


def test_winograd_conv3x3_float32_error_stays_near_the_direct_convolutions():
    """In float32 Winograd's transforms cost accuracy; bound it against float64 at a ResNet-like
    scale (256 input channels, He-scaled weights) and next to the direct convolution's error."""
    with jax.enable_x64(False):
        kx, kw = jax.random.split(jax.random.PRNGKey(5))
        x = jax.nn.relu(jax.random.normal(kx, (2, 12, 12, 256), jnp.float32))
        w = jax.random.normal(kw, (3, 3, 256, 32), jnp.float32) * np.sqrt(2 / (9 * 256))
        got = np.asarray(jax.jit(kernels.winograd_conv3x3)(x, w), np.float64)
        direct = np.asarray(jax.jit(_conv3x3)(x, w), np.float64)
    want = np.asarray(_conv3x3(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)))
    scale = np.abs(want).max()
    err, direct_err = np.abs(got - want).max(), np.abs(direct - want).max()
    assert err < 2e-5 * scale, (err, scale)
    assert err < 50 * max(direct_err, 1e-7 * scale), (err, direct_err)


def test_use_winograd_picks_the_large_float32_same_convolutions():
    f32 = jnp.float32
    assert kernels.use_winograd((8, 56, 56, 512), (3, 3, 512, 1024), 1, 1, f32)  # granularity block at 448
    assert kernels.use_winograd((8, 28, 28, 256), (3, 3, 256, 256), 1, 1, f32)  # ResNet50 layer3 at 448
    assert not kernels.use_winograd((8, 7, 7, 512), (3, 3, 512, 512), 1, 1, f32)  # too few pixels
    assert not kernels.use_winograd((8, 112, 112, 64), (3, 3, 64, 64), 1, 1, f32)  # too few channels
    assert not kernels.use_winograd((8, 56, 56, 512), (3, 3, 512, 1024), 1, 1, jnp.bfloat16)
    assert not kernels.use_winograd((8, 56, 56, 512), (3, 3, 512, 512), 2, 1, f32)  # strided
    assert not kernels.use_winograd((8, 56, 56, 512), (3, 3, 512, 512), 1, 0, f32)  # "valid"
    assert not kernels.use_winograd((8, 56, 56, 512), (7, 7, 512, 512), 1, 3, f32)


def test_conv2d_uses_winograd_on_cpu_only(monkeypatch):
    """When `use_winograd` says so, the convolution is GEMMs on CPU and stays a convolution
    (left to the platform's library) for a GPU; the gradient is a convolution's either way."""
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 4)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 1)
    with jax.enable_x64(False):
        x, w = jnp.ones((1, 8, 8, 4), jnp.float32), jnp.ones((3, 3, 4, 4), jnp.float32)

        def hlo(fn, platform):
            return jax.jit(fn).trace(x, w).lower(lowering_platforms=(platform,)).as_text(dialect="hlo")

        forward = lambda x, w: kernels.conv2d(x, w, 1, 1)
        cpu, cuda = hlo(forward, "cpu"), hlo(forward, "cuda")
        assert " dot(" in cpu and " convolution(" not in cpu
        assert " convolution(" in cuda and " dot(" not in cuda
        grad = jax.grad(lambda x, w: jnp.sum(forward(x, w) ** 2), argnums=(0, 1))
        assert " convolution(" in hlo(grad, "cpu")
        np.testing.assert_allclose(forward(x, w), _conv3x3(x, w), rtol=1e-5)


@pytest.mark.parametrize(
    "shape", [(2, 9, 9, 3), pytest.param((2, 10, 11, 4), marks=pytest.mark.slow), (1, 8, 8, 2), (1, 3, 3, 1)]
)
def test_max_pool_matches_torch_values_and_first_maximum_gradients(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    x[0, :4, :4, 0] = 0.0
    x = np.maximum(x, 0.0)  # after ReLU: many tied zeros
    x[0, 0, 0, 0] = x[0, 0, 2, 0] = x[0, 2, 0, 0] = 7.0  # a positive tie inside one window
    out, vjp = jax.vjp(lambda v: kernels.max_pool(v, 3, 2, 1), jnp.asarray(x))
    g = rng.normal(size=out.shape)
    (dx,) = vjp(jnp.asarray(g))

    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    ot = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    ot.backward(torch.tensor(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(out, ot.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-12)


@pytest.mark.slow
def test_pmg_with_winograd_convolutions_computes_what_it_computes_without(monkeypatch):
    """Every 3x3 "same" convolution of a small PMG through Winograd (thresholds lowered): eval logits and the
    training loss's parameter gradients are as near the float64 computation as the direct model's, give or take
    Winograd's own float32 cost (tests/truth.py: the direct convolutions' float32 error depends on the CPU)."""
    from pmg_jax.model import PMG

    # ResNet50-style: two stride-1 3x3 convolutions in stage 1, strided ones in the others
    shape = dict(num_classes=5, width=8, feature_size=16, stage_sizes=(2, 1, 1, 1))

    def run(model, variables, x):  # a fresh trace each time, so the thresholds in force are the ones read
        logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)

        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return sum(jnp.sum(jnp.sin(o)) for o in out)

        grads = jax.jit(jax.grad(loss))(variables["params"])
        return [np.asarray(z, np.float64) for z in logits], {
            jax.tree_util.keystr(p): np.asarray(g, np.float64) for p, g in jax.tree_util.tree_leaves_with_path(grads)
        }

    with jax.enable_x64(False):
        model = PMG(**shape)
        # batch 8: the heads' train-mode BatchNorms of pooled features are degenerate on two
        # samples, where they amplify rounding differences a thousandfold
        x = jax.random.normal(jax.random.PRNGKey(6), (8, 64, 64, 3), jnp.float32)
        variables = model.init(jax.random.PRNGKey(7), x, train=False)

        def ops():
            text = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text(dialect="hlo")
            return text.count(" convolution("), text.count(" dot(")

        convs, dots = ops()
        direct_logits, direct_grads = run(model, variables, x)
        monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 1)
        monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 1)
        # the two in stage 1 and the three granularity blocks' become 36 GEMMs each
        assert ops() == (convs - 5, dots + 36 * 5)
        got_logits, got_grads = run(model, variables, x)
    with jax.enable_x64(True):  # the truth: the same weights and input, computed in float64
        as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        want_logits, want_grads = run(PMG(**shape, dtype=jnp.float64), as64(variables), as64(x))
    # floors on each group's overall scale: a bias ahead of a BatchNorm has a gradient of zero, which float32
    # leaves at rounding noise; Winograd's transforms cost a few times a direct convolution's rounding
    assert_near_truth(got_logits, direct_logits, want_logits, floor=1e-5, what="logits")
    assert_near_truth(got_grads, direct_grads, want_grads, floor=1e-4, what="gradients")
