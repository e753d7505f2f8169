"""Explain a restored PMG: images or a sample of a dataset split in; maps, predictions and files out.

    r = state.restore("runs/cub")
    results = explain.explain(r, explain.from_files(["bird.jpg"])[1], out_dir="out/")
    results = explain.explain(r, explain.from_split(r.config, "test", 16)[1], options=cam.CamOptions(target="finer"))

Each image gets the seed's overlays (conv_block{k}_<tag>.jpg, conv_block_concat_<tag>.jpg) and a titled
grid (grid_<tag>.png, its caption stored inside); index.html in the folder is rebuilt from every grid
there, so it never shows a partial view. `evaluate` makes one explain pass over a split and gathers how well
the maps localise its boxes, which annotated parts their peaks land on, and the images whose blocks disagree
most; `write_report` turns that into report.html.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from pmg_jax import cam, localization, methods, parts, report, viz
from pmg_jax import model as model_lib
from pmg_jax.data import decode, pipeline, sources
from pmg_jax.state import Restored, transform_spec


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to explain: a file-safe tag, where it came from, its RGB pixels, its label if known, and the
    (width, height) of the original when `image` is a shrunk copy of it (see `explain`)."""

    tag: str
    origin: str
    image: np.ndarray
    label: int | None = None
    original_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as it was read."""
        return self.original_size or (self.image.shape[1], self.image.shape[0])


@dataclasses.dataclass
class Explained:
    """One image's results: maps by method and map name ((H, W) in [0, 1] at the network input size), the
    probabilities of each output (the model's heads, then the combined prediction: cam.outputs), the grids written
    (by method), for target 'finer' the classes each output's map contrasts its class with (by output), and the
    class each output's maps explain (by output; none: its prediction)."""

    item: Item
    maps: dict[str, dict[str, np.ndarray]]
    probabilities: dict[str, np.ndarray]
    grids: dict[str, str]
    contrasts: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    targets: dict[str, int] = dataclasses.field(default_factory=dict)

    def top(self, head: str, k: int = 5, class_names: Sequence[str] = ()) -> list[tuple[str, float]]:
        """The k most probable (class name, probability) of one head."""
        names = class_names or [str(i) for i in range(len(self.probabilities[head]))]
        return [(names[i], p) for i, p in model_lib.top_k(self.probabilities[head], k)]

    def explained_class(self, head: str) -> int:
        """The class the maps of `head` explain: the one asked for, else the head's prediction."""
        return self.targets.get(head, int(np.argmax(self.probabilities[head])))


def class_lines(probabilities: np.ndarray, explained: int, class_names: Sequence[str]) -> list[str]:
    """A map's class lines: the class it explains with its probability, then the head's prediction if another."""
    predicted = int(np.argmax(probabilities))
    lines = [f"{class_names[explained]} {100 * probabilities[explained]:.0f}%"]
    if predicted != explained:
        lines.append(f"predicted: {class_names[predicted]} {100 * probabilities[predicted]:.0f}%")
    return lines


def unique_tags(paths: Sequence[str]) -> list[str]:
    """File stems, with _2, _3, ... appended where two images share one."""
    seen: dict[str, int] = {}
    tags = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        tags.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return tags


def from_files(
    specs: Sequence[str], max_pixels: int = decode.DEFAULT_MAX_PIXELS
) -> tuple[list[str], Iterator[Item], list[str]]:
    """(paths, items, problems) for files, directories and globs; an unreadable file, or one of more than
    `max_pixels` pixels, is a problem appended to `problems` (with its reason) when the iterator reaches it,
    and skipped."""
    paths, problems = sources.collect_images(specs)

    def items() -> Iterator[Item]:
        for path, tag in zip(paths, unique_tags(paths)):
            try:
                yield Item(tag, path, decode.read_image(path, max_pixels))
            except decode.UnreadableImage as e:
                problems.append(f"{path}: {e}")

    return paths, items(), problems


def sample_indices(size: int, count: int) -> list[int]:
    """`count` indices spread evenly over a split of `size` examples (all of them if it is smaller):
    deterministic, and across the classes of splits stored class by class."""
    if count >= size:
        return list(range(size))
    return sorted({int(i) for i in np.linspace(0, size - 1, count).round()})


def _origin(record: dict, config, split: str, index: int) -> str:
    """How captions name example `index` of a split: its file, else its dataset, split and index."""
    return decode.record_name(record) if isinstance(record["image"], str) else f"{config.dataset.name} {split} #{index}"


def from_split(config, split: str, count: int, problems: list[str] | None = None) -> tuple[list[int], Iterator[Item]]:
    """(indices, items) of a deterministic sample of `count` examples of a dataset split ('train' or 'test'),
    read through `config` (a checkpoint's own). An unreadable example is appended to `problems` and skipped,
    or without that list raises UnreadableImage."""
    source = sources.make_source(config, split)
    indices = sample_indices(len(source), count)

    def items() -> Iterator[Item]:
        for i in indices:
            record = source[i]
            try:
                example = decode.load_example(record, config.data.max_image_pixels)
            except decode.UnreadableImage as e:
                if problems is None:
                    raise
                problems.append(str(e))
                continue
            yield Item(f"{split}_{i:05d}", _origin(record, config, split, i), example["image"], example["label"])

    return indices, items()


def _batches(
    items: Iterable[Item], size: int, prepare: Callable[[np.ndarray], np.ndarray]
) -> Iterator[list[tuple[Item, np.ndarray]]]:
    """Batches of (item, its network input `prepare(image)`); each item's image is replaced by a copy of at most
    viz.MAX_SIDE pixels a side as soon as its input is made, so that a batch of large photos never holds their
    full-size pixels."""
    batch: list[tuple[Item, np.ndarray]] = []
    for item in items:
        x = prepare(item.image)
        shown = viz.bounded(item.image)
        if shown is not item.image:
            item = dataclasses.replace(item, image=shown, original_size=item.size)
        batch.append((item, x))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _titles(
    result: Explained,
    maps: dict[str, np.ndarray],
    class_names: Sequence[str],
    method: methods.Method,
    concat: str = "seed",
) -> dict[str, list[str]]:
    """Grid titles: the image (and its true class), then each map with the class it explains (and its head's
    prediction when that is another class, last); an all-zero map says so (the head saw no positive evidence at
    that map), rather than showing a silent flat panel. With Finer-CAM contrasts, a third line names the classes
    the map is contrasted with. The input's title names the model's method (`method`, whose maps these are)."""
    item = result.item
    first = [f"{os.path.basename(item.origin)} ({method.name})", "{}x{}".format(*item.size)]
    if item.label is not None:
        first[1] += f", true: {class_names[item.label]}"
    titles = {"input": first}
    for name, m in maps.items():
        head = method.eval_names[cam.head_of(method, name)]
        second, *predicted = class_lines(result.probabilities[head], result.explained_class(head), class_names)
        if not np.any(m > 0):
            second = "all zero: no positive evidence"
        titles[name] = [f"{viz.map_label(name)} ({head})", second]
        if result.contrasts:
            seed_sum = name == "concat" and concat == "seed"  # the block maps' sum: each has its own contrast
            titles[name].append(
                "vs each block's nearest"
                if seed_sum
                else "vs " + ", ".join(class_names[c] for c in result.contrasts[head])
            )
        titles[name] += predicted
    return titles


def write_grid(
    folder: str,
    result: Explained,
    method: str,
    class_names: Sequence[str],
    model_method: methods.Method,
    *,
    concat: str = "seed",
    save_npy: bool = False,
    caption: Sequence[str] = (),
) -> str:
    """Write one image's overlays and titled grid of one method into `folder`; returns the grid's path (also
    recorded in result.grids) of a `model_method` model. The caption (stored in the grid) defaults to its origin,
    the model's method and its outputs' top classes."""
    os.makedirs(folder, exist_ok=True)
    top = {h: result.top(h, 1, class_names)[0] for h in result.probabilities}
    caption = caption or [
        f"{result.item.origin} ({model_method.name})",
        *(f"{h}: {n} {100 * q:.1f}%" for h, (n, q) in top.items()),
    ]
    maps = result.maps[method]
    titles = _titles(result, maps, class_names, model_method, concat)
    grid = viz.save_explanation(folder, result.item.tag, result.item.image, maps, titles, save_npy, caption)
    result.grids[method] = os.path.join(folder, grid)
    return result.grids[method]


def contrasts(
    names: Sequence[str], logits: Sequence[np.ndarray], targets: np.ndarray, k: int = cam.FINER_K
) -> list[dict[str, tuple]]:
    """Per image, by output (`names`): the classes Finer-CAM contrasts that output's explained class (`targets`
    (B, outputs)) with."""
    similar = {
        h: np.asarray(cam.similar_classes(np.asarray(z), np.asarray(targets[:, i]), k))
        for i, (h, z) in enumerate(zip(names, logits, strict=True))
    }
    return [{h: tuple(int(c) for c in s[b]) for h, s in similar.items()} for b in range(len(targets))]


def explained(
    items: Sequence[Item],
    slots: Iterable[int],
    outs: dict[str, cam.Explanation],
    options: cam.CamOptions,
    model_method: methods.Method,
) -> list[Explained]:
    """The results of a batch's images (`items`, at `slots` of the batch) from its explanations by method: the maps
    of options.maps, and from the first method's logits each output's (model_method.eval_names) probabilities,
    the class it explains and, for target 'finer', the classes it is contrasted with."""
    first, names = next(iter(outs.values())), model_method.eval_names
    probabilities = [np.asarray(jax.nn.softmax(z)) for z in first.logits]
    targets = np.asarray(first.targets)
    contrasted = contrasts(names, first.logits, targets, options.finer_k) if options.target == "finer" else None
    return [
        Explained(
            item,
            {m: {n: np.asarray(out.maps[n][slot]) for n in options.maps} for m, out in outs.items()},
            {h: p[slot] for h, p in zip(names, probabilities, strict=True)},
            {},
            contrasted[slot] if contrasted else {},
            {h: int(t) for h, t in zip(names, targets[slot], strict=True)},
        )
        for item, slot in zip(items, slots, strict=True)
    ]


def explain(
    restored: Restored,
    items: Iterable[Item],
    *,
    options: cam.CamOptions = cam.DEFAULT,
    class_id: int | None = None,
    batch_size: int = 8,
    out_dir: str | None = None,
    save_npy: bool = False,
    on_result: Callable[[Explained], None] | None = None,
    keep: bool = True,
) -> list[Explained]:
    """Maps and predictions for every item, in one jitted pass per batch and method; with `out_dir`, the
    overlays, grids and captions are written there (one subfolder per method when there are several) as each
    batch is done, and each folder's index.html is rebuilt. With keep=False the results are only written and
    passed to `on_result`, not returned, so that memory holds one batch whatever the number of images.
    options.target is predicted | seed | class (then `class_id`) | finer (each head's prediction against its
    finer_k nearest classes, see cam.explain). options.maps must be maps of the run's method (config.method); none
    means its default maps."""
    if options.target == "class" and (class_id is None or not 0 <= class_id < len(restored.class_names)):
        raise ValueError(f"class target {class_id}: the model has {len(restored.class_names)} classes")
    model_method = methods.get(restored.config.method)
    options = options.for_method(model_method)
    config, names, cam_methods = restored.config, restored.class_names, options.methods
    explainers = {m: cam.make_explainer(restored.model, one) for m, one in options.per_method().items()}
    outs = {
        m: None if out_dir is None else out_dir if len(cam_methods) == 1 else os.path.join(out_dir, m)
        for m in cam_methods
    }
    size, mean, std = config.data.crop_size, tuple(config.data.mean), tuple(config.data.std)
    # Only a class target takes classes: for 'finer' they would replace each head's prediction.
    classes = np.full(batch_size, class_id, np.int32) if options.target == "class" else None
    results, count = [], 0
    prepare = functools.partial(cam.prepare, size=size, mean=mean, std=std)
    for pairs in _batches(items, batch_size, prepare):
        batch = [item for item, _ in pairs]
        x = np.zeros((batch_size, size, size, 3), np.float32)  # padded: one compiled shape
        x[: len(batch)] = [prepared for _, prepared in pairs]
        per_method = {
            m: jax.device_get(explainer(restored.variables, x, classes)) for m, explainer in explainers.items()
        }
        for result in explained(batch, range(len(batch)), per_method, options, model_method):
            for method, folder in outs.items():
                if folder is not None:
                    write_grid(folder, result, method, names, model_method, concat=options.concat, save_npy=save_npy)
            count += 1
            if keep:
                results.append(result)
            if on_result is not None:
                on_result(result)
    for method, folder in outs.items():
        if folder is not None and count:
            viz.rebuild_index(folder, f"{method} of {', '.join(options.maps)} ({restored.run})")
    return results


class _Prefix:
    """The first n examples of a random-access source, with its class and part names."""

    def __init__(self, source: pipeline.Source, n: int):
        self.source, self.n = source, min(n, len(source))
        self.class_names = getattr(source, "class_names", ())
        self.part_names = pipeline.part_names(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.source[index]


def has_boxes(source: pipeline.Source) -> bool:
    """Whether a split carries the boxes localisation is measured against."""
    return len(source) > 0 and (source[0].get("box") is not None or source[0].get("rel_box") is not None)


@dataclasses.dataclass
class Evaluation:
    """One explain pass over a split: its CAM options, localisation.evaluate's report (its 'results' None without
    boxes), the part tables by method (parts.tables; None without parts), and by method the (disagreement, image)
    pairs of the images whose block maps disagree most (report.disagreement), most first, each image as the
    network saw it (the eval crop) with its maps."""

    split: str
    options: cam.CamOptions
    localization: dict
    parts: dict[str, dict] | None
    disagreeing: dict[str, list[tuple[float, Explained]]]


def _display(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB pictures of a batch's images (uint8 crops as they are, normalised ones undone)."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint((images * np.asarray(std) + np.asarray(mean)) * 255), 0, 255).astype(np.uint8)


class _Gatherer:
    """Called with every batch's maps during localization.evaluate's pass: keeps each map's part attribution
    and, by method, a running top `keep_top` of the images whose blocks disagree most."""

    def __init__(
        self,
        restored: Restored,
        source: pipeline.Source,
        split: str,
        layout: pipeline.Layout,
        options: cam.CamOptions,
        keep_top: int,
    ):
        self.restored, self.source, self.split, self.layout = restored, source, split, layout
        self.method = methods.get(restored.config.method)
        self.options, self.maps = options, options.maps
        self.part_names = pipeline.part_names(source)
        self.blocks = tuple(b for b in model_lib.BLOCKS if b in self.maps)
        self.keep_top = keep_top if len(self.blocks) >= 2 else 0
        self.attributions: dict[str, dict[str, list[parts.Attribution]]] = {}
        self.parts, self.labels, self.batches_seen = [], [], {}
        self.top: dict[str, list[tuple[float, Explained]]] = {}

    def __call__(self, method: str, out: cam.Explanation, batch: dict, keep: np.ndarray) -> None:
        number = self.batches_seen[method] = self.batches_seen.get(method, -1) + 1
        maps = {name: np.asarray(out.maps[name])[keep] for name in self.maps}
        if self.part_names:
            if method == next(iter(self.batches_seen)):  # the first method: the images' parts and labels, once
                self.parts.append(np.asarray(batch["parts"])[keep])
                self.labels.append(np.asarray(batch["label"])[keep])
            per_map = self.attributions.setdefault(method, {name: [] for name in self.maps})
            for name, a in parts.attribute(maps, np.asarray(batch["parts"])[keep]).items():
                per_map[name].append(a)
        if self.keep_top:
            self._rank(method, out, batch, keep, number, report.disagreement(maps, self.blocks))

    def _rank(
        self, method: str, out: cam.Explanation, batch: dict, keep: np.ndarray, number: int, scores: np.ndarray
    ) -> None:
        """Merge this batch's images into the method's top list (earlier images first among equal scores)."""
        top = self.top.setdefault(method, [])
        merged = np.concatenate([[score for score, _ in top], scores])
        slots = np.flatnonzero(keep)
        chosen = report.most_disagreeing(merged, self.keep_top)
        new = [int(i) - len(top) for i in chosen if i >= len(top)]
        made = dict(zip(new, self._explained(method, out, batch, slots[new], number), strict=True)) if new else {}
        self.top[method] = [top[i] if i < len(top) else (float(merged[i]), made[int(i) - len(top)]) for i in chosen]

    def _explained(
        self, method: str, out: cam.Explanation, batch: dict, slots: np.ndarray, number: int
    ) -> list[Explained]:
        """The images in `slots` of a batch as Explained results of `method` (their crops, maps, probabilities)."""
        config = self.restored.config
        pictures = _display(np.asarray(batch["image"]), config.data.mean, config.data.std)
        items = []
        for slot in slots:
            index = self.layout.global_position(number, int(slot))
            origin = _origin(self.source[index], config, self.split, index)
            items.append(Item(f"{self.split}_{index:05d}", origin, pictures[slot].copy(), int(batch["label"][slot])))
        return explained(items, slots, {method: out}, self.options, self.method)

    def part_tables(self, size: tuple[int, int]) -> dict[str, dict] | None:
        """parts.tables by method over every image seen, with its uniform-map baseline and per class."""
        if not self.part_names:
            return None
        all_parts, labels = np.concatenate(self.parts), np.concatenate(self.labels)
        baseline = parts.uniform_baseline(all_parts, size)
        return {
            method: parts.tables(
                {name: parts.concatenate(a) for name, a in per_map.items()},
                baseline,
                self.part_names,
                labels=labels,
                class_names=self.restored.class_names,
            )
            for method, per_map in self.attributions.items()
        }


def evaluate(
    restored: Restored,
    split: str = "test",
    *,
    options: cam.CamOptions = localization.LABELS,
    batch_size: int = 8,
    max_images: int | None = None,
    auc_steps: int = 16,
    report_images: int = 8,
    progress: Callable[[int], object] | None = None,
) -> Evaluation:
    """One explain pass over a split through the checkpoint's own eval transform: the localisation metrics
    (pmg_jax.localization.evaluate) where it has boxes, the part tables where it has parts, and the
    `report_images` images whose blocks disagree most. ValueError when the split has neither boxes nor parts;
    CamOptionsError for options.maps that the run's method (config.method) does not have."""
    options = options.for_method(methods.get(restored.config.method))
    source = sources.make_source(restored.config, split)
    boxes, part_names = has_boxes(source), pipeline.part_names(source)
    if not boxes and not part_names:
        raise ValueError(
            f"split {split!r} of {restored.config.dataset.name} has no boxes or part annotations to evaluate against"
        )
    if max_images:
        source = _Prefix(source, max_images)
    spec, layout = transform_spec(restored.config), pipeline.host_layout(batch_size)
    _, batches = pipeline.eval_batches(source, spec, layout, with_box=boxes, with_parts=True)
    gather = _Gatherer(restored, source, split, layout, options, report_images)
    with batches:
        located = localization.evaluate(
            restored.model,
            restored.variables,
            batches,
            spec,
            options=options,
            auc_steps=auc_steps,
            progress=progress,
            on_maps=gather,
        )
    parts_tables = gather.part_tables((spec.crop_size, spec.crop_size))
    return Evaluation(split, options, located, parts_tables, gather.top)


def write_report(evaluation: Evaluation, restored: Restored, out_dir: str, *, title: str = "") -> list[str]:
    """report.html of an evaluation in `out_dir` (in <out_dir>/<method>/ for each of several methods), with the
    most disagreeing images' grids in its report_images/ subfolder; returns the reports' paths."""
    located = evaluation.localization
    cam_methods = list(located["results"] or evaluation.parts or evaluation.disagreeing)
    paths = []
    for method in cam_methods:
        folder = out_dir if len(cam_methods) == 1 else os.path.join(out_dir, method)
        grids = [
            (
                write_grid(
                    os.path.join(folder, "report_images"),
                    result,
                    method,
                    restored.class_names,
                    methods.get(restored.config.method),
                    concat=evaluation.options.concat,
                    caption=[result.item.origin, f"disagreement {score:.3f}"],
                ),
                f"{result.item.origin}: disagreement {score:.3f}",
            )
            for score, result in evaluation.disagreeing.get(method, [])
        ]
        one = {**located, "results": {method: located["results"][method]}} if located["results"] else None
        paths.append(
            report.write_report(
                os.path.join(folder, "report.html"),
                one,
                evaluation.parts[method] if evaluation.parts else None,
                grids,
                title=f"{method} on {restored.config.dataset.name} {evaluation.split}{title}",
            )
        )
    return paths
