"""Procedural fine-grained "bird" dataset whose classes differ only in a small wing patch.

Every image shows the same stylised bird (tail, legs, body, belly, wing, head, eye, beak) on a
cluttered background.  Position, scale, rotation, horizontal flip, body colours, background,
clutter, global lighting and sensor noise vary freely but are shared by all classes; the class is
encoded only by the colour and shape of a small patch drawn on the wing, whose tight pixel box is
returned with every example, and its centre as the one annotated part ("wing patch").  All nuisance
randomness is drawn independently of the label, so
``make_example(spec, split, i, label=k)`` renders the very same scene with another patch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import zlib

import cv2
import numpy as np

_SHIFT = 4  # fractional bits for sub-pixel cv2 drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

_PATCH_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (225.0, 35.0, 35.0)),
    ("blue", (35.0, 85.0, 235.0)),
    ("yellow", (245.0, 215.0, 30.0)),
    ("white", (245.0, 245.0, 245.0)),
)
_PATCH_SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "bars", "ring")
# Class k has colour k % 4 and shape k % 5: a bijection onto all 20 pairs (gcd(4, 5) = 1), so any
# prefix of the table mixes colour-only and shape-only differences.
MAX_CLASSES = len(_PATCH_COLOURS) * len(_PATCH_SHAPES)
PART_NAMES = ("wing patch",)

_BODY_PALETTE = np.array(
    [
        (120, 85, 55),  # brown
        (130, 130, 128),  # grey
        (110, 112, 60),  # olive
        (80, 90, 105),  # slate
        (185, 160, 120),  # tan
        (70, 62, 55),  # dark
    ],
    dtype=np.float64,
)

# Local object frame: body semi-major axis = 1, bird faces +x, y points down.  Conservative
# bounding box of the whole bird in that frame, used to keep it inside the image.
_OBJECT_EXTENT = np.array([(-1.75, -1.0), (1.75, -1.0), (1.75, 1.15), (-1.75, 1.15)])
_TAIL = np.array([(-0.8, -0.15), (-0.8, 0.25), (-1.7, 0.2), (-1.65, -0.3)])
_BEAK = np.array([(1.28, -0.68), (1.28, -0.42), (1.7, -0.56)])
_LEGS = (((-0.2, 0.5), (-0.25, 1.08)), ((0.2, 0.5), (0.22, 1.08)))
# Patch shapes in a unit frame (the patch "radius" is 1).
_SQUARE = np.array([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)])
_TRIANGLE = np.array([(0.0, -1.15), (1.0, 0.58), (-1.0, 0.58)])
_BARS = tuple(np.array([(-0.9, y0), (0.9, y0), (0.9, y0 + 0.36), (-0.9, y0 + 0.36)]) for y0 in (-0.9, -0.18, 0.54))


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """Parameters of the generated dataset."""

    num_classes: int = 10
    image_size: int = 128
    seed: int = 0


def class_names(num_classes: int) -> list[str]:
    """Human-readable names of the first ``num_classes`` classes, e.g. "red disc wing patch"."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    return [
        f"{_PATCH_COLOURS[k % len(_PATCH_COLOURS)][0]} {_PATCH_SHAPES[k % len(_PATCH_SHAPES)]} wing patch"
        for k in range(num_classes)
    ]


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Similarity transform (flip in x, rotate, scale, translate) from a local frame to pixels."""

    cx: float
    cy: float
    scale: float
    flip: float
    angle: float  # radians

    def apply(self, pts: np.ndarray) -> np.ndarray:
        """Map local points of shape (N, 2) to float pixel coordinates."""
        x = pts[:, 0] * self.flip
        y = pts[:, 1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + self.scale * (c * x - s * y), self.cy + self.scale * (s * x + c * y)], axis=1)

    def fixed(self, pts: np.ndarray) -> np.ndarray:
        """Map local points to cv2 fixed-point integer pixel coordinates."""
        return np.rint(self.apply(pts) * _ONE).astype(np.int32)

    def point(self, x: float, y: float) -> tuple[int, int]:
        """Map one local point to a cv2 fixed-point pixel coordinate."""
        x *= self.flip
        c, s = math.cos(self.angle), math.sin(self.angle)
        px = self.cx + self.scale * (c * x - s * y)
        py = self.cy + self.scale * (s * x + c * y)
        return round(px * _ONE), round(py * _ONE)

    def length(self, value: float) -> int:
        """Map a local length to a cv2 fixed-point length."""
        return max(1, round(value * self.scale * _ONE))

    def degrees(self, local_deg: float) -> float:
        """Map a local ellipse orientation to the cv2 ellipse angle in degrees."""
        return math.degrees(self.angle) + self.flip * local_deg


def _split_id(split: str) -> int:
    """Stable integer id of a split name."""
    return zlib.crc32(split.encode())


def _px(p: np.ndarray) -> tuple[int, int]:
    """Convert a float pixel coordinate (or size) pair to cv2 fixed point."""
    x, y = np.rint(np.asarray(p) * _ONE)
    return int(x), int(y)


def _colour(c: np.ndarray) -> tuple[float, float, float]:
    """Convert an RGB array to a clipped colour tuple for cv2."""
    r, g, b = np.clip(c, 0.0, 255.0)
    return float(r), float(g), float(b)


def _ellipse(
    img: np.ndarray,
    f: _Frame,
    centre: tuple[float, float],
    axes: tuple[float, float],
    angle: float,
    colour: tuple[float, ...],
) -> None:
    """Draw a filled anti-aliased ellipse given in the local frame."""
    cv2.ellipse(
        img, f.point(*centre), (f.length(axes[0]), f.length(axes[1])), f.degrees(angle), 0, 360, colour, -1, _AA, _SHIFT
    )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted vertical gradient with leaf-like clutter and a few small coloured berries."""
    top, bottom = rng.uniform(60.0, 220.0, (2, 3))
    top = 0.5 * top + 0.5 * top.mean()
    bottom = 0.5 * bottom + 0.5 * bottom.mean()
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    column = (1.0 - t) * top.astype(np.float32) + t * bottom.astype(np.float32)
    img = np.ascontiguousarray(np.broadcast_to(column[:, None, :], (size, size, 3)).astype(np.uint8))
    for _ in range(int(rng.integers(3, 9))):
        centre = rng.uniform(0.0, size, 2)
        axes = rng.uniform(0.04, 0.16, 2) * size
        leaf = np.array([60.0, 110.0, 50.0]) + rng.uniform(-35.0, 35.0, 3)
        cv2.ellipse(img, _px(centre), _px(axes), float(rng.uniform(0.0, 180.0)), 0, 360, _colour(leaf), -1, _AA, _SHIFT)
    for _ in range(int(rng.integers(0, 3))):
        centre = rng.uniform(0.0, size, 2)
        radius = rng.uniform(0.015, 0.03) * size
        berry = rng.uniform(0.0, 255.0, 3)
        cv2.circle(img, _px(centre), round(radius * _ONE), _colour(berry), -1, _AA, _SHIFT)
    return img


