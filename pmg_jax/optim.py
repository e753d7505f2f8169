"""The reference optimizer: SGD + momentum + weight decay, two learning rates, a per-epoch schedule (optional
warm-up): PMG's cosine, or PMG-V2's step (divided by 10 after epoch 100)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pmg_jax import config as config_lib
from pmg_jax import methods
from pmg_jax import model as model_lib


def epoch_cosine(base_lr: float, num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    """lr(e) = base_lr / 2 * (cos(pi * e / E) + 1) for 0-based epoch e, as a function of the epoch."""

    def lr(epoch):
        e = jnp.mod(epoch, num_epochs).astype(jnp.float32)
        return base_lr / 2 * (jnp.cos(math.pi * e / num_epochs) + 1)

    return lr


def epoch_step(base_lr: float, step_epochs: Sequence[int], factor: float) -> Callable[[jax.Array], jax.Array]:
    """lr(e) = base_lr * factor ** (how many of step_epochs are < e) for 0-based epoch e: the rate drops after
    each step epoch, as the official PMG-V2's `if epoch > 100: lr / 10` does with step_epochs (100,)."""
    bounds = jnp.asarray(tuple(step_epochs), jnp.int32)

    def lr(epoch):
        drops = jnp.sum(jnp.asarray(epoch, jnp.int32) > bounds)
        return base_lr * jnp.power(jnp.float32(factor), drops)

    return lr


def epoch_schedule(
    base_lr: float, num_epochs: int, lr_schedule: str, step_epochs: Sequence[int], step_factor: float
) -> Callable[[jax.Array], jax.Array]:
    """The learning rate as a function of the 0-based epoch under `lr_schedule` (one of config.LR_SCHEDULES)."""
    if lr_schedule == "cosine":
        return epoch_cosine(base_lr, num_epochs)
    if lr_schedule == "step":
        return epoch_step(base_lr, step_epochs, step_factor)
    raise ValueError(f"learning-rate schedule {lr_schedule!r} is not one of {config_lib.LR_SCHEDULES}")


def param_groups(params) -> dict:
    """'backbone' for the backbone's parameters (model.BACKBONE), 'new' for the blocks and heads."""

    def label(top: str, tree):
        group = "backbone" if top == model_lib.BACKBONE else "new"
        return jax.tree.map(lambda _: group, tree)

    return {k: label(k, v) for k, v in params.items()}


def make_optimizer(
    *,
    lr_new: float,
    lr_backbone: float,
    num_epochs: int,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "progressive",
    method: str = "pmg",
    warmup_epochs: int = 0,
    lr_schedule: str = "cosine",
    step_epochs: Sequence[int] = (),
    step_factor: float = 0.1,
) -> optax.GradientTransformation:
    """PyTorch SGD semantics: g += wd * p; buf = momentum * buf + g; p -= lr * buf.

    The learning rate is constant within an epoch, `epoch_schedule(lr_schedule, ...)` of it; epochs are
    counted in iterations of the method's updates under `schedule` (PMG progressive: one per pass; joint:
    one; PMG-V2: three). With warmup_epochs > 0 (not in the reference) it instead rises linearly per update
    from 0 to the base rate over the first warmup_epochs epochs, and follows the schedule of the epoch after.
    """
    updates_per_epoch = methods.get(method).updates_per_iteration(schedule) * steps_per_epoch
    warmup_updates = warmup_epochs * updates_per_epoch

    def group(base_lr: float) -> optax.GradientTransformation:
        lr = epoch_schedule(base_lr, num_epochs, lr_schedule, step_epochs, step_factor)
        if not warmup_updates:
            return optax.scale_by_learning_rate(lambda count: lr(count // updates_per_epoch))

        def after(count):  # join_schedules passes the count since the boundary
            return lr((count + warmup_updates) // updates_per_epoch)

        warmup = optax.linear_schedule(0.0, base_lr, warmup_updates)
        return optax.scale_by_learning_rate(optax.join_schedules([warmup, after], [warmup_updates]))

    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.multi_transform({"new": group(lr_new), "backbone": group(lr_backbone)}, param_groups),
    )


def from_config(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer `config.optim` describes, for epochs of `steps_per_epoch` iterations."""
    o = config.optim
    return make_optimizer(
        lr_new=o.lr_new,
        lr_backbone=o.lr_backbone,
        num_epochs=config.num_epochs,
        steps_per_epoch=steps_per_epoch,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        schedule=config.schedule,
        method=config.method,
        warmup_epochs=o.warmup_epochs,
        lr_schedule=lr_schedule(config),
        step_epochs=tuple(o.step_epochs) or methods.get(config.method).step_epochs,
        step_factor=o.step_factor,
    )


def lr_schedule(config: ml_collections.ConfigDict) -> str:
    """The learning-rate schedule a config trains with: config.optim.schedule, or for 'auto' its method's."""
    return config.optim.schedule if config.optim.schedule != "auto" else methods.get(config.method).lr_schedule
