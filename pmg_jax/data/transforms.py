"""The reference transforms in OpenCV + numpy, with boxes carried along.

train: resize to resize x resize (bilinear, aspect ignored), zero-pad `pad`, random
crop `crop`, horizontal flip with p = 0.5, scale to [0, 1], normalise (x - mean) / std.
eval: resize, centre crop, normalise. Images are RGB uint8 HxWx3 in, float32 out.
Boxes are [x0, y0, x1, y1] in pixels; part points [x, y, visible] in pixels follow the
eval transform the same way.

Resizing: the reference resizes PIL images, i.e. PIL's bilinear filter, which is
antialiased (its support widens with the downscaling factor). Backends:
- 'auto' (the default): PIL itself whenever a side shrinks, so every shrink is the
  reference's; cv2 INTER_LINEAR when no side does, where it equals PIL's filter
  within 1 grey level (rounding only) at a fraction of the cost.
- 'pil': PIL always, the reference bit for bit.
- 'opencv': cv2 always (INTER_AREA when both sides shrink, else INTER_LINEAR), the
  fastest, but a shrinking side is aliased or filtered differently: about 1 level
  on average and up to a few tens at sharp edges (tests/test_transforms.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

RESIZE_BACKENDS = ("auto", "pil", "opencv")


@dataclasses.dataclass(frozen=True)
class CropParams:
    """The random choices of one train transform: crop corner in the padded image and flip."""

    top: int
    left: int
    flip: bool


def resize(image: np.ndarray, size: int, backend: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resize to size x size, aspect ratio ignored (torchvision Resize((s, s)) on a PIL image).

    `out` (size x size x 3 uint8), if given, receives the result, which is returned.
    """
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"resize backend {backend!r} is not one of {RESIZE_BACKENDS}")
    h, w = image.shape[:2]
    if backend == "pil" or (backend == "auto" and max(h, w) > size):
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        if out is None:
            return resized
        out[...] = resized
        return out
    interp = cv2.INTER_AREA if backend == "opencv" and min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), dst=out, interpolation=interp)


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(v / 255 - mean) / std for every uint8 value v and channel, as a cv2.LUT table."""
    values = np.arange(256, dtype=np.float64)[:, None] / 255.0
    return ((values - np.asarray(mean)) / np.asarray(std)).astype(np.float32).reshape(1, 256, -1)


def normalize(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float], out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 HxWx3 -> float32 (x / 255 - mean) / std per channel, by table lookup (6x numpy's speed).

    `out`, a float32 array of the image's shape, receives the result if given.
    """
    result = cv2.LUT(image, _normalize_table(tuple(mean), tuple(std)), dst=out)
    if out is not None and result is not out:
        out[...] = result  # OpenCV allocated instead of writing into `out`
        return out
    return result


def _crop_span(resize_size: int, crop_size: int, pad: int) -> int:
    span = resize_size + 2 * pad - crop_size
    if span < 0:
        raise ValueError(f"crop {crop_size} is larger than the padded image {resize_size} + 2 x {pad}")
    return span


def sample_crop(rng: np.random.Generator, *, resize_size: int, crop_size: int, pad: int, hflip: bool) -> CropParams:
    """Draw the crop corner (uniform over every position in the padded image) and the flip (p = 0.5)."""
    span = _crop_span(resize_size, crop_size, pad)
    top, left = (int(v) for v in rng.integers(0, span + 1, size=2))
    return CropParams(top, left, hflip and bool(rng.random() < 0.5))


