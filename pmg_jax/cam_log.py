"""Grad-CAM of a few fixed test images at every evaluation, to watch what each block learns as a run goes.

With `config.log_cams = n` (> 0), the training loop makes one `CamLog` before training: it reads n test
images spread over the split, prepares them as explain.py does (the whole image resized to the crop size,
normalised) and jits the explainer once (Grad-CAM of each block from its own head's predicted class, and the
seed's concat map). After each evaluation it runs that one pass on the current weights and writes

- to TensorBoard, one image per map (`cams/block1` ... `cams/concat`, or PMG-V2's `cams/combined`): the n
  overlays side by side;
- `<workdir>/cams/epoch_<e>.png`: a grid, one row per image (the image, then each map titled with its
  head's predicted class and probability);
- `<workdir>/cams/epoch_<e>.npz`: the maps (n, maps, H, W) in [0, 1], the display images, the labels, each
  output's predictions and which output explains each map, which `python -m pmg_jax.explain_history` turns
  into one image's strip over the epochs.

With `log_cams = 0` nothing of this is made: `for_config` returns None and no explainer is traced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import cv2
import jax
import ml_collections
import numpy as np

from pmg_jax import cam, methods, viz
from pmg_jax.data import decode, transforms

FOLDER = "cams"
TILE = 160  # pixels of a tile's side in the logged pictures (room for a class name in its title)


def epoch_stem(epoch: int) -> str:
    """File stem of one evaluation's CAMs in cams/: epoch_<e>, zero-padded so that names sort by epoch."""
    return f"epoch_{epoch:04d}"


def spread_indices(size: int, count: int) -> list[int]:
    """`count` distinct indices spread evenly over a split of `size` (all of them if it is smaller)."""
    if count >= size:
        return list(range(size))
    return sorted({int(i) for i in np.linspace(0, size - 1, count).round()})


class CamLog:
    """The fixed images, their prepared inputs and the explainer compiled for them; called after each evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, model, source, workdir: str, sharding=None):
        size, mean, std = config.data.crop_size, tuple(config.data.mean), tuple(config.data.std)
        self.indices = spread_indices(len(source), config.log_cams)
        examples = [decode.load_example(source[i]) for i in self.indices]
        self.labels = np.array([e["label"] for e in examples], np.int32)
        self.class_names = list(source.class_names)
        self.display = np.stack([transforms.resize(e["image"], size) for e in examples])  # uint8, what the maps cover
        x = np.stack([cam.prepare(e["image"], size, mean, std) for e in examples]).astype(np.float32)
        self.inputs = x if sharding is None else jax.device_put(x, sharding)
        # the maps logged: the run's method's default ones (each block's, and PMG's concat or PMG-V2's combined map)
        self.method = methods.get(config.method)
        self.maps = cam.default_maps(self.method)
        self.explainer = cam.make_explainer(model, cam.CamOptions(self.maps))  # jitted once; every evaluation reuses it
        self.folder = os.path.join(workdir, FOLDER)

    def __call__(self, epoch: int, variables: dict, writer=None, step: int = 0) -> float:
        """Explain the fixed images with `variables`; write the pictures (TensorBoard through `writer` when given,
        and cams/); returns the seconds it took."""
        start = time.perf_counter()
        out = jax.device_get(self.explainer(variables, self.inputs))
        maps = np.stack([np.asarray(out.maps[name], np.float32) for name in self.maps], axis=1)  # (n, maps, H, W)
        probs = np.stack([np.asarray(jax.nn.softmax(z)) for z in out.logits], axis=1)  # (n, outputs, classes)
        if jax.process_index() == 0:
            os.makedirs(self.folder, exist_ok=True)
            stem = os.path.join(self.folder, epoch_stem(epoch))
            np.savez(
                stem + ".npz",
                maps=maps,
                images=self.display,
                labels=self.labels,
                probabilities=probs,
                indices=np.asarray(self.indices, np.int32),
                class_names=np.asarray(self.class_names),
                map_names=np.asarray(self.maps),
                output_names=np.asarray(self.method.eval_names),
                map_outputs=np.asarray([cam.head_of(self.method, name) for name in self.maps], np.int32),
                epoch=np.int32(epoch),
            )
            viz.write_image(stem + ".png", self.grid(maps, probs, epoch))
            if writer is not None:
                for m, name in enumerate(self.maps):
                    row = np.concatenate([_tile(viz.overlay(im, mp[m])) for im, mp in zip(self.display, maps)], 1)
                    writer.add_image(f"cams/{name}", row, step, dataformats="HWC")
                writer.flush()
        return time.perf_counter() - start

    def grid(self, maps: np.ndarray, probs: np.ndarray, epoch: int) -> np.ndarray:
        """One row per image: the image with its true class, then each map titled with its head's top class."""
        rows = []
        for i, image in enumerate(self.display):
            tiles = [(_tile(image), [f"epoch {epoch}, test #{self.indices[i]}", self.class_names[self.labels[i]]])]
            for m, name in enumerate(self.maps):
                head = cam.head_of(self.method, name)
                top = int(np.argmax(probs[i, head]))
                label = f"{self.class_names[top]} {100 * probs[i, head, top]:.0f}%"
                tiles.append((_tile(viz.overlay(image, maps[i, m])), [viz.map_label(name), label]))
            rows.append(viz.grid(tiles, height=TILE))
        return stack_rows(rows)


def _tile(image: np.ndarray) -> np.ndarray:
    """An RGB picture scaled to TILE pixels high (the network's input may be much smaller or larger)."""
    h, w = image.shape[:2]
    if h == TILE:
        return image
    return cv2.resize(
        image, (round(w * TILE / h), TILE), interpolation=cv2.INTER_AREA if h > TILE else cv2.INTER_LINEAR
    )


def stack_rows(rows: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Rows of pictures one above the other, padded white to the widest."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)[:-gap]


def for_config(config: ml_collections.ConfigDict, model, source, workdir: str, sharding=None) -> CamLog | None:
    """The run's CamLog, or None when config.log_cams is 0 (then nothing is read or compiled for it)."""
    if not config.log_cams:
        return None
    return CamLog(config, model, source, workdir, sharding)
