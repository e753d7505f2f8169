"""The train state, the model a config describes, and restoring a checkpoint for inference.

Inference (explain, predict, export, evaluation of a converted run) needs only this module, not the
training loop or the optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import methods, validate
from pmg_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (all replicated over the mesh)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> nn.Module:
    """The module (PMG, or PMG-V2: config.method's) a config describes."""
    m = config.model
    return methods.get(config.method).module(
        num_classes=num_classes or config.dataset.num_classes,
        backbone=m.backbone,
        feature_size=m.feature_size,
        width=m.width,
        stage_sizes=tuple(m.stage_sizes) if m.stage_sizes else None,
        drop_path_rate=m.drop_path_rate,
        dtype=jnp.dtype(m.dtype),
        remat=m.remat,
        bn_group_size=m.bn_group_size,
        bn_group_stats=m.bn_group_stats,
    )


def init_variables(model: nn.Module, key: jax.Array, image_size: int) -> dict:
    """params and batch_stats (float32), without the CAM-only collections."""
    variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def abstract_variables(model: nn.Module, image_size: int) -> dict:
    """The shapes and dtypes of `init_variables`' result, traced: nothing is computed or compiled."""
    return jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), image_size))


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    image_size: int,
    starting: Callable[[Callable[[], dict]], dict] = lambda seeds: seeds(),
) -> TrainState:
    """A fresh state: PyTorch-style initialisation, zero momentum, step 0. `starting` gives the starting weights
    from a function that draws the seed's (by default, those), which it need call only when it uses them."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = starting(lambda: init_variables(model, init_key, image_size))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=rng,
    )


def transform_spec(config: ml_collections.ConfigDict) -> pipeline.TransformSpec:
    """The sizes and normalisation of a config's transforms."""
    return pipeline.TransformSpec.from_config(config.data)


@flax.struct.dataclass
class Restored:
    """A checkpoint ready for inference: its model, weights, config and metadata."""

    run: str = flax.struct.field(pytree_node=False)
    step: int = flax.struct.field(pytree_node=False)
    model: nn.Module = flax.struct.field(pytree_node=False)
    variables: dict
    config: ml_collections.ConfigDict = flax.struct.field(pytree_node=False)
    meta: dict = flax.struct.field(pytree_node=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def finished(self) -> bool:
        """Whether the run had trained all its epochs when this checkpoint was written."""
        return run_finished(self.meta, self.config.num_epochs)

    def describe(self) -> str:
        """One line: which checkpoint of which run, how far it trained and what it is."""
        done = (
            f"epoch {self.meta.get('epoch')} of {self.config.num_epochs}"
            if "converted_from" not in self.meta
            else f"converted from {self.meta['converted_from']}"
        )
        return (
            f"{self.run} checkpoint {self.step} ({done}, {self.config.model.backbone}, "
            f"{len(self.class_names)} classes, input {self.config.data.crop_size}px)"
        )


def run_finished(meta: dict, num_epochs: int) -> bool:
    """Whether a checkpoint with `meta` was written after the last of `num_epochs` (or converted: complete)."""
    return meta.get("epoch", 0) >= num_epochs or "converted_from" in meta


def restore(path: str, which: str = "latest") -> Restored:
    """The checkpoint at `path`: a run, a folder of runs (the newest), or one checkpoint (see checkpoint.resolve).

    A damaged checkpoint (checkpoint.CheckpointDamaged) is reported on stderr and the run's newest intact one
    is used instead; one named by its own directory, or a run with none intact, is refused."""
    run, step = ckpt_lib.resolve(path, which)
    ckpts = ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True)

    def read(step: int) -> tuple[dict, dict, ml_collections.ConfigDict]:
        state, meta = ckpts.restore(step=step)
        return state, meta, ckpts.config(step)

    # a damaged checkpoint the user named is refused; one we picked falls back to the newest intact one
    if ckpt_lib.names_step(path):
        state, meta, config = read(step)
    else:
        step, (state, meta, config) = ckpts.intact(ckpts.newest_first(step), read)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return Restored(run, step, create_model(config, len(meta["class_names"])), variables, config, meta)


def load_variables(path: str, config: ml_collections.ConfigDict, which: str = "latest") -> dict:
    """params and batch_stats of a run or checkpoint, refused unless its model is the configured one."""
    restored = restore(path, which)
    validate.check_compatible(restored.config, config, path)
    print(f"weights from {restored.run} at step {restored.step}")
    return restored.variables