_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """SplitMix64's output function: a 64-bit hash in which every output bit depends on every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# Independent SplitMix64 streams per (seed, position): the example's crop, its positive's crop, which positive.
CROP_STREAM, POSITIVE_CROP_STREAM, POSITIVE_DRAW_STREAM = 0, 1, 2
_STREAM_KEY = 0xD1B54A32D192ED03  # an odd 64-bit constant; stream s keys its outputs by seed's hash xor s * this


def position_hash(seed: int, position: int, stream: int = CROP_STREAM) -> int:
    """Output number `position` of the SplitMix64 stream `stream` keyed by `seed`: 64 random bits that any
    worker, host or restart draws the same for the same (seed, position, stream)."""
    key = _mix64(seed & _MASK64) ^ ((stream * _STREAM_KEY) & _MASK64)
    return _mix64((key + (position + 1) * _GOLDEN64) & _MASK64)


def position_crop(
    seed: int,
    position: int,
    *,
    resize_size: int,
    crop_size: int,
    pad: int,
    hflip: bool,
    stream: int = CROP_STREAM,
) -> CropParams:
    """The crop and flip of the example at a global `position` of a run seeded `seed` (`stream`
    POSITIVE_CROP_STREAM: of its positive, drawn independently).

    From `position_hash`: ~1/20 of the cost of seeding a numpy Generator per example (0.11 ms, 7% of an
    image's decode-and-crop time). The corner takes 21 bits per axis (bias below span / 2**21) and the flip
    the top bit.
    """
    span = _crop_span(resize_size, crop_size, pad)
    h = position_hash(seed, position, stream)
    top, left = (h & 0x1FFFFF) % (span + 1), ((h >> 21) & 0x1FFFFF) % (span + 1)
    return CropParams(top, left, hflip and bool(h >> 63))


def scale_box(box: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """A box in an HxW image -> the same box after resizing the image to size x size."""
    return np.asarray(box, np.float32) * np.array([size / width, size / height] * 2, np.float32)


def crop_box(box: np.ndarray, top: float, left: float, crop_size: int, flip: bool = False) -> np.ndarray:
    """A box in a resized (and padded) image -> the box in its crop, mirrored if flipped, clipped to the crop."""
    box = box - np.array([left, top, left, top], np.float32)
    if flip:
        box = np.array([crop_size - box[2], box[1], crop_size - box[0], box[3]], np.float32)
    return np.clip(box, 0, crop_size).astype(np.float32)


def place_crop(image: np.ndarray, top: int, left: int, size: int, flip: bool, out: np.ndarray) -> np.ndarray:
    """Write the size x size window of `image` at (top, left), mirrored left-right if `flip`, into `out`.

    The window may reach past any edge (negative top/left included); what lies outside
    the image is zero. This is cropping a zero-padded image without building it: one
    copy of the visible part, straight into its destination (a slot of a batch).
    """
    h, w = image.shape[:2]
    r0, r1 = max(top, 0), min(top + size, h)
    c0, c1 = max(left, 0), min(left + size, w)
    if r1 <= r0 or c1 <= c0:
        out[...] = 0
        return out
    o0, o1 = r0 - top, r1 - top
    q0, q1 = (size - (c1 - left), size - (c0 - left)) if flip else (c0 - left, c1 - left)
    out[:o0] = 0
    out[o1:] = 0
    out[o0:o1, :q0] = 0
    out[o0:o1, q1:] = 0
    target = out[o0:o1, q0:q1]
    if flip:
        written = cv2.flip(image[r0:r1, c0:c1], 1, dst=target)  # a reversed numpy view copies ~10x slower
        if not np.shares_memory(written, target):
            target[...] = written
    else:
        target[...] = image[r0:r1, c0:c1]
    return out


def _crop_out(image: np.ndarray, crop_size: int, out: np.ndarray | None) -> np.ndarray:
    return np.empty((crop_size, crop_size) + image.shape[2:], image.dtype) if out is None else out


def train_crop(
    image: np.ndarray,
    params: CropParams,
    *,
    resize_size: int,
    crop_size: int,
    pad: int,
    backend: str = "auto",
    out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Resize, zero-pad `pad`, crop at params and flip: the uint8 part of the train transform.

    The result is written into `out` when given; `scratch` (resize x resize x 3 uint8)
    takes the resized image. Reusing both keeps the input workers from touching fresh
    memory for every image.
    """
    x = resize(image, resize_size, backend, out=scratch)
    return place_crop(x, params.top - pad, params.left - pad, crop_size, params.flip, _crop_out(x, crop_size, out))


def train_box(
    box: np.ndarray, shape: Sequence[int], params: CropParams, *, resize_size: int, crop_size: int, pad: int
) -> np.ndarray:
    """A box in an image of `shape` -> the box in its train crop."""
    resized = scale_box(box, shape[0], shape[1], resize_size)
    return crop_box(resized, params.top - pad, params.left - pad, crop_size, params.flip)


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
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference train transform; returns the normalised crop and the transformed box."""
    params = sample_crop(rng, resize_size=resize_size, crop_size=crop_size, pad=pad, hflip=hflip)
    x = train_crop(image, params, resize_size=resize_size, crop_size=crop_size, pad=pad, backend=backend)
    if box is not None:
        box = train_box(box, image.shape, params, resize_size=resize_size, crop_size=crop_size, pad=pad)
    return normalize(x, mean, std), box


def center_offset(resize_size: int, crop_size: int) -> int:
    """Top-left offset of the centre crop, rounded as torchvision CenterCrop does."""
    return int(round((resize_size - crop_size) / 2.0))


def eval_crop(
    image: np.ndarray,
    *,
    resize_size: int,
    crop_size: int,
    backend: str = "auto",
    out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Resize and centre crop: the uint8 part of the test transform (`out` and `scratch` as in train_crop)."""
    off = center_offset(resize_size, crop_size)
    x = resize(image, resize_size, backend, out=scratch)
    return place_crop(x, off, off, crop_size, False, _crop_out(x, crop_size, out))


def eval_box(box: np.ndarray, shape: Sequence[int], *, resize_size: int, crop_size: int) -> np.ndarray:
    """A box in an image of `shape` -> the box in its centre crop."""
    off = center_offset(resize_size, crop_size)
    return crop_box(scale_box(box, shape[0], shape[1], resize_size), off, off, crop_size)


def eval_parts(parts: np.ndarray, shape: Sequence[int], *, resize_size: int, crop_size: int) -> np.ndarray:
    """Points (P, 3) [x, y, visible] in an image of `shape` -> in its centre crop, as `eval_box` moves boxes.

    A point that the crop leaves out (outside [0, crop_size] on either axis) becomes invisible.
    """
    parts = np.asarray(parts, np.float32).reshape(-1, 3)
    off = center_offset(resize_size, crop_size)
    scale = np.array([resize_size / shape[1], resize_size / shape[0]], np.float32)
    xy = parts[:, :2] * scale - off
    inside = np.all((xy >= 0) & (xy <= crop_size), axis=1)
    return np.column_stack([xy, (parts[:, 2] > 0) & inside]).astype(np.float32)


def eval_transform(
    image: np.ndarray,
    *,
    resize_size: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    box: np.ndarray | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference test transform: resize, centre crop, normalise; returns image and box."""
    x = eval_crop(image, resize_size=resize_size, crop_size=crop_size, backend=backend)
    if box is not None:
        box = eval_box(box, image.shape, resize_size=resize_size, crop_size=crop_size)
    return normalize(x, mean, std), box
