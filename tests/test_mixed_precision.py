"""config.model.dtype='bfloat16': bf16 compute, float32 parameters, BN statistics, loss and optimizer.

A tiny demo run in bf16 learns, its state stays float32, and its bf16 logits stay
within a stated tolerance of the float32 logits of the same weights.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_demo_config

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import loop
from pmg_jax import state as state_lib
from pmg_jax.data import pipeline, sources

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bf16_demo")]  # one bf16 run (module fixture) on one worker

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op); through ~20 layers the
# logits of the trained demo net moved by 0.5-0.8% of their largest magnitude (bench/RESULTS.md).
LOGIT_TOL = 0.05  # max |bf16 - f32| over max |f32|, per head
AGREEMENT = 0.95  # share of test images whose combined prediction is unchanged


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """(config, restored state) of the tiny demo trained in bfloat16, and its best eval."""
    workdir = str(tmp_path_factory.mktemp("bf16_run"))
    config = tiny_demo_config(num_epochs=4, **{"model.dtype": "bfloat16"})  # 4 of the 6: enough to learn
    best = loop.train_and_evaluate(config, workdir)
    state, _ = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).restore()
    return config, state, best


def test_bf16_demo_learns(bf16_run):
    config, _, best = bf16_run
    chance = 100.0 / config.dataset.num_classes
    assert best["combined"] > 2 * chance, best


def test_bf16_state_stays_float32(bf16_run):
    _, state, _ = bf16_run
    for part in ("params", "batch_stats", "opt_state"):  # opt_state also holds int32 step counts
        leaves = [np.asarray(x) for x in jax.tree.leaves(state[part])]
        floats = {x.dtype for x in leaves if np.issubdtype(x.dtype, np.floating)}
        assert floats == {np.dtype(np.float32)}, (part, floats)


def test_bf16_logits_close_to_float32(bf16_run):
    config, state, _ = bf16_run
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    spec = state_lib.transform_spec(config)
    _, batches = pipeline.eval_batches(sources.make_source(config, "test"), spec, pipeline.host_layout(64))
    images = pipeline.normalize_on_device(jnp.asarray(next(iter(batches))["image"]), spec)
    f32 = state_lib.create_model(tiny_demo_config())
    bf16 = state_lib.create_model(config)
    want = jax.jit(lambda v, x: f32.apply(v, x, train=False))(variables, images)
    got, inter = jax.jit(lambda v, x: bf16.apply(v, x, train=False, mutable=["intermediates"]))(variables, images)
    assert inter["intermediates"]["block1"][0].dtype == jnp.bfloat16  # the convs really ran in bf16
    for w, g in zip(want, got):
        assert g.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err <= LOGIT_TOL, err
    agree = jnp.mean(jnp.argmax(sum(want), -1) == jnp.argmax(sum(got), -1))
    assert agree >= AGREEMENT, agree
