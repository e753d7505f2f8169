"""Which annotated part a CAM points at: its peak's part and its energy per part, tabulated over a split.

Plain numpy. Maps are (N, H, W) in [0, 1] at input resolution, as `cam.explain` returns them;
parts are (N, P, 3) [x, y, visible] in the same pixels, as the eval batches carry them.

Definitions:
- Pixel (row i, column j) stands at its centre (j + 0.5, i + 0.5), as in localization.peak_points.
- Radius: r = radius x the longer image side, radius 0.1 by default. That is PCK@0.1, the usual
  tolerance of keypoint evaluation on CUB normalised by image size: 44.8 px at 448, 1.4 cells of
  the coarsest map (block3, 14 x 14), so even its peak can land on a part, while parts that far
  apart (eye and nape, breast and belly) still count apart.
- A point's part: the visible part at the smallest Euclidean distance d with d <= r (the edge
  counts); of parts at equal distance, the one listed first. No visible part within r: background.
- Peak: the pixels within TIE_TOL of the map's maximum are its maxima; the peak is the maximum
  nearest their centroid (the first in row-major order among equally near ones). So a plateau,
  e.g. a corner maximum that bilinear upsampling spreads over a block, peaks at its middle, and a
  uniform map at the image centre. A map with no positive value points at nothing: background.
- Energy: every pixel belongs to its part (the rule above) or to background; a part's share is
  its pixels' mass over the map's total, so the shares of the parts and background sum to 1. A
  map with no mass has all of it (share 1) on background. (The energy-based pointing game of
  Score-CAM, with part discs for boxes; overlapping discs are split by nearness.)
- Baseline: a uniform map on the same images. Its peak is the image centre, the centre guess of
  localization's pointing game, and its energy share is each part's share of the image area:
  chance, without the free width a centred Gaussian would bring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

RADIUS = 0.1
TIE_TOL = 1e-6
BACKGROUND = "background"
BASELINE = "uniform map"


class Attribution(NamedTuple):
    """Per image: the part index its peak lands on (-1: background), energy shares (N, P + 1) with background
    last, and which parts are visible (N, P)."""

    peak: np.ndarray
    energy: np.ndarray
    visible: np.ndarray


def radius_px(size: tuple[int, int], radius: float = RADIUS) -> float:
    """The radius in pixels for images of `size` (H, W): a fraction of the longer side."""
    return radius * max(size)


def owners(parts: np.ndarray, size: tuple[int, int], r: float) -> np.ndarray:
    """For one image: the part (index into parts (P, 3)) each pixel of `size` belongs to, -1 for background.

    Each visible part claims the pixels whose centres lie within r of it, over those nearer to an
    earlier part or unclaimed; only strictly nearer ones, so an equal distance keeps the earlier part.
    """
    h, w = size
    owner, best = np.full(size, -1), np.full(size, np.inf)
    for p, (x, y, visible) in enumerate(np.asarray(parts, np.float64)):
        rows = slice(max(int(np.floor(y - r)), 0), max(min(int(np.ceil(y + r)), h), 0))
        cols = slice(max(int(np.floor(x - r)), 0), max(min(int(np.ceil(x + r)), w), 0))
        if visible <= 0 or rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        cy, cx = np.ogrid[rows, cols]
        d2 = np.square(cx + 0.5 - x) + np.square(cy + 0.5 - y)
        claim = (d2 <= r * r) & (d2 < best[rows, cols])
        owner[rows, cols][claim] = p
        best[rows, cols][claim] = d2[claim]
    return owner


def peak_pixel(m: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of one map's peak (see the module's definition), or None if no value is positive."""
    top = float(m.max())
    if top <= 0:
        return None
    rows, cols = np.nonzero(m >= top - TIE_TOL)
    k = np.argmin(np.square(rows - rows.mean()) + np.square(cols - cols.mean()))
    return int(rows[k]), int(cols[k])


def attribute(maps: Mapping[str, np.ndarray], parts: np.ndarray, radius: float = RADIUS) -> dict[str, Attribution]:
    """Each map's peak part and energy shares, by map name; maps (N, H, W), parts (N, P, 3) in the maps' pixels."""
    parts = np.asarray(parts, np.float32)
    arrays = {name: np.asarray(m) for name, m in maps.items()}
    shapes = {m.shape for m in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"maps must all be (N, H, W) of one shape, not {sorted(shapes)}")
    n, h, w = shapes.pop()
    num_parts = parts.shape[1] if parts.ndim == 3 else -1
    if parts.shape != (n, num_parts, 3):
        raise ValueError(f"parts must be (N, P, 3) [x, y, visible] for {n} maps, not {parts.shape}")
    r = radius_px((h, w), radius)
    peaks = {name: np.full(n, -1) for name in arrays}
    energy = {name: np.zeros((n, num_parts + 1)) for name in arrays}
    for i in range(n):
        owner = owners(parts[i], (h, w), r)
        bins = np.where(owner < 0, num_parts, owner).ravel()
        for name, m in arrays.items():
            mass = np.bincount(bins, weights=m[i].ravel(), minlength=num_parts + 1)
            energy[name][i] = mass / mass.sum() if mass.sum() > 0 else np.eye(num_parts + 1)[num_parts]
            pixel = peak_pixel(m[i])
            peaks[name][i] = -1 if pixel is None else owner[pixel]
    return {name: Attribution(peaks[name], energy[name], parts[..., 2] > 0) for name in arrays}


