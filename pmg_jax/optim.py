"""The reference optimizer: SGD + momentum + weight decay, two learning rates, per-epoch cosine."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

# One training iteration applies four optimizer updates (jigsaw 8, 4, 2, original).
UPDATES_PER_ITERATION = 4


def epoch_cosine(base_lr: float, num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    """lr(e) = base_lr / 2 * (cos(pi * e / E) + 1) for 0-based epoch e, as a function of the epoch."""

    def lr(epoch):
        e = jnp.mod(epoch, num_epochs).astype(jnp.float32)
        return base_lr / 2 * (jnp.cos(math.pi * e / num_epochs) + 1)

    return lr


def param_groups(params) -> dict:
    """'backbone' for the ResNet trunk (`features`), 'new' for the blocks and heads."""
    return {k: jax.tree.map(lambda _: "backbone" if k == "features" else "new", v) for k, v in params.items()}


def make_optimizer(
    *,
    lr_new: float,
    lr_backbone: float,
    num_epochs: int,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
    """PyTorch SGD semantics: g += wd * p; buf = momentum * buf + g; p -= lr * buf.

    The learning rate is constant within an epoch; epochs are counted in iterations
    of UPDATES_PER_ITERATION optimizer updates each.
    """
    updates_per_epoch = UPDATES_PER_ITERATION * steps_per_epoch

    def group(base_lr: float) -> optax.GradientTransformation:
        lr = epoch_cosine(base_lr, num_epochs)
        return optax.scale_by_learning_rate(lambda count: lr(count // updates_per_epoch))

    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.multi_transform({"new": group(lr_new), "backbone": group(lr_backbone)}, param_groups),
    )
