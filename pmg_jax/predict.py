"""Batch prediction with a trained run: the top classes of image files, or the accuracy of a split of its dataset.

Images get the checkpoint's own evaluation transform (resize, centre crop, normalise) and run in fixed-size
batches (the last one padded) through one jitted function, the batch sharded over every local device.
"combined" is the softmax of the method's prediction (config.method: the sum of PMG's four heads' logits, or of
PMG-V2's three), then each head's. Rows go out as CSV,
JSON lines or a table (RowWriter). The command line is pmg_jax/cli/predict.py (`python -m pmg_jax.predict`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pmg_jax import methods, parallel, xla_options
from pmg_jax import model as model_lib
from pmg_jax.data import decode, pipeline, sources, transforms
from pmg_jax.errors import PMGError
from pmg_jax.state import Restored, transform_spec

FORMATS = (".csv", ".jsonl")  # what RowWriter writes, by --out's extension


class PredictError(PMGError, ValueError):
    """Bad input to predict (a flag, a file): the message is the one line to show."""


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A restored checkpoint and its jitted batch function, ready for images."""

    restored: Restored
    batch_size: int
    run_batch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> (logits, probs), (B, outputs, C)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names of run_batch's outputs, in order (`outputs`)."""
        return outputs(self.restored)

    @property
    def spec(self) -> pipeline.TransformSpec:
        return transform_spec(self.restored.config)

    @property
    def class_names(self) -> list[str]:
        return self.restored.class_names


def outputs(restored: Restored) -> tuple[str, ...]:
    """What a run predicts, in order: the combined prediction, then each head of its method (config.method)."""
    return (model_lib.COMBINED, *methods.get(restored.config.method).heads)


