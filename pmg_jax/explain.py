"""Explain a restored PMG: images or a sample of a dataset split in; maps, predictions and files out.

    r = state.restore("runs/cub")
    results = explain.explain(r, explain.from_files(["bird.jpg"])[0], out_dir="out/")
    results = explain.explain(r, explain.from_split(r.config, "test", 16), out_dir="out/")

Each image gets the seed's overlays (conv_block{k}_<tag>.jpg, conv_block_concat_<tag>.jpg) and a titled
grid (grid_<tag>.png, its caption stored inside); index.html in the folder is rebuilt from every grid
there, so it never shows a partial view. `localize` measures how well the maps localise over a split.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from pmg_jax import cam, localization, viz
from pmg_jax import model as model_lib
from pmg_jax.data import decode, pipeline, sources
from pmg_jax.state import Restored, transform_spec



@dataclasses.dataclass(frozen=True)
class Item:
    """One image to explain: a file-safe tag, where it came from, its RGB pixels and its label if known."""

    tag: str
    origin: str
    image: np.ndarray
    label: int | None = None


@dataclasses.dataclass
class Explained:
    """One image's results: maps by method and map name ((H, W) in [0, 1] at the network input size), each
    head's probabilities, and the grids written (by method)."""

    item: Item
    maps: dict[str, dict[str, np.ndarray]]
    probabilities: dict[str, np.ndarray]
    grids: dict[str, str]

    def top(self, head: str, k: int = 5, class_names: Sequence[str] = ()) -> list[tuple[str, float]]:
        """The k most probable (class name, probability) of one head."""
        names = class_names or [str(i) for i in range(len(self.probabilities[head]))]
        return viz.top_k(self.probabilities[head], names, k)


def unique_tags(paths: Sequence[str]) -> list[str]:
    """File stems, with _2, _3, ... appended where two images share one."""
    seen: dict[str, int] = {}
    tags = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        tags.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return tags


def from_files(specs: Sequence[str]) -> tuple[list[str], Iterator[Item], list[str]]:
    """(paths, items, problems) for files, directories and globs; an unreadable file is a problem
    appended to `problems` (with its reason) when the iterator reaches it, and skipped."""
    paths, problems = sources.collect_images(specs)

    def items() -> Iterator[Item]:
        for path, tag in zip(paths, unique_tags(paths)):
            try:
                yield Item(tag, path, decode.read_image(path))
            except decode.UnreadableImage as e:
                problems.append(f"{path}: {e}")

    return paths, items(), problems


def sample_indices(size: int, count: int) -> list[int]:
    """`count` indices spread evenly over a split of `size` examples (all of them if it is smaller):
    deterministic, and across the classes of splits stored class by class."""
    if count >= size:
        return list(range(size))
    return sorted({int(i) for i in np.linspace(0, size - 1, count).round()})


def from_split(config, split: str, count: int) -> tuple[list[int], Iterator[Item]]:
    """(indices, items) of a deterministic sample of `count` examples of a dataset split ('train' or 'test'),
    read through `config` (a checkpoint's own)."""
    source = sources.make_source(config, split)
    indices = sample_indices(len(source), count)

    def items() -> Iterator[Item]:
        for i in indices:
            record = source[i]
            example = decode.load_example(record)
            yield Item(f"{split}_{i:05d}", decode.record_name(record) if isinstance(record["image"], str)
                       else f"{config.dataset.name} {split} #{i}", example["image"], example["label"])

    return indices, items()


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _titles(item: Item, maps: dict[str, np.ndarray], top: dict[str, tuple[str, float]],
            class_names: Sequence[str]) -> dict[str, list[str]]:
    """Grid titles: the image (and its true class), then each map with its head's top class; an all-zero map
    says so (the head saw no positive evidence at that map), rather than showing a silent flat panel."""
    first = [os.path.basename(item.origin), f"{item.image.shape[1]}x{item.image.shape[0]}"]
    if item.label is not None:
        first[1] += f", true: {class_names[item.label]}"
    titles = {"input": first}
    for name, m in maps.items():
        head = model_lib.HEADS[cam.HEAD_OF[name]]
        second = f"{top[head][0]} {100 * top[head][1]:.0f}%"
        if not np.any(m > 0):
            second = "all zero: no positive evidence"
        titles[name] = [f"{viz.map_label(name)} ({head})", second]
    return titles


