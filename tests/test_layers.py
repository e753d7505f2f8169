"""The hand-written gradients in pmg_jax.layers give the same values as autodiff / PyTorch.

conv2d's 1x1 path, batch_norm_train and max_pool have custom VJPs for XLA:CPU speed;
these tests compare them in float64 with the formulations they replace, and the max
pool with PyTorch (which sends a window's gradient to its first maximum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pmg_jax import layers


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _vjp(f, args, cotangent):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cotangent)


@pytest.mark.parametrize("shape,features,strides", [
    ((2, 7, 9, 5), 3, 1), ((2, 7, 9, 5), 3, 2), ((3, 8, 8, 4), 6, 2), ((1, 5, 6, 2), 3, 3),
])
def test_pointwise_conv_matches_lax_conv_and_its_gradients(shape, features, strides):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape, jnp.float64)
    w = jax.random.normal(kw, (1, 1, shape[-1], features), jnp.float64)

    def reference(x, w):
        return jax.lax.conv_general_dilated(x, w, (strides, strides), ((0, 0), (0, 0)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    want = reference(x, w)
    g = jax.random.normal(kg, want.shape, jnp.float64)
    _, (dx_want, dw_want) = _vjp(reference, (x, w), g)
    got, (dx, dw) = _vjp(lambda x, w: layers.conv2d(x, w, strides, 0), (x, w), g)
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
    cts = (jax.random.normal(keys[3], shape, jnp.float64),
           jax.random.normal(keys[4], shape[-1:], jnp.float64),
           jax.random.normal(keys[5], shape[-1:], jnp.float64))
    want, grads_want = _vjp(_bn_reference, (x, scale, bias), cts)
    got, grads = _vjp(lambda x, s, b: layers.batch_norm_train(x, s, b, 1e-5, jnp.dtype(jnp.float64)),
                      (x, scale, bias), cts)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for a, b in zip(grads, grads_want):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_batch_norm_statistics_stay_accurate_in_float32():
    """The two-level channel sums keep float32 BN statistics near float64 on a large map."""
    with jax.enable_x64(False):
        x = jax.random.normal(jax.random.PRNGKey(2), (8, 56, 56, 16), jnp.float32) * 2 + 5
        _, mean, var = layers.batch_norm_train(x, jnp.ones(16), jnp.zeros(16), 1e-5, jnp.dtype(jnp.float32))
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=2e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=2e-5)


@pytest.mark.parametrize("form", [layers.channel_sum_gemv, layers.channel_sum_reduce])
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
        traced = jax.jit(layers.channel_sum).trace(x)
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


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 10, 11, 4), (1, 8, 8, 2), (1, 3, 3, 1)])
def test_max_pool_matches_torch_values_and_first_maximum_gradients(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    x[0, :4, :4, 0] = 0.0
    x = np.maximum(x, 0.0)  # after ReLU: many tied zeros
    x[0, 0, 0, 0] = x[0, 0, 2, 0] = x[0, 2, 0, 0] = 7.0  # a positive tie inside one window
    out, vjp = jax.vjp(lambda v: layers.max_pool(v, 3, 2, 1), jnp.asarray(x))
    g = rng.normal(size=out.shape)
    (dx,) = vjp(jnp.asarray(g))

    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    ot = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    ot.backward(torch.tensor(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(out, ot.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-12)
