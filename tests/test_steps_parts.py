"""The train step's parts on their own: one update's inputs and gradient accumulation over micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax import jigsaw, steps
from pmg_jax.model import PASSES, SCHEDULES

IMAGES = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)


def test_update_inputs_give_each_pass_its_jigsaw_and_the_concat_pass_the_images():
    perms = {n: jnp.arange(n * n)[::-1] for n in (4, 2)}
    key = jax.random.PRNGKey(0)
    inputs = steps.update_inputs(PASSES, IMAGES, key, granularities=(4, 4, 2), jigsaw_mode="cycle", permutations=perms)
    assert len(inputs) == 4
    np.testing.assert_array_equal(inputs[0], jigsaw.shuffle_blocks(IMAGES, 4, perms[4]))
    np.testing.assert_array_equal(inputs[2], jigsaw.shuffle_blocks(IMAGES, 2, perms[2]))
    np.testing.assert_array_equal(inputs[3], IMAGES)
    drawn = steps.update_inputs(PASSES[:2], IMAGES, key, granularities=(4, 4, 2), jigsaw_mode="cycle")
    # each pass draws from its own fold of the key, so two passes of the same grid shuffle differently
    assert not np.array_equal(drawn[0], drawn[1])
    assert [
        len(steps.update_inputs(g, IMAGES, key, granularities=(4, 4, 2), jigsaw_mode="cycle"))
        for g in SCHEDULES["progressive"]
    ] == [1, 1, 1, 1]


def test_accumulate_is_the_mean_over_micro_batches_and_carries_the_statistics():
    params = {"w": jnp.array([1.0, -2.0])}
    x = jnp.arange(8.0).reshape(4, 2)
    labels = jnp.arange(4.0)

    def grad_fn(params, stats, inputs, labels, dropout):
        """A loss of one input whose gradient depends on the batch, counting calls in `stats`."""

        def loss(p):
            term = jnp.mean((inputs[0] @ p["w"] - labels) ** 2)
            return term, (stats + 1, [term], [inputs[0] @ p["w"]])

        return jax.value_and_grad(loss, has_aux=True)(params)

    loss, (stats, losses, outs), grads = steps.accumulate(
        grad_fn, 2, params, jnp.zeros(()), [x], labels, jax.random.PRNGKey(0)
    )
    halves = [(x[i::2], labels[i::2]) for i in range(2)]  # micro-batch i holds examples i, i + 2, ...
    expected = [grad_fn(params, 0, [xs], ys, None) for xs, ys in halves]
    np.testing.assert_allclose(grads["w"], (expected[0][1]["w"] + expected[1][1]["w"]) / 2, rtol=1e-6)
    np.testing.assert_allclose(loss, (expected[0][0][0] + expected[1][0][0]) / 2, rtol=1e-6)
    assert int(stats) == 2
    np.testing.assert_allclose(outs[0], x @ params["w"], rtol=1e-6)  # back in the batch's order
