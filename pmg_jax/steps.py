"""The jitted steps: one whole training iteration (progressive or joint) and evaluation counts, over the mesh."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pmg_jax import backbones, kernels, methods, parallel, steps_v2, validate, xla_options
from pmg_jax import jigsaw as jigsaw_lib
from pmg_jax import model as model_lib
from pmg_jax.data import pipeline
from pmg_jax.model import PMG
from pmg_jax.state import TrainState, transform_spec

EVAL_NAMES = (*model_lib.HEADS, model_lib.COMBINED)  # the accuracies evaluation reports
LOSS_NAMES = ("loss1", "loss2", "loss3", "loss_concat")  # one per head, in model_lib.HEADS order


def micro_batches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B / k, ...): micro-batch i holds examples i, i + k, i + 2k, ... (strided, so that a batch
    sharded in contiguous blocks over the devices gives every device its share of each micro-batch)."""
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def whole_batch(x: jax.Array) -> jax.Array:
    """The inverse of `micro_batches`: (k, B / k, ...) -> (B, ...) in the original order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_train_step(
    model: PMG,
    tx: optax.GradientTransformation,
    *,
    granularities: tuple[int, ...] = (8, 4, 2),
    jigsaw_mode: str = "cycle",
    concat_weight: float = 2.0,
    permutations: dict[int, jax.Array] | None = None,
    bn_stats: str = "all",
    schedule: str = "progressive",
    accumulation_steps: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One whole PMG iteration: the updates of `model_lib.SCHEDULES[schedule]`, each an optimizer update of
    the weighted loss of its passes.

    A jigsaw pass shuffles the batch into n x n blocks (n from `granularities`) and trains its head;
    the concat pass trains the concat head on the unshuffled images with weight `concat_weight`.
    'progressive' (the reference) updates after each pass; 'joint' runs the four inputs through the
    network as one batch of 4B (BatchNorm then normalises over all of them) and updates once, on the sum
    of the four weighted losses. Every forward runs the whole network in train mode (every BN updates its
    running statistics). With `accumulation_steps` k > 1 each update's gradient is the mean of the
    gradients of k micro-batches (`micro_batches`, a `lax.scan`): BatchNorm normalises each micro-batch on
    its own and the running statistics are updated once per micro-batch, k times per update. If any
    loss or gradient is non-finite the state is returned unchanged and metrics['nonfinite_pass'] names
    the first bad update (1-based, see `pass_name`; 0 when all are finite). `permutations` fixes the
    jigsaw per granularity (tests); otherwise they are drawn from the state's RNG. bn_stats='used' keeps
    only the running statistics of the modules that feed the update's heads (`model_lib.feeds`): XLA then
    drops the forward of the rest as dead code. Each update's 'dropout' rng (the backbone's stochastic
    depth; one per micro-batch) comes from the state's rng and step too, so a resumed run draws the same.
    """
    validate.check_choice("bn_stats", bn_stats)  # the config's one table, for callers that pass no config
    validate.check_choice("schedule", schedule)
    backbone = backbones.get(model.backbone)
    k = accumulation_steps

    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def keep_used(heads: tuple[int, ...], new: Any, old: Any) -> Any:
        """`new` statistics where they feed one of `heads`, `old` elsewhere."""

        def pick(path, n, o):
            return n if any(model_lib.feeds(h, [p.key for p in path], backbone) for h in heads) else o

        return jax.tree_util.tree_map_with_path(pick, new, old)

    def make_loss(group: tuple[model_lib.Pass, ...]) -> Callable:
        """loss_fn(params, stats, inputs, labels) of one update: its passes' inputs as one batch."""
        heads = tuple(p.head for p in group)
        weights = [concat_weight if p.jigsaw is None else 1.0 for p in group]

        def loss_fn(params, stats, inputs, labels, dropout):
            x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs)
            logits, updated = model.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout},
            )
            new_stats = updated["batch_stats"]
            if bn_stats == "used":
                new_stats = keep_used(heads, new_stats, stats)
            n = labels.shape[0]
            outs = [logits[h] if len(group) == 1 else logits[h][j * n : (j + 1) * n] for j, h in enumerate(heads)]
            losses = [w * cross_entropy(o, labels) for w, o in zip(weights, outs, strict=True)]
            return sum(losses[1:], losses[0]), (new_stats, losses, outs)

        return jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(grad_fn, params, stats, inputs, labels, dropout):
        """grad_fn over k micro-batches: the mean loss terms and gradient, the statistics after the last."""

        def micro(carry, batch):
            stats, total = carry
            (_, (stats, losses, outs)), grads = grad_fn(params, stats, *batch)
            return (stats, jax.tree.map(jnp.add, total, grads)), (losses, outs)

        split = ([micro_batches(x, k) for x in inputs], micro_batches(labels, k), jax.random.split(dropout, k))
        (stats, total), (losses, outs) = jax.lax.scan(micro, (stats, jax.tree.map(jnp.zeros_like, params)), split)
        grads = jax.tree.map(lambda g: g / k, total)
        losses = [jnp.mean(term) for term in losses]
        return sum(losses[1:], losses[0]), (stats, losses, [whole_batch(o) for o in outs]), grads

    updates = [(group, make_loss(group)) for group in model_lib.SCHEDULES[schedule]]

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images, labels = batch["image"], batch["label"]
        key = jax.random.fold_in(state.rng, state.step)
        params, stats, opt_state = state.params, state.batch_stats, state.opt_state
        metrics, bad_pass = {}, jnp.zeros((), jnp.int32)
        for u, (group, grad_fn) in enumerate(updates):
            inputs = []
            for p in group:
                i = model_lib.PASSES.index(p)
                if p.jigsaw is None:
                    inputs.append(images)
                elif permutations is not None:
                    n = granularities[p.jigsaw]
                    inputs.append(jigsaw_lib.shuffle_blocks(images, n, permutations[n]))
                else:
                    inputs.append(
                        jigsaw_lib.jigsaw(jax.random.fold_in(key, i), images, granularities[p.jigsaw], jigsaw_mode)
                    )
            dropout = jax.random.fold_in(key, len(model_lib.PASSES) + u)  # not a jigsaw's fold_in(key, i)
            if k == 1:
                (loss, (stats, losses, outs)), grads = grad_fn(params, stats, inputs, labels, dropout)
            else:
                loss, (stats, losses, outs), grads = accumulate(grad_fn, params, stats, inputs, labels, dropout)
            finite = jnp.isfinite(loss) & steps_v2.all_finite(grads)
            bad_pass = jnp.where((bad_pass == 0) & ~finite, u + 1, bad_pass)
            grad_updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, grad_updates)
            for p, term, o in zip(group, losses, outs, strict=True):
                metrics[LOSS_NAMES[p.head]] = term
                if p.head == model_lib.CONCAT:
                    concat_logits = o
        metrics["accuracy"] = 100.0 * jnp.mean(jnp.argmax(concat_logits, -1) == labels)  # the concat pass's, in %
        metrics["nonfinite_pass"] = bad_pass
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
        ok = bad_pass == 0
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return new_state, metrics

    return train_step


