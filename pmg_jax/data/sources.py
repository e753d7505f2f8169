"""Random-access data sources selected by `config.dataset.name` and `config.dataset.source`.

A source has `len`, `class_names` and `__getitem__` returning a cheap record:
{'image': a file path, encoded bytes or an RGB uint8 array, 'label': int,
optional 'box' [x0, y0, x1, y1] in pixels of the stored image, or 'rel_box' in
fractions of its width and height, optional 'parts' (P, 3) [x, y, visible] in
pixels of the stored image}. A source with parts names them in `part_names`
(CUB's 15, the demo's wing patch); the others have none. Records are decoded by
`decode.load_example` in the input workers, never here.

Folder layouts (source='folder'): CUB-200-2011 as extracted from CUB_200_2011.tgz,
FGVC-Aircraft as extracted from fgvc-aircraft-2013b.tar.gz (variants), Stanford
Cars (devkit .mat files, cars_annos.mat, or the CSV layout), Stanford Dogs
(Images/, Annotation/, train_list.mat, test_list.mat) and ImageFolder
(root/<split>/<class>/<image>). source='tfds' reads any prepared TFDS
image-classification dataset through `tfds.data_source` (array_record).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import logging
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from pmg_jax.data import synthetic
from pmg_jax.errors import ConfigError, PMGError

log = logging.getLogger(__name__)

# Extensions of the formats OpenCV decodes (cv2.imread's documentation).
IMAGE_EXTENSIONS = frozenset(
    {
        ".bmp",
        ".dib",
        ".jpeg",
        ".jpg",
        ".jpe",
        ".jp2",
        ".png",
        ".webp",
        ".avif",
        ".pbm",
        ".pgm",
        ".ppm",
        ".pxm",
        ".pnm",
        ".sr",
        ".ras",
        ".tiff",
        ".tif",
        ".exr",
        ".hdr",
        ".pic",
        ".gif",
    }
)

# TFDS builders of the named datasets.
TFDS_BUILDERS = {"cub": "caltech_birds2011", "cars": "cars196", "dogs": "stanford_dogs"}

_HOW = {
    "cub": "Download CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158), extract it with "
    "`tar xzf CUB_200_2011.tgz` and set config.dataset.data_dir to the CUB_200_2011 folder.",
    "aircraft": "Download https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz, "
    "extract it and set config.dataset.data_dir to the fgvc-aircraft-2013b folder.",
    "cars": "Stanford Cars' original site is offline; from a copy, put cars_train/, cars_test/, devkit/ "
    "(car_devkit.tgz) and cars_test_annos_withlabels.mat in one folder and set config.dataset.data_dir to "
    "it. Also accepted: cars_annos.mat with car_ims/, or anno_train.csv, anno_test.csv and names.csv "
    "with the train and test image folders.",
    "dogs": "Download images.tar, annotation.tar and lists.tar from http://vision.stanford.edu/aditya86/ImageNetDogs/, "
    "extract all three into one folder and set config.dataset.data_dir to it.",
    "imagefolder": "Arrange the images as <data_dir>/<split>/<class name>/<image>, one folder per class.",
}


class DatasetNotFound(PMGError, FileNotFoundError):
    """The configured dataset is missing or incomplete; the message says what was expected and how to get it."""


class DatasetError(PMGError, ValueError):
    """A dataset's index is damaged (a malformed row, a duplicated id, a bad box, a label out of range): the
    message is one line naming the file and line."""


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Images on disk: records carry the path, so workers read and decode them."""

    paths: Sequence[str]
    labels: np.ndarray
    class_names: Sequence[str]
    boxes: np.ndarray | None = None
    parts: np.ndarray | None = None  # (N, P, 3) [x, y, visible], P = len(part_names)
    part_names: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, keep: np.ndarray) -> FileSource:
        """The examples where `keep` (a boolean mask) is true, in order."""
        pick = np.flatnonzero(keep)
        return dataclasses.replace(
            self,
            paths=[self.paths[i] for i in pick],
            labels=self.labels[pick],
            boxes=None if self.boxes is None else self.boxes[pick],
            parts=None if self.parts is None else self.parts[pick],
        )

    def __getitem__(self, index: int) -> dict:
        record = {"image": self.paths[index], "label": int(self.labels[index])}
        if self.boxes is not None:
            record["box"] = self.boxes[index]
        if self.parts is not None:
            record["parts"] = self.parts[index]
        return record


