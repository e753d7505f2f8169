"""The per-platform XLA compiler options that pmg_jax's jitted programs are compiled with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmg_jax import xla_options


@pytest.fixture
def fresh_cache():
    xla_options.for_platform.cache_clear()
    yield
    xla_options.for_platform.cache_clear()


def test_cpu_takes_the_first_value_this_xla_accepts_and_drops_unknown_options(fresh_cache, monkeypatch):
    assert jax.default_backend() == "cpu"
    # YNNPACK off for every program, but on for the training step's reductions (this jaxlib has them);
    # the training step keeps its optimisation barriers (remat)
    assert xla_options.for_platform() == {xla_options.YNN: ""}
    assert xla_options.for_platform("cpu", "train") == {
        xla_options.YNN: xla_options.YNN_REDUCE,
        xla_options.DISABLED_PASSES: "cse_barrier_expander",
    }
    assert xla_options.fast_reductions("cpu") and xla_options.fast_reductions("gpu")
    with pytest.raises(ValueError, match="program"):
        xla_options.for_platform("cpu", "eval")
    xla_options.for_platform.cache_clear()
    monkeypatch.setitem(
        xla_options.TRAIN,
        "cpu",
        {"xla_pmg_no_such_option": (True,), xla_options.YNN: ("LIBRARY_FUSION_TYPE_NO_SUCH_TYPE", "")},
    )
    assert xla_options.for_platform("cpu", "train") == {xla_options.YNN: ""}
    assert not xla_options.fast_reductions("cpu")  # YNNPACK off: BatchNorm must sum with GEMVs
    xla_options.for_platform.cache_clear()
    monkeypatch.setitem(xla_options.OPTIONS, "cpu", {"xla_pmg_no_such_option": (True, 1)})
    monkeypatch.setitem(xla_options.TRAIN, "cpu", {})
    assert xla_options.for_platform("cpu") is None and xla_options.for_platform("cpu", "train") is None


def test_gpu_switches_off_the_triton_gemm_fusion_and_other_platforms_get_none(fresh_cache):
    # not probed on a CPU-only machine: returned as written, for XLA:GPU to check when it compiles
    assert xla_options.for_platform("gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert xla_options.for_platform("gpu", "train") == {"xla_gpu_enable_triton_gemm": False}
    assert xla_options.for_platform("tpu") is None


def test_jit_with_the_options_computes_what_jax_jit_does():
    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jax.nn.relu(y) ** 2)

    x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 3, 3, 4)).astype(np.float32)
    ours = xla_options.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    plain = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
