"""The reference transforms in OpenCV + numpy, with boxes carried along.

train: resize to resize x resize (bilinear, aspect ignored), zero-pad `pad`, random
crop `crop`, horizontal flip with p = 0.5, scale to [0, 1], normalise (x - mean) / std.
eval: resize, centre crop, normalise. Images are RGB uint8 HxWx3 in, float32 out.
Boxes are [x0, y0, x1, y1] in pixels.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to size x size, aspect ratio ignored (like torchvision Resize((s, s)))."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if (h > size and w > size) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel."""
    x = image.astype(np.float32) * (1.0 / 255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _scale_box(box: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    return box * np.array([size / w, size / h, size / w, size / h], np.float32)


def _clip_box(box: np.ndarray, size: int) -> np.ndarray:
    return np.clip(box, 0, size).astype(np.float32)


def train_transform(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    resize_size: int,
    crop_size: int,
    pad: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: bool = True,
    box: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference train transform; returns the normalised crop and the transformed box."""
    h, w = image.shape[:2]
    x = resize(image, resize_size)
    if pad:
        x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    span = resize_size + 2 * pad - crop_size
    top, left = (int(v) for v in rng.integers(0, span + 1, size=2))
    x = x[top : top + crop_size, left : left + crop_size]
    flip = hflip and bool(rng.random() < 0.5)
    if flip:
        x = x[:, ::-1]
    if box is not None:
        box = _scale_box(np.asarray(box, np.float32), h, w, resize_size) + np.float32(pad)
        box = box - np.array([left, top, left, top], np.float32)
        if flip:
            box = np.array([crop_size - box[2], box[1], crop_size - box[0], box[3]], np.float32)
        box = _clip_box(box, crop_size)
    return normalize(x, mean, std), box


def eval_transform(
    image: np.ndarray,
    *,
    resize_size: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    box: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference test transform: resize, centre crop, normalise; returns image and box."""
    h, w = image.shape[:2]
    x = resize(image, resize_size)
    off = int(round((resize_size - crop_size) / 2.0))  # as torchvision CenterCrop
    x = x[off : off + crop_size, off : off + crop_size]
    if box is not None:
        box = _scale_box(np.asarray(box, np.float32), h, w, resize_size) - np.float32(off)
        box = _clip_box(box, crop_size)
    return normalize(x, mean, std), box
