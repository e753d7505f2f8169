"""One image's block maps over a run's epochs, in one strip figure (from the CAMs a run logs with config.log_cams).

Rows are the maps (blocks 1-3 and the concat map), columns the evaluations in order; each tile is titled with its
head's top class then. The command line is pmg_jax/cli/explain_history.py (`python -m pmg_jax.explain_history`).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from pmg_jax import cam, cam_log, methods, viz
from pmg_jax import checkpoint as ckpt_lib
from pmg_jax.errors import PMGError

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.npz$")
_FIELDS = ("maps", "images", "labels", "probabilities", "indices", "class_names", "map_names")
# Records written before PMG-V2 name no outputs: they are all PMG's
_PMG_OUTPUTS = {"output_names": methods.PMG.eval_names, "map_outputs": None}


class NoHistory(PMGError, FileNotFoundError):
    """A run without logged CAMs, or a request for an image it did not log."""


def read_history(run: str) -> list[dict[str, np.ndarray]]:
    """Every cams/epoch_<e>.npz of a run in epoch order, as plain arrays (nothing unpickled)."""
    paths = [p for p in glob.glob(os.path.join(run, cam_log.FOLDER, "epoch_*.npz")) if _EPOCH_FILE.search(p)]
    if not paths:
        raise NoHistory(
            f"{run}: no {cam_log.FOLDER}/epoch_*.npz (train with --config.log_cams=N to log N test images' CAMs)"
        )
    history = []
    for path in sorted(paths, key=lambda p: int(_EPOCH_FILE.search(p)[1])):
        try:
            with np.load(path, allow_pickle=False) as f:
                record = {k: f[k] for k in _FIELDS} | {k: f.get(k, v) for k, v in _PMG_OUTPUTS.items()}
        except (OSError, ValueError, KeyError) as e:
            raise NoHistory(f"{path}: not a CAM record of pmg_jax ({e})") from e
        record["epoch"] = int(_EPOCH_FILE.search(path)[1])
        history.append(record)
    return history


def find_run(path: str) -> str:
    """`path` if it is a run (or holds cams/), else the newest run in it; `path` itself when it has none, so that
    the error names what is missing there."""
    if any(os.path.isdir(os.path.join(path, d)) for d in (cam_log.FOLDER, "checkpoints")):
        return path
    try:
        return ckpt_lib.find_run(path)
    except ckpt_lib.CheckpointNotFound:
        return path


def strip(history: list[dict[str, np.ndarray]], image: int) -> np.ndarray:
    """One row per map: the image, then that map at each evaluation, titled with the epoch and its head's top
    class then. `image` is a position among the images the run logged."""
    count = len(history[-1]["indices"])
    if not 0 <= image < count:
        raise NoHistory(f"--image {image}: the run logged {count} images (0 to {count - 1})")
    last = history[-1]
    names = [str(c) for c in last["class_names"]]
    picture, label = last["images"][image], names[int(last["labels"][image])]
    rows = []
    outputs = [str(o) for o in last["output_names"]]
    for m, name in enumerate(str(n) for n in last["map_names"]):
        head = cam.head_of(methods.PMG, name) if last["map_outputs"] is None else int(last["map_outputs"][m])
        tiles = [(picture, [f"test #{int(last['indices'][image])}", f"true: {label}"])]
        for record in history:
            top = int(np.argmax(record["probabilities"][image, head]))
            title = [f"{viz.map_label(name)}, epoch {record['epoch']}", f"{outputs[head]}: {names[top]}"]
            tiles.append((viz.overlay(record["images"][image], record["maps"][image, m]), title))
        rows.append(viz.grid(tiles, height=cam_log.TILE))
    return cam_log.stack_rows(rows)


if __name__ == "__main__":  # python -m pmg_jax.explain_history: the command lives in pmg_jax.cli.explain_history
    from pmg_jax.cli import explain_history as _command

    _command.main()