def pass_name(nonfinite_pass: int, schedule: str = "progressive") -> str:
    """The heads of the 1-based update that `metrics['nonfinite_pass']` names."""
    group = model_lib.SCHEDULES[schedule][nonfinite_pass - 1]
    return " + ".join(model_lib.HEADS[p.head] for p in group)


def make_eval_step(model: PMG) -> Callable[[TrainState, dict], jax.Array]:
    """Correct-prediction counts of each head and of combined (model.combined_logits), masked, and the count."""

    def eval_step(state: TrainState, batch: dict) -> jax.Array:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        preds = [*logits, model_lib.combined_logits(logits)]
        hits = [jnp.sum((jnp.argmax(p, -1) == batch["label"]) * batch["mask"]) for p in preds]
        return jnp.stack([*hits, jnp.sum(batch["mask"])])

    return eval_step


def compile_steps(
    model, tx, config: ml_collections.ConfigDict, mesh, kernel_choice: str | kernels.Kernels | None = None
):
    """(train_step, eval_step) jitted over the mesh: batch sharded on 'data', state replicated and donated.

    Both trace with `config.model.kernels` (or `kernel_choice`, for A/B runs) and normalise uint8 batches
    on the device (config.data.normalize_on_device); float batches pass.
    """
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    method = methods.get(config.method)
    train_step = (
        steps_v2.make_train_step(model, tx, method.updates(config.schedule))
        if method.pairs
        else make_train_step(
            model,
            tx,
            granularities=tuple(config.jigsaw.granularities),
            jigsaw_mode=config.jigsaw.mode,
            concat_weight=config.concat_loss_weight,
            bn_stats=config.bn_stats,
            schedule=config.schedule,
            accumulation_steps=config.accumulation_steps,
        )
    )
    spec = transform_spec(config)
    chosen = kernels.resolve(config.model.kernels if kernel_choice is None else kernel_choice)

    def prepared(step):
        def run(state, batch):
            images = {k: pipeline.normalize_on_device(batch[k], spec) for k in ("image", "positive") if k in batch}
            return step(state, {**batch, **images})

        return kernels.traced(run, chosen)

    platform = mesh.devices.flat[0].platform
    jit_train = xla_options.jit(
        prepared(train_step),
        platform=platform,
        program="train",
        in_shardings=(rep, data),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    jit_eval = xla_options.jit(
        prepared(steps_v2.make_eval_step(model, method) if method.pairs else make_eval_step(model)),
        platform=platform,
        in_shardings=(rep, data),
        out_shardings=rep,
    )
    return jit_train, jit_eval


def evaluate(
    eval_step, state: TrainState, batches: Iterator[dict], sharding, names: tuple[str, ...] = EVAL_NAMES
) -> dict[str, float]:
    """Accuracy (%) of every head and of combined over a whole split, each example counted once (`names`:
    the eval step's outputs, a method's `eval_names`)."""
    totals = np.zeros(len(names) + 1, np.float64)
    for batch in pipeline.prefetch_to_device(batches, sharding):
        totals += np.asarray(jax.device_get(eval_step(state, batch)), np.float64)
    count = totals[-1]
    result = {name: 100.0 * totals[i] / max(count, 1) for i, name in enumerate(names)}
    result["count"] = int(count)
    return result


def format_eval_table(title: str, result: dict[str, float]) -> str:
    """`title`, then an aligned table of the accuracies."""
    head, vals = model_lib.accuracy_table({n: result[n] for n in EVAL_NAMES})
    return f"{title} on {result['count']} images (top-1 %)\n  {head}\n  {vals}"
