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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The mean softmax cross-entropy of integer `labels`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def keep_used(backbone: backbones.Backbone, heads: tuple[int, ...], new: Any, old: Any) -> Any:
    """`new` BatchNorm statistics where their module feeds one of `heads` (`model_lib.feeds`), `old` elsewhere:
    XLA then drops the forward of the rest as dead code (bn_stats='used')."""

    def pick(path, n, o):
        return n if any(model_lib.feeds(h, [p.key for p in path], backbone) for h in heads) else o

    return jax.tree_util.tree_map_with_path(pick, new, old)


def make_loss(model: PMG, group: tuple[model_lib.Pass, ...], *, concat_weight: float, bn_stats: str) -> Callable:
    """value_and_grad of one update's loss(params, stats, inputs, labels, dropout): its passes' inputs run as one
    batch in train mode (BatchNorm normalises over all of them), each head's cross-entropy on its share, the
    concat pass's weighted by `concat_weight`; aux (new statistics, the weighted loss terms, the heads' logits)."""
    heads = tuple(p.head for p in group)
    weights = [concat_weight if p.jigsaw is None else 1.0 for p in group]
    backbone = backbones.get(model.backbone)

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
            new_stats = keep_used(backbone, heads, new_stats, stats)
        n = labels.shape[0]
        outs = [logits[h] if len(group) == 1 else logits[h][j * n : (j + 1) * n] for j, h in enumerate(heads)]
        losses = [w * cross_entropy(o, labels) for w, o in zip(weights, outs, strict=True)]
        return sum(losses[1:], losses[0]), (new_stats, losses, outs)

    return jax.value_and_grad(loss_fn, has_aux=True)


def accumulate(grad_fn: Callable, k: int, params: Any, stats: Any, inputs: list, labels: jax.Array, dropout: Any):
    """`grad_fn` over k micro-batches (`micro_batches`, a `lax.scan`; one dropout rng each): the mean loss terms
    and gradient, and the statistics after the last (each micro-batch normalised on its own and updating them)."""

    def micro(carry, batch):
        stats, total = carry
        (_, (stats, losses, outs)), grads = grad_fn(params, stats, *batch)
        return (stats, jax.tree.map(jnp.add, total, grads)), (losses, outs)

    split = ([micro_batches(x, k) for x in inputs], micro_batches(labels, k), jax.random.split(dropout, k))
    (stats, total), (losses, outs) = jax.lax.scan(micro, (stats, jax.tree.map(jnp.zeros_like, params)), split)
    grads = jax.tree.map(lambda g: g / k, total)
    losses = [jnp.mean(term) for term in losses]
    return sum(losses[1:], losses[0]), (stats, losses, [whole_batch(o) for o in outs]), grads


def update_inputs(
    group: tuple[model_lib.Pass, ...],
    images: jax.Array,
    key: jax.Array,
    *,
    granularities: tuple[int, ...],
    jigsaw_mode: str,
    permutations: dict[int, jax.Array] | None = None,
) -> list[jax.Array]:
    """One update's inputs, a batch per pass: the images for the concat pass, else their n x n jigsaw (n from
    `granularities`), drawn from fold_in(key, the pass's index) or fixed by `permutations` per n (tests)."""
    inputs = []
    for p in group:
        if p.jigsaw is None:
            inputs.append(images)
            continue
        n = granularities[p.jigsaw]
        if permutations is not None:
            inputs.append(jigsaw_lib.shuffle_blocks(images, n, permutations[n]))
        else:
            inputs.append(jigsaw_lib.jigsaw(jax.random.fold_in(key, model_lib.PASSES.index(p)), images, n, jigsaw_mode))
    return inputs


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
    """One whole PMG iteration: an optimizer update per group of `model_lib.SCHEDULES[schedule]` (`make_loss`,
    `update_inputs`, `accumulate` over `accumulation_steps`), the state kept unchanged and
    metrics['nonfinite_pass'] naming the first update (1-based, `pass_name`) if any loss or gradient is not finite."""
    validate.check_choice("bn_stats", bn_stats)  # the config's one table, for callers that pass no config
    validate.check_choice("schedule", schedule)
    k = accumulation_steps
    updates = [
        (group, make_loss(model, group, concat_weight=concat_weight, bn_stats=bn_stats))
        for group in model_lib.SCHEDULES[schedule]
    ]

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images, labels = batch["image"], batch["label"]
        key = jax.random.fold_in(state.rng, state.step)  # so a resumed run draws the same jigsaws and dropout
        params, stats, opt_state = state.params, state.batch_stats, state.opt_state
        metrics, bad_pass = {}, jnp.zeros((), jnp.int32)
        for u, (group, grad_fn) in enumerate(updates):
            inputs = update_inputs(
                group, images, key, granularities=granularities, jigsaw_mode=jigsaw_mode, permutations=permutations
            )
            dropout = jax.random.fold_in(key, len(model_lib.PASSES) + u)  # not a jigsaw's fold_in(key, i)
            if k == 1:
                (loss, (stats, losses, outs)), grads = grad_fn(params, stats, inputs, labels, dropout)
            else:
                loss, (stats, losses, outs), grads = accumulate(grad_fn, k, params, stats, inputs, labels, dropout)
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


def train_step_from_config(model: PMG, tx: optax.GradientTransformation, config: ml_collections.ConfigDict) -> Callable:
    """The train step the config asks for (the one place a method's step is chosen from the config)."""
    method = methods.get(config.method)
    if method.pairs:
        return steps_v2.make_train_step(model, tx, method.updates(config.schedule))
    return make_train_step(
        model,
        tx,
        granularities=tuple(config.jigsaw.granularities),
        jigsaw_mode=config.jigsaw.mode,
        concat_weight=config.concat_loss_weight,
        bn_stats=config.bn_stats,
        schedule=config.schedule,
        accumulation_steps=config.accumulation_steps,
    )


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
    train_step = train_step_from_config(model, tx, config)
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
    """`title`, then an aligned table of the accuracies (those `evaluate` returned, in its order)."""
    head, vals = model_lib.accuracy_table({n: v for n, v in result.items() if n != "count"})
    return f"{title} on {result['count']} images (top-1 %)\n  {head}\n  {vals}"