def _not_found(dataset: str, data_dir: str, expected: str) -> DatasetNotFound:
    """The error for `dataset` missing in data_dir: what was expected there and how to get it."""
    return DatasetNotFound(
        f"{dataset} dataset not found in config.dataset.data_dir={data_dir!r}: expected {expected}. {_HOW[dataset]}"
    )


def _check_folder(dataset: str, data_dir: str) -> None:
    """DatasetNotFound when data_dir is an archive (or any file) rather than the extracted folder."""
    if os.path.isfile(data_dir):
        raise DatasetNotFound(
            f"config.dataset.data_dir={data_dir!r} is a file; extract it first (e.g. "
            f"`tar xf {data_dir} -C {os.path.dirname(data_dir) or '.'}`) and point data_dir at "
            f"the extracted folder. {_HOW[dataset]}"
        )


def _find_root(dataset: str, data_dir: str, markers: Sequence[str], subdirs: Sequence[str] = ()) -> str:
    """The first of data_dir and data_dir/<subdir> that holds every marker file, or a DatasetNotFound."""
    _check_folder(dataset, data_dir)
    for root in (data_dir, *(os.path.join(data_dir, s) for s in subdirs)):
        if all(os.path.exists(os.path.join(root, m)) for m in markers):
            return root
    where = f" (there or in its {' or '.join(d + '/' for d in subdirs)})" if subdirs else ""
    raise _not_found(dataset, data_dir, ", ".join(markers) + where)


MISSING_REPORTED = 20  # missing images named one by one in the log; the rest are counted


def _present(dataset: str, data_dir: str, paths: Sequence[str], where: Sequence[str] = ()) -> np.ndarray:
    """Which listed images exist (a boolean mask); each missing one is reported (with `where` the index names
    it, e.g. 'images.txt:17') and skipped. DatasetNotFound when none exists (nothing was extracted)."""
    keep = np.array([os.path.isfile(p) for p in paths], bool)
    missing = np.flatnonzero(~keep)
    for i in missing[:MISSING_REPORTED]:
        place = f" {where[i]}" if where else ""
        log.warning("%s%s: skipping a listed image the disk lacks: %s", dataset, place, paths[i])
    if len(missing) > MISSING_REPORTED:
        log.warning("%s: %d more listed images are missing and skipped", dataset, len(missing) - MISSING_REPORTED)
    if len(paths) and not keep.any():
        raise _not_found(dataset, data_dir, f"the {len(paths)} listed images, but none is there (e.g. {paths[0]})")
    if len(missing):
        log.warning("%s: %d of %d listed images are missing and skipped", dataset, len(missing), len(paths))
    return keep


def _lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of each non-empty line of a UTF-8 text file; DatasetError naming the first line
    holding bytes that are not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _rows(path: str) -> list[list[str]]:
    """Whitespace-separated fields of each non-empty line."""
    return [line.split() for _, line in _lines(path)]


@dataclasses.dataclass(frozen=True)
class _Row:
    """One line of an index file: where it is, its id and the fields after it."""

    path: str
    line: int
    id: str
    fields: list[str]

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _by_id(path: str, columns: Sequence[str], key: str = "image id") -> dict[str, _Row]:
    """Lines '<id> <column>...' by id; DatasetError naming the line of a row with another number of fields or
    of an id seen before."""
    rows: dict[str, _Row] = {}
    for n, text in _lines(path):
        fields = text.split()
        if len(fields) != len(columns) + 1:
            expected = " ".join(f"<{c}>" for c in (key, *columns))
            raise DatasetError(f"{path}:{n}: expected '{expected}', found {len(fields)} field(s)")
        if fields[0] in rows:
            raise DatasetError(f"{path}:{n}: duplicated {key} {fields[0]} (first on line {rows[fields[0]].line})")
        rows[fields[0]] = _Row(path, n, fields[0], fields[1:])
    return rows


def _check_split(dataset: str, split: str, splits: Iterable[str]) -> None:
    """ValueError unless `split` is one of the dataset's splits."""
    if split not in splits:
        raise ConfigError(
            f"{dataset} has no split {split!r} (it has {', '.join(splits)}); "
            "set config.dataset.train_split / test_split"
        )