def uniform_baseline(parts: np.ndarray, size: tuple[int, int], radius: float = RADIUS) -> Attribution:
    """The attribution of a uniform map of `size` (H, W) on images with these parts (N, P, 3)."""
    return attribute({BASELINE: np.ones((len(parts), *size))}, parts, radius)[BASELINE]


def concatenate(attributions: Sequence[Attribution]) -> Attribution:
    """One Attribution of the images of several (e.g. one per batch), in order."""
    return Attribution(*(np.concatenate(fields) for fields in zip(*attributions)))


def _shares(a: Attribution, part_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """'peak': fraction of the images showing each part whose peak is on it; 'energy': their mean share.
    Background: over all images. NaN for a part no image shows."""
    peak_on, energy = {}, {}
    for p, name in enumerate(part_names):
        shown = a.visible[:, p]
        peak_on[name] = float(np.mean(a.peak[shown] == p)) if shown.any() else float("nan")
        energy[name] = float(np.mean(a.energy[shown, p])) if shown.any() else float("nan")
    peak_on[BACKGROUND] = float(np.mean(a.peak < 0))
    energy[BACKGROUND] = float(np.mean(a.energy[:, -1]))
    return {"peak": peak_on, "energy": energy}


def _table(
    attributions: Mapping[str, Attribution], baseline: Attribution, part_names: Sequence[str], keep: np.ndarray
) -> dict:
    """The tables of the images where `keep` is true."""
    pick = lambda a: Attribution(a.peak[keep], a.energy[keep], a.visible[keep])
    per_map = {name: _shares(pick(a), part_names) for name, a in attributions.items()}
    return {
        "count": int(keep.sum()),
        "visible": {name: int(baseline.visible[keep, p].sum()) for p, name in enumerate(part_names)},
        "peak": {name: s["peak"] for name, s in per_map.items()},
        "energy": {name: s["energy"] for name, s in per_map.items()},
        "baseline": _shares(pick(baseline), part_names),
    }


def tables(
    attributions: Mapping[str, Attribution],
    baseline: Attribution,
    part_names: Sequence[str],
    *,
    radius: float = RADIUS,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Map x part tables over a split: 'peak' (fraction of the images showing the part whose peak is on it)
    and 'energy' (their mean share), each {map: {part or 'background': value}}, the uniform-map 'baseline',
    'visible' counts per part, and with `labels` (N,) the same per class under 'per_class'."""
    n = len(baseline.peak)
    if any(len(a.peak) != n for a in attributions.values()):
        raise ValueError("every map's attribution must cover the same images as the baseline")
    if baseline.visible.shape[1:] != (len(part_names),):
        raise ValueError(f"{len(part_names)} part names for attributions of {baseline.visible.shape[1]} parts")
    out = {"radius": radius, "parts": list(part_names), **_table(attributions, baseline, part_names, np.ones(n, bool))}
    if labels is not None:
        labels = np.asarray(labels)
        name = lambda c: class_names[c] if class_names is not None else str(c)
        out["per_class"] = {
            name(int(c)): _table(attributions, baseline, part_names, labels == c) for c in np.unique(labels)
        }
    return out


def _row(label: str, values: Mapping[str, float]) -> list[str]:
    """A table row: the label, then each value in % ('-' where undefined)."""
    return [label, *("-" if np.isnan(v) else f"{100 * v:.1f}" for v in values.values())]


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """Text lines of a table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]


def _format_one(table: dict, part_names: Sequence[str], radius: float, title: str) -> list[str]:
    """The text lines of one set of tables (a split's, or one class's)."""
    header = ["map", *part_names, BACKGROUND]
    lines = []
    for kind, what in (
        ("peak", "images whose CAM peak lands on the part (of those showing it)"),
        ("energy", "mean share of the CAM's energy on the part"),
    ):
        lines.append(f"{what}{title}: {table['count']} images, radius {radius:g} of the image side")
        rows = [_row(name, values) for name, values in table[kind].items()]
        lines += _aligned(header, [*rows, _row(BASELINE, table["baseline"][kind])])
        lines.append("")
    lines.append("  images showing each part: " + ", ".join(f"{k} {v}" for k, v in table["visible"].items()))
    return lines


def format_tables(report: dict, title: str = "", per_class: bool = False) -> str:
    """The peak and energy tables as aligned text, a row per map and the uniform-map baseline, values in %;
    with per_class, each class's tables follow."""
    lines = _format_one(report, report["parts"], report["radius"], title)
    for name, table in report.get("per_class", {}).items() if per_class else ():
        lines += ["", *_format_one(table, report["parts"], report["radius"], f"{title}, class {name}")]
    return "\n".join(lines)
