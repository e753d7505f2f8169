"""PMG-V2's jitted steps: one training iteration of three updates over anchors and their positives, and
evaluation counts of its three heads and their sum (`steps.compile_steps` picks these by config.method)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from pmg_jax import kernels, methods
from pmg_jax.state import TrainState

LOSS_NAMES = ("loss1", "loss2", "loss3")  # update k's whole loss (cross-entropy + weighted consistency)
CONSISTENCY_NAMES = ("mse1", "mse2", "mse3")  # update k's consistency MSE, unweighted


def all_finite(tree) -> jax.Array:
    """False when any leaf holds an inf or a nan (both methods' non-finite guard).

    A leaf's sum is non-finite exactly when it holds one (or when finite entries
    overflow float32's 3e38, which is a blow-up too); summing with `channel_sum`
    reads each leaf once, where XLA:CPU's elementwise-check-and-reduce of every
    parameter-sized gradient costs a tree of slow reduce-windows.
    """
    sums = [kernels.channel_sum(jnp.atleast_1d(x)) for x in jax.tree.leaves(tree)]
    return jnp.isfinite(jnp.sum(jnp.concatenate(sums)))


def consistency_loss(ce: jax.Array, mse: jax.Array, alpha: float) -> jax.Array:
    """CE + alpha * w * MSE with w = CE / MSE taken as a constant (the official code's `.item()` ratio);
    w is 0 where the MSE is 0 (the official code divides by it)."""
    w = jax.lax.stop_gradient(jnp.where(mse > 0, ce / jnp.where(mse > 0, mse, 1.0), 0.0))
    return ce + alpha * w * mse


def make_update_loss(model, update: methods.Update) -> Callable:
    """value_and_grad of one update's loss(params, stats, x, labels): x is the 2B anchors then positives."""

    def loss_fn(params, stats, x, labels):
        (logits, features), updated = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            tiles=update.tiles,
            consistency=True,
            mutable=["batch_stats"],
        )
        f = features[update.head]
        b = f.shape[0] // 2
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[update.head], labels).mean()
        mse = jnp.mean(jnp.square(f[:b] - f[b:]))
        return consistency_loss(ce, mse, update.alpha), (updated["batch_stats"], mse, logits[update.head])

    return jax.value_and_grad(loss_fn, has_aux=True)


def make_train_step(
    model, tx: optax.GradientTransformation, updates: Sequence[methods.Update] = methods.V2_UPDATES
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One PMG-V2 iteration: for each update (its tiling, head and alpha), a forward of the batch's anchors
    (`image`, B) and positives (`positive`, B) as one batch of 2B with the labels repeated, and an optimizer
    update of its loss. If any loss or gradient is non-finite the state is returned unchanged and
    metrics['nonfinite_pass'] names the first bad update (1-based; 0 when all are finite).
    metrics['accuracy'] is the last update's head's on all 2B images (%), as the official code reports."""
    grad_fns = [(u, make_update_loss(model, u)) for u in updates]

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        x = jnp.concatenate([batch["image"], batch["positive"]])
        labels = jnp.concatenate([batch["label"], batch["label"]])
        params, stats, opt_state = state.params, state.batch_stats, state.opt_state
        metrics, bad = {}, jnp.zeros((), jnp.int32)
        for i, (update, grad_fn) in enumerate(grad_fns):
            (loss, (stats, mse, logits)), grads = grad_fn(params, stats, x, labels)
            bad = jnp.where((bad == 0) & ~(jnp.isfinite(loss) & all_finite(grads)), i + 1, bad)
            steps, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, steps)
            metrics[LOSS_NAMES[update.head]] = loss
            metrics[CONSISTENCY_NAMES[update.head]] = mse
        metrics["accuracy"] = 100.0 * jnp.mean(jnp.argmax(logits, -1) == labels)
        metrics["nonfinite_pass"] = bad
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
        return jax.tree.map(lambda new, old: jnp.where(bad == 0, new, old), new_state, state), metrics

    return train_step


def make_eval_step(model, method: methods.Method = methods.PMG_V2) -> Callable[[TrainState, dict], jax.Array]:
    """Correct-prediction counts of each head and of their sum (the prediction), masked, and the count:
    the layout of `steps.make_eval_step`, named by `method.eval_names`."""

    def eval_step(state: TrainState, batch: dict) -> jax.Array:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        preds = [*logits, method.combined(logits)]
        hits = [jnp.sum((jnp.argmax(p, -1) == batch["label"]) * batch["mask"]) for p in preds]
        return jnp.stack([*hits, jnp.sum(batch["mask"])])

    return eval_step