CUB_PART_FILES = (os.path.join("parts", "parts.txt"), os.path.join("parts", "part_locs.txt"))


def _cub_parts(root: str, data_dir: str, ids: Sequence[str]) -> tuple[list[str], np.ndarray | None]:
    """CUB's part names and each image's (P, 3) [x, y, visible] (rows follow `ids`); none without parts/."""
    names_path, locs_path = (os.path.join(root, f) for f in CUB_PART_FILES)
    present = [os.path.isfile(p) for p in (names_path, locs_path)]
    if not any(present):
        return [], None
    if not all(present):
        raise _not_found("cub", data_dir, f"both of {' and '.join(CUB_PART_FILES)} (or neither)")
    rows = _rows(names_path)
    if [r[0] for r in rows] != [str(i) for i in range(1, len(rows) + 1)] or any(len(r) < 2 for r in rows):
        raise DatasetError(f"{names_path}: expected lines '<part id> <name>' numbered 1, 2, ... in order")
    names = [" ".join(r[1:]) for r in rows]
    try:
        locs = np.loadtxt(locs_path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DatasetError(f"{locs_path}: expected lines '<image id> <part id> <x> <y> <visible>' ({e})") from None
    if locs.shape[1:] != (5,):
        raise DatasetError(
            f"{locs_path}: expected 5 numbers a line (image id, part id, x, y, visible), found {locs.shape[1]}"
        )
    position = {int(i): k for k, i in enumerate(ids)}
    image = np.array([position.get(int(i), -1) for i in locs[:, 0]])
    part = locs[:, 1].astype(int) - 1
    keep = image >= 0
    if np.any((part[keep] < 0) | (part[keep] >= len(names))):
        raise DatasetError(f"{locs_path}: part ids must be 1 to {len(names)}, as in {names_path}")
    count = np.zeros((len(ids), len(names)), int)
    np.add.at(count, (image[keep], part[keep]), 1)
    if np.any(count != 1):
        k, p = np.argwhere(count != 1)[0]
        raise _not_found(
            "cub",
            data_dir,
            f"one row in {CUB_PART_FILES[1]} for each part of each image (image id "
            f"{ids[k]} has {count[k, p]} for part {p + 1})",
        )
    parts = np.zeros((len(ids), len(names), 3), np.float32)
    parts[image[keep], part[keep]] = np.column_stack([locs[keep, 2:4], locs[keep, 4] > 0])
    return names, parts


def _cub_classes(path: str) -> list[str]:
    """classes.txt: '<class id> <name>' numbered 1, 2, ... in order; the names without their number prefix."""
    rows = _by_id(path, ("name",), key="class id")
    for k, row in enumerate(rows.values(), start=1):
        if row.id != str(k):
            raise DatasetError(f"{row.where()}: class id {row.id} out of order (expected {k})")
    return [row.fields[0].split(".", 1)[-1] for row in rows.values()]


def _cub_label(row: _Row, num_classes: int) -> int:
    """The 0-based class of an image_class_labels.txt row; DatasetError unless it is 1..num_classes."""
    value = row.fields[0]
    if not value.isdigit() or not 1 <= int(value) <= num_classes:
        raise DatasetError(f"{row.where()}: class {value!r} is not one of 1..{num_classes} (classes.txt)")
    return int(value) - 1


def _row_box(row: _Row, corners: bool = False) -> list[float]:
    """[x0, y0, x1, y1] of a row's four box numbers: x, y, width, height (CUB), or the corners (Aircraft);
    DatasetError for a value that is not a finite number, a negative size or a corner left of or above the
    image."""
    try:
        x, y, u, v = (float(f) for f in row.fields)
    except ValueError:
        raise DatasetError(f"{row.where()}: box {' '.join(row.fields)!r} is not four numbers") from None
    if not all(math.isfinite(f) for f in (x, y, u, v)):
        raise DatasetError(f"{row.where()}: box {' '.join(row.fields)!r} is not finite")
    w, h = (u - x, v - y) if corners else (u, v)
    if w < 0 or h < 0:
        raise DatasetError(f"{row.where()}: box of negative size {w:g} x {h:g}")
    if x < 0 or y < 0:
        raise DatasetError(f"{row.where()}: box at ({x:g}, {y:g}) starts outside the image")
    return [x, y, x + w, y + h]


_CUB_FILES = {  # CUB's index tables: file, columns after the image id
    "images": ("images.txt", ("path",)),
    "labels": ("image_class_labels.txt", ("class id",)),
    "split": ("train_test_split.txt", ("is training image",)),
    "boxes": ("bounding_boxes.txt", ("x", "y", "width", "height")),
}


def _cub_index(root: str, split: str) -> tuple[list[str], dict[str, dict[str, _Row]]]:
    """The image ids of `split` and each index table's rows by id, every table holding the same ids."""
    rows = {table: _by_id(os.path.join(root, name), columns) for table, (name, columns) in _CUB_FILES.items()}
    images = rows["images"]
    for table, by_id in rows.items():
        extra = next((r for i, r in by_id.items() if i not in images), None)
        if extra is not None:
            raise DatasetError(f"{extra.where()}: image id {extra.id} is not in images.txt")
        lacking = next((r for i, r in images.items() if i not in by_id), None)
        if lacking is not None:
            path = os.path.join(root, _CUB_FILES[table][0])
            raise DatasetError(f"{path}: no line for image id {lacking.id} (of {lacking.where()})")
    for row in rows["split"].values():
        if row.fields[0] not in ("0", "1"):
            raise DatasetError(f"{row.where()}: is-training flag {row.fields[0]!r} is not 0 or 1")
    flag = "1" if split == "train" else "0"
    return [i for i in images if rows["split"][i].fields[0] == flag], rows


def cub_source(data_dir: str, split: str) -> FileSource:
    """CUB-200-2011 from its extracted folder: the official split (train 5994 / test 5794), boxes and 15 parts.

    Every index row is checked: a malformed row, a duplicated id, a bad box or a class outside classes.txt is a
    DatasetError naming the file and line; a listed image the disk lacks is reported and skipped."""
    _check_split("cub", split, ("train", "test"))
    files = tuple(name for name, _ in _CUB_FILES.values())
    root = _find_root("cub", data_dir, (*files, "classes.txt", "images"), ("CUB_200_2011",))
    class_names = _cub_classes(os.path.join(root, "classes.txt"))
    ids, rows = _cub_index(root, split)
    every_label = {i: _cub_label(row, len(class_names)) for i, row in rows["labels"].items()}  # both splits'
    every_box = {i: _row_box(row) for i, row in rows["boxes"].items()}
    labels = np.array([every_label[i] for i in ids], np.int32)
    boxes = np.array([every_box[i] for i in ids], np.float32).reshape(-1, 4)
    paths = [os.path.join(root, "images", rows["images"][i].fields[0]) for i in ids]
    part_names, parts = _cub_parts(root, data_dir, ids)
    source = FileSource(paths, labels, class_names, boxes=boxes, parts=parts, part_names=part_names)
    return source.select(_present("cub", data_dir, paths, [rows["images"][i].where() for i in ids]))


def _aircraft_listing(path: str) -> dict[str, _Row]:
    """images_variant_<split>.txt: '<image id> <variant name>' (the name may hold spaces) by image id."""
    rows: dict[str, _Row] = {}
    for n, text in _lines(path):
        fields = text.strip().split(" ", 1)
        if len(fields) != 2:
            raise DatasetError(f"{path}:{n}: expected '<image id> <variant>', found {len(fields)} field(s)")
        if fields[0] in rows:
            raise DatasetError(f"{path}:{n}: duplicated image id {fields[0]} (first on line {rows[fields[0]].line})")
        rows[fields[0]] = _Row(path, n, fields[0], fields[1:])
    return rows


def aircraft_source(data_dir: str, split: str) -> FileSource:
    """FGVC-Aircraft (fgvc-aircraft-2013b) at variant level: 100 classes, splits train/val/trainval/test, boxes."""
    _check_split("aircraft", split, ("train", "val", "trainval", "test"))
    listing = f"images_variant_{split}.txt"
    root = _find_root(
        "aircraft",
        data_dir,
        ("variants.txt", listing, "images_box.txt", "images"),
        ("data", os.path.join("fgvc-aircraft-2013b", "data")),
    )
    class_names = [line.strip() for _, line in _lines(os.path.join(root, "variants.txt"))]
    index = {name: i for i, name in enumerate(class_names)}
    rows = _aircraft_listing(os.path.join(root, listing))
    unknown = next((r for r in rows.values() if r.fields[0] not in index), None)
    if unknown is not None:
        raise DatasetError(f"{unknown.where()}: variant {unknown.fields[0]!r} is not in variants.txt")
    boxes = _by_id(os.path.join(root, "images_box.txt"), ("xmin", "ymin", "xmax", "ymax"))
    lacking = next((r for i, r in rows.items() if i not in boxes), None)
    if lacking is not None:
        raise DatasetError(
            f"{os.path.join(root, 'images_box.txt')}: no box for image id {lacking.id} ({lacking.where()})"
        )
    paths = [os.path.join(root, "images", f"{image_id}.jpg") for image_id in rows]
    source = FileSource(
        paths=paths,
        labels=np.array([index[r.fields[0]] for r in rows.values()], np.int32),
        class_names=class_names,
        boxes=np.array([_row_box(boxes[i], corners=True) for i in rows], np.float32).reshape(-1, 4),
    )
    return source.select(_present("aircraft", data_dir, paths))


def _mat_struct(path: str, key: str) -> dict[str, np.ndarray]:
    """Fields of a MATLAB struct array (one entry per image) as numpy arrays."""
    from scipy import io as sio

    entries = np.atleast_1d(sio.loadmat(path, squeeze_me=True)[key])
    return {name: np.atleast_1d(entries[name]) for name in entries.dtype.names}


def _mat_strings(path: str, key: str) -> list[str]:
    """A MATLAB cell array of strings."""
    from scipy import io as sio

    return [str(s) for s in np.atleast_1d(sio.loadmat(path, squeeze_me=True)[key])]


def _box_columns(fields: dict[str, np.ndarray]) -> np.ndarray:
    """[x1, y1, x2, y2] boxes from the Stanford Cars annotation fields."""
    return np.stack([fields[k].astype(np.float32) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")], axis=1)


def _first_dir(root: str, candidates: Sequence[str]) -> str | None:
    """root/<candidate> for the first candidate that is a folder, or None."""
    return next((os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))), None)


def _cars_devkit(root: str, split: str) -> FileSource:
    """cars_{train,test}/ images with devkit/cars_meta.mat and the {train, test-with-labels} annotation .mat."""
    if split == "train":
        annos = os.path.join(root, "devkit", "cars_train_annos.mat")
    else:
        annos = _find_root("cars", root, ("cars_test_annos_withlabels.mat",), ("devkit",))
        annos = os.path.join(annos, "cars_test_annos_withlabels.mat")
    folder = f"cars_{split}"
    images = _find_root("cars", root, (folder,), (folder,))
    fields = _mat_struct(annos, "annotations")
    return FileSource(
        paths=[os.path.join(images, folder, str(f)) for f in fields["fname"]],
        labels=fields["class"].astype(np.int32) - 1,
        class_names=_mat_strings(os.path.join(root, "devkit", "cars_meta.mat"), "class_names"),
        boxes=_box_columns(fields),
    )


def _cars_annos(root: str, split: str) -> FileSource:
    """car_ims/ with the all-in-one cars_annos.mat (its 'test' flag gives the split)."""
    path = os.path.join(root, "cars_annos.mat")
    fields = _mat_struct(path, "annotations")
    keep = fields["test"].astype(bool) == (split == "test")
    return FileSource(
        paths=[os.path.join(root, str(p)) for p in fields["relative_im_path"][keep]],
        labels=fields["class"][keep].astype(np.int32) - 1,
        class_names=_mat_strings(path, "class_names"),
        boxes=_box_columns(fields)[keep],
    )


def _csv_rows(path: str) -> list[_Row]:
    """The rows of a CSV index, each with its line (file names may hold commas, quoted)."""
    return [_Row(path, n, fields[0], fields[1:]) for n, text in _lines(path) for fields in csv.reader([text])]


def _cars_csv_row(row: _Row, num_classes: int) -> tuple[list[float], int]:
    """(box corners, 0-based class) of an anno_<split>.csv row 'file,x1,y1,x2,y2,class'; DatasetError naming
    its line when malformed."""
    if len(row.fields) != 5:
        raise DatasetError(f"{row.where()}: expected 'file,x1,y1,x2,y2,class', found {len(row.fields) + 1} field(s)")
    label = row.fields[4]
    if not label.isdigit() or not 1 <= int(label) <= num_classes:
        raise DatasetError(f"{row.where()}: class {label!r} is not one of 1..{num_classes} (names.csv)")
    return _row_box(dataclasses.replace(row, fields=row.fields[:4]), corners=True), int(label) - 1


def _cars_csv(root: str, split: str) -> FileSource:
    """anno_{split}.csv (file, x1, y1, x2, y2, class from 1) and names.csv, images anywhere under the split folder."""
    class_names = [row.id for row in _csv_rows(os.path.join(root, "names.csv"))]
    rows, first = _csv_rows(os.path.join(root, f"anno_{split}.csv")), {}
    for row in rows:
        if first.setdefault(row.id, row.line) != row.line:
            raise DatasetError(f"{row.where()}: duplicated image {row.id} (first on line {first[row.id]})")
    parsed = [_cars_csv_row(row, len(class_names)) for row in rows]
    candidates = (os.path.join("car_data", "car_data", split), os.path.join("car_data", split), split, f"cars_{split}")
    folder = _first_dir(root, candidates)
    if folder is None:
        raise _not_found("cars", root, f"the {split} images beside anno_{split}.csv in one of {', '.join(candidates)}")
    found = {name: os.path.join(d, name) for d, _, names in os.walk(folder) for name in names}
    return FileSource(
        paths=[found.get(row.id, os.path.join(folder, row.id)) for row in rows],
        labels=np.array([label for _, label in parsed], np.int32),
        class_names=class_names,
        boxes=np.array([box for box, _ in parsed], np.float32).reshape(-1, 4),
    )


_CARS_LAYOUTS: tuple[tuple[tuple[str, ...], Callable[[str, str], FileSource]], ...] = (
    ((os.path.join("devkit", "cars_meta.mat"), os.path.join("devkit", "cars_train_annos.mat")), _cars_devkit),
    (("cars_annos.mat", "car_ims"), _cars_annos),
    (("anno_train.csv", "anno_test.csv", "names.csv"), _cars_csv),
)


def cars_source(data_dir: str, split: str) -> FileSource:
    """Stanford Cars (196 classes, train 8144 / test 8041) in the devkit, cars_annos.mat or CSV layout, with boxes."""
    _check_split("cars", split, ("train", "test"))
    _check_folder("cars", data_dir)
    for markers, read in _CARS_LAYOUTS:
        if all(os.path.exists(os.path.join(data_dir, m)) for m in markers):
            source = read(data_dir, split)
            return source.select(_present("cars", data_dir, source.paths))
    raise _not_found("cars", data_dir, "one of the layouts " + "; ".join(" + ".join(m) for m, _ in _CARS_LAYOUTS))


def _voc_box(path: str) -> list[float]:
    """Union of the object boxes of a Pascal-VOC-style annotation file."""
    boxes = [
        [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        for o in ElementTree.parse(path).getroot().iter("object")
    ]
    b = np.array(boxes, np.float32)
    return [*b[:, :2].min(axis=0), *b[:, 2:].max(axis=0)]


def dogs_source(data_dir: str, split: str) -> FileSource:
    """Stanford Dogs (120 classes, train 12000 / test 8580) from its three tars; box = union of the dogs' boxes."""
    _check_split("dogs", split, ("train", "test"))
    listing = f"{split}_list.mat"
    root = _find_root("dogs", data_dir, ("Images",))
    lists = _find_root("dogs", data_dir, (listing,), ("lists",))
    from scipy import io as sio

    mat = sio.loadmat(os.path.join(lists, listing), squeeze_me=True)
    files = [str(f) for f in np.atleast_1d(mat["file_list"])]
    labels = np.atleast_1d(mat["labels"]).astype(np.int32) - 1
    breeds = sorted(e.name for e in os.scandir(os.path.join(root, "Images")) if e.is_dir())
    if any(label >= len(breeds) or f.split("/")[0] != breeds[label] for f, label in zip(files, labels)):
        raise _not_found("dogs", data_dir, f"the labels of {listing} to number the sorted Images/ folders from 1")
    keep = _present("dogs", data_dir, [os.path.join(root, "Images", f) for f in files])
    files, labels = [f for f, present in zip(files, keep) if present], labels[keep]
    paths = [os.path.join(root, "Images", f) for f in files]
    annotations = [os.path.join(root, "Annotation", os.path.splitext(f)[0]) for f in files]
    has_boxes = all(os.path.isfile(a) for a in annotations)
    return FileSource(
        paths=paths,
        labels=labels,
        class_names=[b.split("-", 1)[-1] for b in breeds],
        boxes=np.array([_voc_box(a) for a in annotations], np.float32) if has_boxes else None,
    )


def _walk_once(folder: str, seen: set[tuple[int, int]]) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) of `folder` and every folder under it, links followed, but no folder twice:
    one reached again (by its (st_dev, st_ino) in `seen`, through a link loop or two links to it) is skipped."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.warning("imagefolder: %s is a folder listed already (through a link); skipping it", dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        yield dirpath, sorted(filenames)


def image_folder_source(data_dir: str, split: str, classes_from: str) -> FileSource:
    """root/<split>/<class>/<image>; classes: the sorted folders of split `classes_from` (torchvision's ImageFolder).

    Links are followed but no folder is listed twice (a link loop ends); a class folder without images is
    reported."""
    root = _find_root("imagefolder", data_dir, (split, classes_from))
    class_names = sorted(
        e.name for e in os.scandir(os.path.join(root, classes_from)) if e.is_dir() and not e.name.startswith(".")
    )
    present = sorted(e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir() and not e.name.startswith("."))
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise DatasetError(f"{os.path.join(root, split)} has class folders that {classes_from}/ lacks: {unknown[:5]}")
    paths, labels, seen = [], [], set()
    for label, name in enumerate(class_names):
        folder = os.path.join(root, split, name)
        if not os.path.isdir(folder):
            continue
        found = [
            os.path.join(dirpath, f)
            for dirpath, filenames in _walk_once(folder, seen)
            for f in filenames
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")
        ]
        if not found:
            log.warning("imagefolder: class folder %s has no images", folder)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise _not_found("imagefolder", data_dir, f"images in {os.path.join(root, split)}/<class>/")
    return FileSource(paths=paths, labels=np.array(labels, np.int32), class_names=class_names)


class TfdsSource:
    """A prepared TFDS dataset read with `tfds.data_source` (array_record); images stay encoded for the workers.

    Needs tensorflow-datasets but not TensorFlow. Boxes come from a 'bbox'
    feature or, for datasets with several objects, as the union of 'objects/bbox'.
    """

    def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
            self._records = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir or None,
                download=False,
                decoders={image_key: tfds.decode.SkipDecoding()},
            )
        except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError) as e:
            raise DatasetNotFound(
                f"TFDS dataset {name!r} is not prepared as array_record in config.dataset.data_dir="
                f"{data_dir or '(TFDS default)'!r}. Prepare it once, with TensorFlow installed: "
                f"`tfds build {name} --data_dir {data_dir or '~/tensorflow_datasets'} --file_format array_record` "
                f"(add --manual_dir DIR holding the downloaded archives when its download URL is dead, as for "
                f"cars196); see docs/datasets.md."
            ) from e
        features = builder.info.features
        self.class_names = list(features[label_key].names)
        self._box = (
            "bbox"
            if "bbox" in features
            else ("objects" if "objects" in features and "bbox" in features["objects"] else None)
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        example = self._records[index]
        name = example.get("image/filename")
        record = {
            "image": example[self.image_key],
            "label": int(example[self.label_key]),
            "name": f"{self.name}/{self.split}[{index}]" + (f" ({_text(name)})" if name is not None else ""),
        }
        if self._box is not None:
            boxes = example["bbox"] if self._box == "bbox" else example["objects"]["bbox"]
            y0, x0, y1, x1 = np.asarray(boxes, np.float32).reshape(-1, 4).T
            if len(y0):
                record["rel_box"] = np.array([x0.min(), y0.min(), x1.max(), y1.max()], np.float32)
        return record


def _text(value: str | bytes) -> str:
    """A TFDS text feature as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Subset:
    """The examples `indices` of a source, in that order (the training split without its validation share, ...)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.class_names = source.class_names
        self.part_names = getattr(source, "part_names", ())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]

    @property
    def labels(self) -> np.ndarray:
        return source_labels(self.source)[self.indices]