def _draw_bird(img: np.ndarray, mask: np.ndarray, f: _Frame, rng: np.random.Generator) -> None:
    """Draw the class-independent bird onto ``img`` and its silhouette onto ``mask``."""
    body = _BODY_PALETTE[rng.integers(len(_BODY_PALETTE))] + rng.uniform(-20.0, 20.0, 3)
    wing = body * rng.uniform(0.6, 0.8)
    belly = body + rng.uniform(25.0, 60.0)
    beak = np.array([235.0, 150.0, 40.0]) + rng.uniform(-25.0, 25.0, 3)
    legs = np.array([90.0, 70.0, 55.0]) + rng.uniform(-30.0, 30.0, 3)
    body_tilt, wing_tilt = rng.uniform(-10.0, 10.0, 2)
    leg_width = max(1, round(0.07 * f.scale))
    paints = {"body": body, "wing": wing, "belly": belly, "beak": beak, "legs": legs, "eye": np.zeros(3)}
    for target, colours in ((img, {k: _colour(v) for k, v in paints.items()}), (mask, dict.fromkeys(paints, (255.0,)))):
        for p0, p1 in _LEGS:
            cv2.line(target, f.point(*p0), f.point(*p1), colours["legs"], leg_width, _AA, _SHIFT)
        cv2.fillConvexPoly(target, f.fixed(_TAIL), colours["wing"], _AA, _SHIFT)
        _ellipse(target, f, (0.0, 0.0), (1.0, 0.62), body_tilt, colours["body"])
        _ellipse(target, f, (0.1, 0.28), (0.7, 0.3), body_tilt, colours["belly"])
        _ellipse(target, f, (-0.12, -0.05), (0.68, 0.4), wing_tilt, colours["wing"])
        cv2.fillConvexPoly(target, f.fixed(_BEAK), colours["beak"], _AA, _SHIFT)
        cv2.circle(target, f.point(0.95, -0.55), f.length(0.42), colours["body"], -1, _AA, _SHIFT)
        cv2.circle(target, f.point(1.1, -0.62), f.length(0.08), colours["eye"], -1, _AA, _SHIFT)