def default_batch_size(restored: Restored) -> int:
    """The checkpoint's eval batch, rounded up to a multiple of the local devices."""
    n = jax.local_device_count()
    return -(-restored.config.eval_batch_size // n) * n


def make_predictor(restored: Restored, batch_size: int | None = None) -> Predictor:
    """Jit the model over a mesh of the local devices: variables replicated, the batch sharded on 'data'.

    The function takes uint8 crops (normalised inside, as evaluation does on the device) or normalised
    float32 crops, and returns the logits and softmax probabilities of `outputs(restored)`, shape
    (batch, outputs, classes).
    """
    batch_size = batch_size or default_batch_size(restored)
    devices = jax.local_devices()
    if batch_size < 1 or batch_size % len(devices):
        raise PredictError(
            f"--batch-size {batch_size} must be a positive multiple of the {len(devices)} local device(s)"
        )
    mesh = parallel.make_mesh(devices)
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    spec, model, method = transform_spec(restored.config), restored.model, methods.get(restored.config.method)

    def forward(variables, images):
        logits = model.apply(variables, pipeline.normalize_on_device(images, spec), train=False)
        stacked = jnp.stack([method.combined(logits), *logits], axis=1)
        return stacked, jax.nn.softmax(stacked, axis=-1)

    jitted = xla_options.jit(forward, platform=devices[0].platform, in_shardings=(rep, data), out_shardings=data)
    variables = jax.device_put(restored.variables, rep)

    def run_batch(images: np.ndarray):
        return jitted(variables, jax.device_put(images, data))

    return Predictor(restored, batch_size, run_batch)


LARGE_IMAGE_PIXELS = 1 << 24  # images larger than this (16.8 megapixels) are decoded one at a time
_one_large_image = threading.Lock()


def _crop(path: str, spec: pipeline.TransformSpec, out: np.ndarray) -> str | None:
    """Write the eval crop of the image at `path` into `out`; the reason it cannot be read, or None.

    The decoding threads take turns with large images, so that memory holds one at full size, not one per thread.
    """
    try:
        data = decode.read_file(path)
        width, height = decode.header_size(data) or (0, 0)
        with _one_large_image if width * height > LARGE_IMAGE_PIXELS else contextlib.nullcontext():
            image = decode.decode_image(data, spec.max_pixels)
            transforms.eval_crop(
                image, resize_size=spec.resize_size, crop_size=spec.crop_size, backend=spec.resize_backend, out=out
            )
    except decode.UnreadableImage as e:
        return str(e)
    return None


def top_rows(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[dict]:
    """model.top_k of one probability vector as rows: [{'class', 'index', 'probability'}]."""
    return [{"class": class_names[i], "index": i, "probability": p} for i, p in model_lib.top_k(probs, k)]


def predict_files(
    predictor: Predictor, paths: Sequence[str], *, k: int = 5, heads: bool = False, threads: int = 4
) -> Iterator[dict]:
    """One row per path, in order: {'path', 'combined': top-k[, 'head1', ...]} or {'path', 'error'}.

    Images are decoded and cropped by `threads` threads (OpenCV releases the GIL); a batch is read while
    the previous one runs on the devices.
    """
    spec, n, names = predictor.spec, predictor.batch_size, predictor.class_names
    wanted = predictor.outputs if heads else predictor.outputs[:1]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending = None
        for start in range(0, len(paths), n):
            chunk = paths[start : start + n]
            images = np.zeros((n, spec.crop_size, spec.crop_size, 3), np.uint8)  # padded: one compiled shape
            errors = list(pool.map(_crop, chunk, [spec] * len(chunk), list(images[: len(chunk)])))
            probs = predictor.run_batch(images)[1] if any(e is None for e in errors) else None
            if pending is not None:
                yield from _rows(*pending, predictor.outputs, wanted, names, k)
            pending = (chunk, errors, probs)
        if pending is not None:
            yield from _rows(*pending, predictor.outputs, wanted, names, k)


def _rows(
    chunk: Sequence[str],
    errors: Sequence[str | None],
    probs: jax.Array | None,
    computed: Sequence[str],
    wanted: Sequence[str],
    names: Sequence[str],
    k: int,
) -> Iterator[dict]:
    """The rows of one batch: its readable images' top classes of the `wanted` outputs from `probs` (of the
    `computed` ones), its unreadable ones' errors."""
    probs = None if probs is None else np.asarray(jax.device_get(probs))
    for i, (path, error) in enumerate(zip(chunk, errors)):
        if error is not None:
            yield {"path": path, "error": error}
        else:
            yield {"path": path, **{o: top_rows(probs[i, computed.index(o)], names, k) for o in wanted}}


@dataclasses.dataclass
class SplitResult:
    """Counts over a split: hits per output and class, the combined confusion matrix, unreadable images."""

    outputs: tuple[str, ...]  # the names of the outputs counted (predict.outputs)
    hits: np.ndarray  # (outputs, classes): correct predictions of each output per true class
    counts: np.ndarray  # (classes,): readable examples per true class
    confusion: np.ndarray  # (classes, classes): [true, predicted] of combined
    unreadable: int

    def accuracy(self) -> dict[str, float]:
        """Top-1 % of every output over the readable examples (the keys of steps.evaluate)."""
        total = max(int(self.counts.sum()), 1)
        result = {o: 100.0 * float(self.hits[i].sum()) / total for i, o in enumerate(self.outputs)}
        return {**result, "count": int(self.counts.sum())}


def predict_split(
    predictor: Predictor,
    split: str,
    *,
    k: int = 5,
    heads: bool = False,
    on_row: Callable[[dict], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SplitResult:
    """Predict every example of the checkpoint's dataset `split` through evaluation's own input pipeline.

    Accuracy counts argmax of the logits exactly as evaluation does; `on_row` receives each example's row
    (its name, label and top-k; or an error for an unreadable one), in order.
    """
    source = sources.make_source(predictor.restored.config, split)
    names, c, computed = predictor.class_names, len(predictor.class_names), predictor.outputs
    hits, counts, confusion = np.zeros((len(computed), c), np.int64), np.zeros(c, np.int64), np.zeros((c, c), np.int64)
    wanted = computed if heads else computed[:1]
    unreadable = 0
    _, batches = pipeline.eval_batches(
        source, predictor.spec, pipeline.Layout(predictor.batch_size), workers=predictor.restored.config.data.workers
    )
    paths = getattr(source, "paths", None)  # a folder dataset's files; others are named split[index]
    with batches:
        position = 0
        for batch in batches:
            logits, probs = jax.device_get(predictor.run_batch(batch["image"]))
            real = min(predictor.batch_size, len(source) - position)
            for i in range(real):
                label, index = int(batch["label"][i]), position + i
                name = paths[index] if paths is not None else f"{split}[{index}]"
                if not batch["mask"][i]:
                    unreadable += 1
                    row = {"path": name, "error": "unreadable image"}
                else:
                    pred = np.argmax(logits[i], axis=-1)
                    counts[label] += 1
                    hits[:, label] += pred == label
                    confusion[label, pred[0]] += 1
                    row = {
                        "path": name,
                        "label": names[label],
                        **{o: top_rows(probs[i, computed.index(o)], names, k) for o in wanted},
                    }
                if on_row is not None:
                    on_row(row)
            position += predictor.batch_size
            if progress is not None:
                progress(real)
    return SplitResult(computed, hits, counts, confusion, unreadable)


def format_accuracy(result: SplitResult, class_names: Sequence[str], title: str) -> str:
    """The overall table (every output) and the per-class table (readable images, accuracy of every output)."""
    acc, outs = result.accuracy(), result.outputs
    lines = [
        f"{title}: {acc['count']} images (top-1 %)"
        + (f", {result.unreadable} unreadable" if result.unreadable else ""),
        *(f"  {line}" for line in model_lib.accuracy_table({o: acc[o] for o in outs})),
        "",
        "per class (top-1 %)",
    ]
    width = max([len("class"), *map(len, class_names)])
    lines.append(f"  {'class':<{width}} | {'images':>6} | " + " | ".join(f"{o:>8}" for o in outs))
    for j, name in enumerate(class_names):
        n = result.counts[j]
        vals = " | ".join(f"{100.0 * result.hits[i, j] / n:8.2f}" if n else f"{'-':>8}" for i in range(len(outs)))
        lines.append(f"  {name:<{width}} | {n:>6} | {vals}")
    return "\n".join(lines)


def write_confusion(path: str, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    """Confusion matrix of the combined prediction as CSV: a row per true class, a column per predicted one."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, confusion):
            w.writerow([name, *map(int, row)])


class RowWriter:
    """Rows out as CSV, JSON lines or (no path) a table on stdout, one row at a time."""

    def __init__(self, path: str | None, k: int, outputs: Sequence[str], with_label: bool = False):
        self.path, self.k, self.outputs = path, k, tuple(outputs)
        self.file, self.csv = None, None
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w", newline="")  # noqa: SIM115 (open while writing; close())
        if path.endswith(".csv"):
            fields = ["path", *(["label"] if with_label else []), "error"]
            fields += [f"{o}_top{r}{s}" for o in self.outputs for r in range(1, k + 1) for s in ("", "_prob")]
            self.csv = csv.DictWriter(self.file, fields)
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv is not None:
            flat = {key: row[key] for key in ("path", "label", "error") if key in row}
            for o in self.outputs:
                for r, entry in enumerate(row.get(o, ()), start=1):
                    flat[f"{o}_top{r}"], flat[f"{o}_top{r}_prob"] = entry["class"], f"{entry['probability']:.6f}"
            self.csv.writerow(flat)
        elif self.file is not None:
            self.file.write(json.dumps(row) + "\n")
        else:
            tqdm.write(format_row(row, self.outputs))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def format_row(row: dict, outputs: Sequence[str]) -> str:
    """A row for the terminal: the path (and label), then one line per output with its top classes."""
    head = row["path"] + (f"  (label: {row['label']})" if "label" in row else "")
    if "error" in row:
        return f"{head}\n  error: {row['error']}"
    return "\n".join(
        [
            head,
            *(
                f"  {o:<8} " + " | ".join(f"{e['class']} {100 * e['probability']:.1f}%" for e in row[o])
                for o in outputs
            ),
        ]
    )


if __name__ == "__main__":  # python -m pmg_jax.predict: the command lives in pmg_jax.cli.predict
    from pmg_jax.cli import predict as _command

    _command.run()
