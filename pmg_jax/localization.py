"""How well CAMs localise: boxes from maps, MaxBoxAcc(V2), localisation accuracy, pointing game, deletion/insertion.

Protocols. Boxes (Choe et al., "Evaluating WSOL Right", CVPR 2020): a map is min-max normalised,
thresholded at each tau of a grid, and the external OpenCV contours of the mask are boxed.
MaxBoxAcc: the best-over-tau fraction of images whose largest contour's box has IoU >= 0.5 with
the ground truth; MaxBoxAccV2: the mean over IoU 0.3/0.5/0.7 of that fraction, with the best
match among all contours' boxes. GT-known and top-1 localisation use the fixed tau = 0.2 of the
CAM paper (Zhou et al. 2016); top-1 also needs the explaining head's prediction to be right.
Pointing game (Zhang et al. 2016): the map's maximum lies inside the box. Deletion / insertion
(Petsiuk et al., RISE 2018): the explained class's probability as the most salient pixels are
deleted (set to the normalisation mean) or inserted into a blurred copy; the area under each curve.
Boxes are half-open pixel boxes [x0, y0, x1, y1], like the datasets'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax import cam, methods, xla_options
from pmg_jax.data import pipeline

THRESHOLDS = np.arange(100) / 100.0
CAM_THRESHOLD_INDEX = 20  # THRESHOLDS[20] = 0.2, the CAM paper's fixed threshold
IOU_V2 = (0.3, 0.5, 0.7)
LABELS = cam.CamOptions(target="class")  # evaluate's default: the method's default maps by Grad-CAM, of the true label
METRICS = ("MaxBoxAcc", "MaxBoxAccV2", "GT-known", "Top-1 Loc", "Top-1 Cls", "Pointing", "Deletion", "Insertion")


def rescale(m: np.ndarray) -> np.ndarray:
    """Min-max normalise one map to [0, 1] (a constant map becomes zeros)."""
    m = np.asarray(m, np.float32)
    span = float(m.max() - m.min())
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def contour_boxes(m: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (K, 4) and areas (K,) of the external contours of `m > threshold`; one empty box if none."""
    mask = (m > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((1, 4), np.float32), np.zeros(1, np.float32)
    rects = np.array([cv2.boundingRect(c) for c in contours], np.float32)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    return boxes, np.array([cv2.contourArea(c) for c in contours], np.float32)


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU (K,) of each of `boxes` (K, 4) with one `box` (4,)."""
    lo = np.maximum(boxes[:, :2], box[:2])
    hi = np.minimum(boxes[:, 2:], box[2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
    union = area(boxes) + area(box) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def iou_curves(m: np.ndarray, box: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold (T,): IoU of the largest contour's box, and the best IoU over all contours' boxes."""
    m = rescale(m)
    largest, best = np.zeros(len(thresholds)), np.zeros(len(thresholds))
    for i, t in enumerate(thresholds):
        boxes, areas = contour_boxes(m, t)
        ious = box_iou(boxes, np.asarray(box, np.float32))
        largest[i], best[i] = ious[np.argmax(areas)], ious.max()
    return largest, best


def max_box_acc(ious: np.ndarray, delta: float = 0.5) -> float:
    """max over thresholds of the fraction of images (rows of `ious` (N, T)) with IoU >= delta."""
    return float(np.max(np.mean(ious >= delta, axis=0)))


def max_box_acc_v2(best_ious: np.ndarray, deltas: Sequence[float] = IOU_V2) -> float:
    """MaxBoxAcc averaged over IoU thresholds, on the all-contours IoUs (N, T)."""
    return float(np.mean([max_box_acc(best_ious, d) for d in deltas]))


def peak_points(maps: np.ndarray) -> np.ndarray:
    """(x, y) pixel centres (N, 2) of each map's maximum (first one on ties)."""
    n, h, w = maps.shape
    y, x = np.unravel_index(np.argmax(maps.reshape(n, -1), axis=1), (h, w))
    return np.stack([x, y], axis=1) + 0.5


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each point (N, 2) lies in its box (N, 4)."""
    return np.all((points >= boxes[:, :2]) & (points <= boxes[:, 2:]), axis=1)


def centre_baseline(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pointing-game hits (N,) of a guess that always points at the image centre."""
    h, w = size
    return points_in_boxes(np.tile([w / 2.0, h / 2.0], (len(boxes), 1)), boxes)


def blur(images: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Gaussian-blurred copies (B, H, W, 3) for insertion; sigma defaults to size / 45 (RISE's 5 px at 224)."""
    sigma = sigma or images.shape[1] / 45.0
    return np.stack([cv2.GaussianBlur(np.asarray(x), (0, 0), sigma) for x in images])


def deletion_insertion(
    model: nn.Module,
    variables: dict,
    images: jax.Array,
    blurred: jax.Array,
    maps: jax.Array,
    classes: jax.Array,
    head: jax.Array,
    steps: int = 16,
    *,
    method: methods.Method,
) -> tuple[jax.Array, jax.Array]:
    """Probability curves (B, steps + 1) of `classes` under output `head` (of method.eval_names, `model`'s
    method: a head or the combined prediction) as salient pixels are deleted / inserted.

    Step i acts on the round(i * H * W / steps) most salient pixels of each map; deleted
    pixels become 0 (the normalisation mean), inserted ones come from `blurred`.
    """
    b, h, w, _ = images.shape
    order = jnp.argsort(-maps.reshape(b, -1), axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1).reshape(b, h, w, 1)
    counts = jnp.round(jnp.linspace(0, h * w, steps + 1)).astype(jnp.int32)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def probabilities(count: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The class probabilities with the `count` most salient pixels deleted, and inserted."""
        salient = ranks < count
        x = jnp.concatenate([jnp.where(salient, 0.0, images), jnp.where(salient, images, blurred)])
        logits = jnp.stack(cam.output_logits(method, model.apply(variables, x, train=False)))[head]
        p = jnp.take_along_axis(jax.nn.softmax(logits), jnp.tile(classes, 2)[:, None], axis=-1)[:, 0]
        return p[:b], p[b:]

    deletion, insertion = jax.lax.map(probabilities, counts)
    return deletion.T, insertion.T


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoidal area under curves (..., S + 1) sampled evenly on [0, 1]."""
    curves = np.asarray(curves, np.float64)
    return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2.0 * (curves.shape[-1] - 1))


def summarize(records: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """The METRICS from per-image records: 'largest' and 'best' IoU curves, 'correct', 'hit', and
    optionally 'deletion' / 'insertion' curves (NaN when absent)."""
    r = {k: np.concatenate(v) for k, v in records.items()}
    localised = r["largest"][:, CAM_THRESHOLD_INDEX] >= 0.5
    return {
        "MaxBoxAcc": max_box_acc(r["largest"]),
        "MaxBoxAccV2": max_box_acc_v2(r["best"]),
        "GT-known": float(np.mean(localised)),
        "Top-1 Loc": float(np.mean(localised & r["correct"])),
        "Top-1 Cls": float(np.mean(r["correct"])),
        "Pointing": float(np.mean(r["hit"])),
        "Deletion": float(np.mean(auc(r["deletion"]))) if "deletion" in r else float("nan"),
        "Insertion": float(np.mean(auc(r["insertion"]))) if "insertion" in r else float("nan"),
    }


def evaluate(
    model: nn.Module,
    variables: dict,
    batches: Iterable[dict],
    spec: pipeline.TransformSpec,
    *,
    options: cam.CamOptions = LABELS,
    auc_steps: int = 16,
    progress: Callable[[int], Any] | None = None,
    on_maps: Callable[[str, cam.Explanation, dict, np.ndarray], Any] | None = None,
) -> dict:
    """Localisation metrics per method and map of `options` over eval batches {'image', 'label', 'box', 'mask'} made
    with `spec`.

    Target 'class' explains the true label (the WSOL protocol), 'finer' contrasts it with its finer_k nearest
    classes (cam.explain); auc_steps=0 skips the (costly:
    2 x (auc_steps + 1) forward passes per map) deletion and insertion curves. Returns {'count', 'centre_pointing',
    'results': {method: {map: {metric: value}}}}; `progress(n)` is called with each batch's real count.
    `on_maps(method, explanation, batch, keep)` sees every batch's maps as they are made, so a caller gathers
    more from the same pass (parts, disagreement); batches without 'box' skip the box metrics, and then
    'centre_pointing' and 'results' are None.
    """
    model_method = cam.method_of(model)
    options = options.for_method(model_method)
    explainers = {m: cam.make_explainer(model, one) for m, one in options.per_method().items()}
    maps, cam_methods = options.maps, options.methods
    curves = xla_options.jit(functools.partial(deletion_insertion, model, steps=auc_steps, method=model_method))
    records = {(m, name): {} for m in cam_methods for name in maps}
    centre, count = [], 0
    for batch in batches:
        keep = np.asarray(batch["mask"]) > 0
        images = np.asarray(pipeline.normalize_on_device(batch["image"], spec))  # uint8 crops or normalised
        labels, boxes = np.asarray(batch["label"]), batch.get("box")
        if boxes is not None:
            boxes = np.asarray(boxes)
            centre.append(centre_baseline(boxes[keep], images.shape[1:3]))
        blurred = blur(images) if auc_steps and boxes is not None else None
        for method, explainer in explainers.items():
            out = explainer(variables, images, labels)
            if on_maps is not None:
                on_maps(method, out, batch, keep)
            for name in maps if boxes is not None else ():
                head = cam.head_of(model_method, name)
                m = np.asarray(out.maps[name])
                ious = [iou_curves(m[i], boxes[i]) for i in np.flatnonzero(keep)]
                new = {
                    "largest": np.array([i[0] for i in ious]).reshape(-1, len(THRESHOLDS)),
                    "best": np.array([i[1] for i in ious]).reshape(-1, len(THRESHOLDS)),
                    "correct": (np.argmax(np.asarray(out.logits[head]), -1) == labels)[keep],
                    "hit": points_in_boxes(peak_points(m[keep]), boxes[keep]),
                }
                if auc_steps:
                    deletion, insertion = curves(variables, images, blurred, out.maps[name], out.targets[:, head], head)
                    new.update(deletion=np.asarray(deletion)[keep], insertion=np.asarray(insertion)[keep])
                for k, v in new.items():
                    records[(method, name)].setdefault(k, []).append(v)
        count += int(keep.sum())
        if progress is not None:
            progress(int(keep.sum()))
    if not count:
        raise ValueError("no examples to evaluate")
    if not centre:
        return {"count": count, "centre_pointing": None, "results": None}
    results = {m: {name: summarize(records[(m, name)]) for name in maps} for m in cam_methods}
    return {"count": count, "centre_pointing": float(np.mean(np.concatenate(centre))), "results": results}


def _cell(metric: str, value: float) -> str:
    """A table cell: '-' for a skipped metric, AUCs as fractions, the rest in %."""
    if np.isnan(value):
        return "-"
    return f"{value:.3f}" if metric in ("Deletion", "Insertion") else f"{100 * value:.1f}"


def format_tables(report: dict, title: str = "") -> str:
    """One aligned table per method: a row per map, accuracies in %, AUCs in [0, 1]."""
    header = ["map", *METRICS]
    lines = []
    for method, per_map in report["results"].items():
        lines.append(
            f"{method}{title}: {report['count']} images; pointing game of a centre guess "
            f"{100 * report['centre_pointing']:.1f}%; Deletion lower is better, Insertion higher"
        )
        rows = [[name, *(_cell(k, v) for k, v in metrics.items())] for name, metrics in per_map.items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            cells = (c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(r, widths)))
            lines.append("  " + "  ".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip()