def _patch_mask(size: int, f: _Frame, shape: str) -> np.ndarray:
    """Anti-aliased coverage (0-255) of one patch shape drawn in the patch frame ``f``."""
    mask = np.zeros((size, size), np.uint8)
    if shape == "disc":
        cv2.circle(mask, f.point(0.0, 0.0), f.length(1.0), 255, -1, _AA, _SHIFT)
    elif shape == "ring":
        cv2.circle(mask, f.point(0.0, 0.0), f.length(1.0), 255, -1, _AA, _SHIFT)
        cv2.circle(mask, f.point(0.0, 0.0), f.length(0.5), 0, -1, _AA, _SHIFT)
    elif shape == "square":
        cv2.fillConvexPoly(mask, f.fixed(_SQUARE), 255, _AA, _SHIFT)
    elif shape == "triangle":
        cv2.fillConvexPoly(mask, f.fixed(_TRIANGLE), 255, _AA, _SHIFT)
    elif shape == "bars":
        for bar in _BARS:
            cv2.fillConvexPoly(mask, f.fixed(bar), 255, _AA, _SHIFT)
    else:
        raise ValueError(f"unknown patch shape {shape!r}")
    return mask


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """Half-open pixel box [x0, y0, x1, y1] of the nonzero pixels of ``mask``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def make_example(spec: DemoSpec, split: str, index: int, *, label: int | None = None) -> dict:
    """Deterministic example from (seed, split, index); ``label`` overrides the class only.

    Returns {'image': uint8 HxWx3 RGB, 'label': int, 'box': float32 [x0, y0, x1, y1] tight
    half-open pixel box of the wing patch, 'object_box': float32 box of the whole bird, 'parts':
    float32 (1, 3) [x, y, visible]: the wing patch box's centre, visible}.
    """
    index = operator.index(index)
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    if not 1 <= spec.num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {spec.num_classes}")
    if spec.image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {spec.image_size}")
    label = index % spec.num_classes if label is None else operator.index(label)
    if not 0 <= label < spec.num_classes:
        raise ValueError(f"label must be in [0, {spec.num_classes}), got {label}")
    size = spec.image_size
    rng = np.random.default_rng([spec.seed, _split_id(split), index])

    img = _background(rng, size)

    # Object pose: scale, flip, rotation, then a position keeping the whole bird inside.
    scale = rng.uniform(0.13, 0.19) * size
    flip = 1.0 if rng.random() < 0.5 else -1.0
    angle = math.radians(rng.uniform(-12.0, 12.0))
    extent = _Frame(0.0, 0.0, scale, flip, angle).apply(_OBJECT_EXTENT)
    margin = 0.02 * size
    cx = rng.uniform(margin - extent[:, 0].min(), size - margin - extent[:, 0].max())
    cy = rng.uniform(margin - extent[:, 1].min(), size - margin - extent[:, 1].max())
    frame = _Frame(cx, cy, scale, flip, angle)

    if rng.random() < 0.8:  # perch branch through the feet
        foot = frame.apply(np.array([(0.0, 1.12)]))[0]
        slope = angle + math.radians(rng.uniform(-8.0, 8.0))
        reach = 2.0 * size * np.array([math.cos(slope), math.sin(slope)])
        branch = np.array([100.0, 72.0, 45.0]) + rng.uniform(-30.0, 30.0, 3)
        cv2.line(
            img,
            _px(foot - reach),
            _px(foot + reach),
            _colour(branch),
            max(1, round(rng.uniform(0.12, 0.2) * scale)),
            _AA,
            _SHIFT,
        )

    object_mask = np.zeros((size, size), np.uint8)
    _draw_bird(img, object_mask, frame, rng)

    # Wing patch: class-independent placement and colour jitter, class-dependent colour and shape.
    offset = rng.uniform(-0.08, 0.08, 2) + np.array([-0.15, -0.05])
    centre = frame.apply(offset[None])[0]
    patch_frame = _Frame(
        float(centre[0]),
        float(centre[1]),
        0.22 * scale * rng.uniform(0.9, 1.1),
        flip,
        angle + math.radians(rng.uniform(-15.0, 15.0)),
    )
    tint = rng.uniform(0.85, 1.05) + rng.uniform(-0.05, 0.05, 3)
    gain, bias, sigma = rng.uniform(0.85, 1.15), rng.uniform(-15.0, 15.0), rng.uniform(2.0, 8.0)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)

    patch = _patch_mask(size, patch_frame, _PATCH_SHAPES[label % len(_PATCH_SHAPES)])
    box = _tight_box(patch)
    x0, y0, x1, y1 = box.astype(int)
    alpha = patch[y0:y1, x0:x1, None].astype(np.float32) / 255.0
    colour = np.clip(np.array(_PATCH_COLOURS[label % len(_PATCH_COLOURS)][1]) * tint, 0.0, 255.0)
    out = img.astype(np.float32)
    region = out[y0:y1, x0:x1]
    region += alpha * (colour.astype(np.float32) - region)

    out *= gain
    out += bias
    out += sigma * noise
    image = np.clip(out, 0.0, 255.0).astype(np.uint8)
    part = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0]], np.float32)
    return {"image": image, "label": label, "box": box, "object_box": _tight_box(object_mask), "parts": part}


class DemoSource:
    """Random-access source (len + __getitem__) of ``size`` examples, usable as a grain data source."""

    def __init__(self, spec: DemoSpec, split: str, size: int) -> None:
        """Store the spec, split name and number of examples."""
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        self.spec = spec
        self.split = split
        self.size = size
        self.class_names: list[str] = class_names(spec.num_classes)
        self.part_names: tuple[str, ...] = PART_NAMES

    def __len__(self) -> int:
        """Number of examples."""
        return self.size

    @property
    def labels(self) -> np.ndarray:
        """Every example's class (index mod the class count), without rendering the images."""
        return np.arange(self.size) % self.spec.num_classes

    def __getitem__(self, index: int) -> dict:
        """Example ``index`` (negative indices count from the end)."""
        index = operator.index(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index out of range for DemoSource of size {self.size}")
        return make_example(self.spec, self.split, index)

    def __repr__(self) -> str:
        """Stable description, e.g. for grain checkpoints."""
        return f"DemoSource(spec={self.spec!r}, split={self.split!r}, size={self.size})"


def write_files(out: str, spec: DemoSpec, split: str, count: int, class_folders: bool = False) -> list[str]:
    """Write the first `count` examples of a split as PNG files into `out`, flat or as `out/<split>/<class>/`
    (an ImageFolder tree that any reader, ours or torchvision's, takes); returns the paths written."""
    names = class_names(spec.num_classes)
    paths = []
    for i in range(count):
        example = make_example(spec, split, i)
        name = names[example["label"]]
        folder = os.path.join(out, split, name) if class_folders else out
        os.makedirs(folder, exist_ok=True)
        stem = f"{split}_{i:05d}" if class_folders else f"{split}_{i:05d}_{name.replace(' ', '_')}"
        paths.append(os.path.join(folder, stem + ".png"))
        if not cv2.imwrite(paths[-1], cv2.cvtColor(example["image"], cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {paths[-1]}")
    return paths


def main(argv: list[str] | None = None) -> None:
    """Write demo images as PNG files (to try predict and explain on files, or to train from an ImageFolder):
    python -m pmg_jax.data.synthetic."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pmg_jax.data.synthetic", description=main.__doc__)
    p.add_argument("--out", required=True, help="folder to write into (made if needed)")
    p.add_argument("--count", type=int, default=8, help="images to write")
    p.add_argument("--split", default="test", choices=("train", "test"), help="which split's examples")
    p.add_argument("--classes", type=int, default=8, help="classes (configs/demo.py has 8)")
    p.add_argument("--image-size", type=int, default=112, help="side in pixels (configs/demo.py has 112)")
    p.add_argument("--seed", type=int, default=0, help="the generator seed (config.dataset.demo_seed)")
    p.add_argument(
        "--class-folders",
        action="store_true",
        help="write OUT/<split>/<class name>/<split>_<index>.png (an ImageFolder dataset) instead of flat files",
    )
    args = p.parse_args(argv)
    if args.count < 0:
        p.error(f"--count {args.count}: must be 0 or more")
    spec = DemoSpec(args.classes, args.image_size, args.seed)
    write_files(args.out, spec, args.split, args.count, args.class_folders)
    where = os.path.join(args.out, args.split) + "/<class>/" if args.class_folders else args.out
    print(f"wrote {args.count} {args.split} images of the demo dataset to {where}")


if __name__ == "__main__":
    main()
