"""Orbax checkpoints: train state, run metadata (epoch, best accuracy, class names, data position) and config.

Layout: <workdir>/checkpoints/<step>/{state, meta, config}. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a kill at
any moment leaves the previous checkpoints intact and a partial one is never
listed. The latest `keep` checkpoints and the best one (highest combined
accuracy) are kept.

Orbax (0.12.8, tensorstore zarr3 over OCDBT) checksums only the shard index, not the array bytes:
64 bytes overwritten inside a chunk restore silently. So `meta` carries a SHA-256 of every leaf of
the state (its dtype, shape and bytes), checked on every restore; a checkpoint written before these
digests existed is checked for non-finite values instead. A checkpoint that fails to restore or to
check raises CheckpointDamaged, one line naming its directory, and `intact` walks back to the newest
one that passes.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from pmg_jax import config as config_lib
from pmg_jax.errors import PMGError

WHICH = ("latest", "best")  # the checkpoints of a run one can ask for
DIGESTS = "digests"  # the key in `meta` of the state's per-leaf SHA-256 (absent in older checkpoints)


# The disk errors that end a run with one line (RunIOError in the loop) instead of orbax's logged tracebacks.
IO_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only file system",
}


def io_error(e: BaseException | None) -> OSError | None:
    """The disk error (IO_ERRNOS) behind an exception or its causes; tensorstore names it only in its message."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in IO_ERRNOS:
            return e
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code and int(code.group(1)) in IO_ERRNOS:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        e = e.__cause__ or e.__context__
    return None


class _QuietFilter(logging.Filter):
    """Orbax warns on every save without metrics once best_fn is set (ours, mid-epoch or on a signal, are meant)
    and on every read-only manager that it is one (ours are meant to be); and it logs a traceback from each of its
    threads when the disk fills, which the run reports in one line instead (the error reaches the main thread)."""

    QUIET = ("did not provide metrics", "read_only=True, setting", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in self.QUIET):
            return False
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            cause = record.exc_info[1] if record.exc_info else None
            return io_error(cause) is None and io_error(ValueError(message)) is None
        return True


logging.getLogger("absl").addFilter(_QuietFilter())


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
        """Write asynchronously, with the digest of every leaf of `state` in its meta; `metric` (combined accuracy)
        ranks the checkpoint for 'best'."""
        meta = {**meta, DIGESTS: digests(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave(config)
            ),
            metrics=None if metric is None else {"combined": float(metric)},
            force=True,
        )

    def step_dir(self, step: int) -> str:
        """Where checkpoint `step` lives (what a damage report names)."""
        return os.path.join(self.directory, str(step))

    def restore(self, abstract_state: Any | None = None, step: int | None = None, sharding=None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default latest), checked against its digests (CheckpointDamaged if it fails).
        Without `abstract_state` the state comes back as nested dicts."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        if abstract_state is not None and sharding is not None:
            abstract_state = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self._read(step, args)
        state, meta = restored["state"], dict(restored["meta"])
        check(state, meta.pop(DIGESTS, None), self.step_dir(step))
        return state, meta

    def meta(self, step: int | None = None) -> dict:
        """The metadata of `step` (default latest) alone, without reading the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        return self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def config(self, step: int | None = None) -> ml_collections.ConfigDict:
        """The run's config, over today's defaults so that fields added since it was saved have values."""
        step = self.latest_step() if step is None else step
        saved = self._read(step, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        if not isinstance(saved, dict):
            raise CheckpointDamaged(f"{self.step_dir(step)}: damaged checkpoint (its config is not a JSON object)")
        config = config_lib.get_config()
        config.update(saved)
        return config

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        """manager.restore, with any failure to read the files (missing, truncated, garbled) one CheckpointDamaged."""
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types for one cause: bad files)
            raise CheckpointDamaged(f"{self.step_dir(step)}: damaged checkpoint ({_first_line(e)})") from e

    def intact(
        self, steps: Iterable[int], restore: Callable[[int], Any], report: Callable[[str], None] | None = None
    ) -> tuple[int, Any]:
        """(step, restore(step)) of the first of `steps` that restores; each damaged one is reported in one line.
        CheckpointDamaged (naming the newest damaged one) when none does."""
        report = report or _warn
        damaged: list[CheckpointDamaged] = []
        for step in steps:
            try:
                found = restore(step)
            except CheckpointDamaged as e:
                damaged.append(e)
                report(f"warning: {e}")
                continue
            if damaged:
                report(f"using checkpoint {step}, the newest intact one")
            return step, found
        if not damaged:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        raise CheckpointDamaged(f"no intact checkpoint in {self.directory} (newest: {damaged[0]})")

    def newest_first(self, first: int | None = None) -> list[int]:
        """The steps to try for `first` (default latest): it, then every other step, newest first."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        first = steps[0] if first is None and steps else first
        return [first, *(s for s in steps if s != first)] if first is not None else []

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class CheckpointNotFound(PMGError, FileNotFoundError):
    """No (suitable) checkpoint where the user pointed."""


class CheckpointDamaged(PMGError, ValueError):
    """A checkpoint whose files are missing, unreadable, or whose arrays differ from what was written."""


def _first_line(e: BaseException) -> str:
    """An exception as a short single line (tensorstore's messages run to pages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def _leaf_name(path: tuple) -> str:
    """A leaf's path as the same string whether the tree is the TrainState or the nested dicts orbax restores."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _host(x: Any) -> np.ndarray:
    """A leaf's value on this host (a replicated array's first local copy when it spans hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.ascontiguousarray(np.asarray(x))


def _digest(value: np.ndarray) -> str:
    """SHA-256 of a contiguous array's dtype, shape and bytes (hashed in place, not copied)."""
    digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    digest.update(value.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def digests(state: Any) -> dict[str, str]:
    """SHA-256 of every leaf of a state (dtype, shape and bytes), by leaf name."""
    return {_leaf_name(p): _digest(_host(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def check(state: Any, expected: dict[str, str] | None, where: str) -> None:
    """Raise CheckpointDamaged unless every leaf matches its digest (or, without digests, every float is finite)."""
    leaves = {_leaf_name(p): _host(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    if expected is None:
        for name, value in leaves.items():
            if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
                raise CheckpointDamaged(f"{where}: damaged checkpoint (non-finite values in {name})")
        return
    if set(leaves) != set(expected):
        raise CheckpointDamaged(f"{where}: damaged checkpoint (its arrays are not the ones it recorded)")
    for name, value in leaves.items():
        if _digest(value) != expected[name]:
            raise CheckpointDamaged(f"{where}: damaged checkpoint ({name} differs from the digest written with it)")


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


def unfinished_steps(directory: str) -> list[int]:
    """The steps orbax is still writing (or was, when cut short) in a checkpoints directory, in order."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n and n.split(".")[0].isdigit()]
    return sorted(int(n.split(".")[0]) for n in names)


def names_step(path: str) -> bool:
    """Whether `path` is one checkpoint's own directory (<run>/checkpoints/<step>)."""
    path = os.path.abspath(path)
    return os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints"


def resolve(path: str, which: str = "latest") -> tuple[str, int]:
    """(run dir, step) for a run dir, a folder of runs, a run's checkpoints/ dir or one checkpoint's dir.

    `which` picks the latest or the best (highest combined accuracy) checkpoint of a run;
    a checkpoint's own directory names its step.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if names_step(path):
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