def source_labels(source) -> np.ndarray:
    """Every example's class: the source's `labels` where it keeps them, else read record by record."""
    labels = getattr(source, "labels", None)
    if labels is None:
        labels = [source[i]["label"] for i in range(len(source))]
    return np.asarray(labels, np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices: `fraction` of each class's examples (rounded; at least one, and never all, of
    a class with two or more) held out, chosen by a permutation seeded with `seed`; both sorted."""
    rng = np.random.default_rng([seed, 0x7A11D])
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        if len(members) > 1:
            k = min(max(k, 1), len(members) - 1)
        held.append(rng.permutation(members)[:k])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), held), held


SPLITS = ("train", "val", "test")  # the roles make_source knows; 'val' exists when dataset.val_fraction > 0


def make_source(config: ml_collections.ConfigDict, split: str):
    """The source of `split` for the configured dataset: 'train' or 'test' (dataset.train_split / test_split),
    or 'val', the stratified share dataset.val_fraction of the training split held out from 'train'."""
    d = config.dataset
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "val" and not d.val_fraction:
        raise ConfigError("there is no validation split: config.dataset.val_fraction is 0")
    source = _dataset_source(config, "test" if split == "test" else "train")
    if split == "test" or not d.val_fraction:
        return source
    kept, held = stratified_split(source_labels(source), d.val_fraction, d.val_seed)
    return Subset(source, kept if split == "train" else held)


def _dataset_source(config: ml_collections.ConfigDict, split: str):
    """The whole 'train' or 'test' split of the configured dataset."""
    d = config.dataset
    if d.name == "demo":
        if not 1 <= d.num_classes <= synthetic.MAX_CLASSES:
            raise ConfigError(
                f"config.dataset.num_classes={d.num_classes}: the demo dataset has 1 to {synthetic.MAX_CLASSES} classes"
            )
        spec = synthetic.DemoSpec(num_classes=d.num_classes, image_size=d.demo_image_size, seed=d.demo_seed)
        size = d.demo_train_size if split == "train" else d.demo_test_size
        return synthetic.DemoSource(spec, split, size)
    split_name = {"train": d.train_split, "test": d.test_split}[split]
    if d.source == "tfds":
        source = TfdsSource(
            d.tfds_name or TFDS_BUILDERS.get(d.name, d.name), split_name, d.data_dir, d.tfds_image_key, d.tfds_label_key
        )
    elif d.source == "folder":
        readers = {
            "cub": cub_source,
            "aircraft": aircraft_source,
            "cars": cars_source,
            "dogs": dogs_source,
            "imagefolder": lambda root, s: image_folder_source(root, s, d.train_split),
        }
        if d.name not in readers:
            raise ConfigError(
                f"config.dataset.name={d.name!r} has no folder reader (known: demo, "
                f"{', '.join(readers)}); for a TFDS dataset set config.dataset.source='tfds'"
            )
        if not d.data_dir:
            raise DatasetNotFound(f"config.dataset.data_dir is empty. {_HOW[d.name]}")
        source = readers[d.name](os.path.expanduser(d.data_dir), split_name)
    else:
        raise ConfigError(f"config.dataset.source={d.source!r} is not 'folder' or 'tfds'")
    _check_labels(source, d.name)
    if d.num_classes != len(source.class_names):
        raise ConfigError(
            f"config.dataset.num_classes={d.num_classes} but {d.name} ({d.source}) has "
            f"{len(source.class_names)} classes; set --config.dataset.num_classes="
            f"{len(source.class_names)}"
        )
    return source


def _check_labels(source, dataset: str) -> None:
    """DatasetError when a folder dataset's label is not one of its classes (it would train on garbage or be
    counted as another class)."""
    labels = getattr(source, "labels", None)
    if labels is None or not len(labels):
        return
    bad = np.flatnonzero((labels < 0) | (labels >= len(source.class_names)))
    if len(bad):
        i = int(bad[0])
        raise DatasetError(
            f"{dataset}: {source.paths[i]} has class {int(labels[i]) + 1}, not one of the "
            f"{len(source.class_names)} classes (1..{len(source.class_names)}); {len(bad)} such image(s)"
        )


def collect_images(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image paths, problems): files as given, directories' image files (sorted), glob matches."""
    paths, problems = [], []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(spec, f) for f in os.listdir(spec) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            )
            paths += found
            if not found:
                problems.append(f"{spec}: no images in this directory")
        elif glob.has_magic(spec):
            found = sorted(glob.glob(spec))
            paths += found
            if not found:
                problems.append(f"{spec}: no file matches")
        else:
            paths.append(spec)
    return list(dict.fromkeys(paths)), problems
