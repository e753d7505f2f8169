"""Orbax checkpoints: train state, run metadata (epoch, best accuracy, class names, data position) and config.

Layout: <workdir>/checkpoints/<step>/{state, meta, config}. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a kill at
any moment leaves the previous checkpoints intact and a partial one is never
listed. The latest `keep` checkpoints and the best one (highest combined
accuracy) are kept.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from pmg_jax import config as config_lib
from pmg_jax.errors import PMGError

WHICH = ("latest", "best")  # the checkpoints of a run one can ask for


class _OrbaxNoticeFilter(logging.Filter):
    """Two orbax warnings that are not: one on every save without metrics once best_fn is set (ours, mid-epoch or
    on a signal, are meant), and 'Given directory is read only' whenever a manager is opened for reading, as
    ours are to find and restore checkpoints (it reads like a permission problem; the directory is writable)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage() and record.msg != "Given directory is read only=%s"


logging.getLogger("absl").addFilter(_OrbaxNoticeFilter())


def _score(metrics: dict) -> float:
    """What 'best' ranks checkpoints by: the combined test accuracy."""
    return metrics["combined"]


class Checkpoints:
    """A CheckpointManager over one run's checkpoint directory."""

    def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        # Orbax sorts scored checkpoints ascending (BestN with reverse=False; best_mode='max' for
        # best_step) and keeps / returns the *last* of them, so the highest score wins and, the sort
        # being stable over steps in order, a tie goes to the later step. best_fn also makes the
        # manager write each checkpoint's metrics, so a restarted or read-only manager still knows them.
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(get_metric_fn=_score, reverse=False, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_score,
            best_mode="max",
            create=not read_only,
            read_only=read_only,
            # what orbax would otherwise change, with a warning each, for a reader
            save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest combined accuracy (the later one of a tie); None if none was scored."""
        return self.manager.best_step()

    def save(self, step: int, state: Any, meta: dict, config: dict, metric: float | None = None) -> None:
        """Write asynchronously; `metric` (combined accuracy) ranks the checkpoint for 'best'."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave(config)
            ),
            metrics=None if metric is None else {"combined": float(metric)},
            force=True,
        )

    def restore(self, abstract_state: Any | None = None, step: int | None = None, sharding=None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default latest). Without `abstract_state` the state comes back as nested dicts."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        if abstract_state is not None and sharding is not None:
            abstract_state = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state
            )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["meta"]

    def meta(self, step: int | None = None) -> dict:
        """The metadata of `step` (default latest) alone, without reading the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def config(self, step: int | None = None) -> ml_collections.ConfigDict:
        """The run's config, over today's defaults so that fields added since it was saved have values."""
        step = self.latest_step() if step is None else step
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        config = config_lib.get_config()
        config.update(saved)
        return config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class CheckpointNotFound(PMGError, FileNotFoundError):
    """No (suitable) checkpoint where the user pointed."""


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` (a run's checkpoints/) holds a complete checkpoint."""
    return os.path.isdir(directory) and Checkpoints(directory, read_only=True).latest_step() is not None


def find_run(path: str) -> str:
    """The run directory for `path`: a run (has checkpoints/), or a folder of runs (the one with the most recent
    complete checkpoint)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    runs = [os.path.dirname(d.rstrip("/")) for d in glob.glob(os.path.join(path, "*", "checkpoints/"))]
    runs = [r for r in runs if has_checkpoint(os.path.join(r, "checkpoints"))]
    if not runs:
        raise CheckpointNotFound(
            f"{path}: no checkpoints found (expected {path}/checkpoints or {path}/<run>/checkpoints)"
        )
    return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, "checkpoints")))


def resolve(path: str, which: str = "latest") -> tuple[str, int]:
    """(run dir, step) for a run dir, a folder of runs, a run's checkpoints/ dir or one checkpoint's dir.

    `which` picks the latest or the best (highest combined accuracy) checkpoint of a run;
    a checkpoint's own directory names its step.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(os.path.basename(path))
    run = parent if os.path.basename(path) == "checkpoints" else find_run(path)
    ckpts = Checkpoints(os.path.join(run, "checkpoints"), read_only=True)
    if ckpts.latest_step() is None:
        raise CheckpointNotFound(f"{run}: no complete checkpoint in {run}/checkpoints")
    if which == "latest":
        return run, ckpts.latest_step()
    if which != "best":
        raise ValueError(f"which checkpoint: {WHICH}, not {which!r}")
    step = ckpts.best_step()
    if step is None:
        raise CheckpointNotFound(f"{run}: no evaluated checkpoint to call best (ask for the latest instead)")
    return run, step