def explain(
    restored: Restored,
    items: Iterable[Item],
    *,
    maps: Sequence[str] = (*model_lib.BLOCKS, "concat"),
    methods: Sequence[str] = ("gradcam",),
    target: str = "predicted",
    class_id: int | None = None,
    concat: str = "seed",
    batch_size: int = 8,
    out_dir: str | None = None,
    save_npy: bool = False,
    on_result: Callable[[Explained], None] | None = None,
) -> list[Explained]:
    """Maps and predictions for every item, in one jitted pass per batch and method; with `out_dir`, the
    overlays, grids and captions are written there (one subfolder per method when there are several) and
    each folder's index.html is rebuilt. `target` is predicted | seed | class (then `class_id`)."""
    if target == "class" and (class_id is None or not 0 <= class_id < len(restored.class_names)):
        raise ValueError(f"class target {class_id}: the model has {len(restored.class_names)} classes")
    maps = tuple(n for n in cam.MAP_NAMES if n in maps)
    config, names = restored.config, restored.class_names
    explainers = {m: cam.make_explainer(restored.model, maps, m, target, concat) for m in methods}
    outs = {m: None if out_dir is None else out_dir if len(methods) == 1 else os.path.join(out_dir, m)
            for m in methods}
    for d in outs.values():
        if d is not None:
            os.makedirs(d, exist_ok=True)
    size, mean, std = config.data.crop_size, tuple(config.data.mean), tuple(config.data.std)
    classes = np.full(batch_size, class_id or 0, np.int32)
    results = []
    for batch in _batches(items, batch_size):
        x = np.zeros((batch_size, size, size, 3), np.float32)  # padded: one compiled shape
        x[:len(batch)] = [cam.prepare(item.image, size, mean, std) for item in batch]
        per_method = {m: jax.device_get(explainer(restored.variables, x, classes))
                      for m, explainer in explainers.items()}
        first = per_method[methods[0]]
        probs = {h: np.asarray(jax.nn.softmax(z)) for h, z in zip(model_lib.HEADS, first.logits)}
        for i, item in enumerate(batch):
            result = Explained(item, {m: {n: np.asarray(out.maps[n][i]) for n in maps} for m, out in
                                      per_method.items()}, {h: p[i] for h, p in probs.items()}, {})
            top = {h: result.top(h, 1, names)[0] for h in model_lib.HEADS}
            caption = [item.origin, *(f"{h}: {n} {100 * q:.1f}%" for h, (n, q) in top.items())]
            for method, folder in outs.items():
                if folder is not None:
                    grid = viz.save_explanation(folder, item.tag, item.image, result.maps[method],
                                                _titles(item, result.maps[method], top, names), save_npy, caption)
                    result.grids[method] = os.path.join(folder, grid)
            results.append(result)
            if on_result is not None:
                on_result(result)
    for method, folder in outs.items():
        if folder is not None and results:
            viz.rebuild_index(folder, f"{method} of {', '.join(maps)} ({restored.run})")
    return results


class _Prefix:
    """The first n examples of a random-access source."""

    def __init__(self, source: pipeline.Source, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.source[index]


def has_boxes(source: pipeline.Source) -> bool:
    """Whether a split carries the boxes localisation is measured against."""
    return len(source) > 0 and (source[0].get("box") is not None or source[0].get("rel_box") is not None)


def localize(
    restored: Restored,
    split: str = "test",
    *,
    maps: Sequence[str] = (*model_lib.BLOCKS, "concat"),
    methods: Sequence[str] = ("gradcam",),
    target: str = "class",
    concat: str = "seed",
    batch_size: int = 8,
    max_images: int | None = None,
    auc_steps: int = 16,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Localisation metrics (pmg_jax.localization.evaluate) of a split with boxes, through the checkpoint's own
    eval transform; ValueError when the split has no boxes."""
    source = sources.make_source(restored.config, split)
    if not has_boxes(source):
        raise ValueError(f"split {split!r} of {restored.config.dataset.name} has no boxes to evaluate against")
    if max_images:
        source = _Prefix(source, max_images)
    spec = transform_spec(restored.config)
    _, batches = pipeline.eval_batches(source, spec, pipeline.host_layout(batch_size), with_box=True)
    maps = tuple(n for n in cam.MAP_NAMES if n in maps)
    return localization.evaluate(restored.model, restored.variables, batches, spec, maps=maps, methods=methods,
                                 target=target, concat=concat, auc_steps=auc_steps, progress=progress)
