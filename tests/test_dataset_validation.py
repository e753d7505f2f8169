"""Damaged datasets are refused on load with one line naming the file and line, or reported and skipped."""

import logging
import os

import numpy as np
import pytest
from scipy import io as sio
from test_sources import (
    CLASSES,
    TEST,
    _cars_rows,
    config_for,
    jpeg,
    mat_struct,
    write,
    write_aircraft,
    write_cars_csv,
    write_cars_devkit,
    write_cub,
    write_imagefolder,
)

from pmg_jax.data import sources


def cub(tmp_path) -> tuple[str, str]:
    """(data_dir, CUB_200_2011 folder) of a fresh miniature CUB."""
    data_dir = write_cub(str(tmp_path))
    return data_dir, os.path.join(data_dir, "CUB_200_2011")


def edit_line(path: str, number: int, text: str | bytes) -> None:
    """Replace line `number` (from 1) of a file with `text`."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[number - 1] = text if isinstance(text, bytes) else text.encode()
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))


def load(data_dir: str, split: str = "train", name: str = "cub"):
    return sources.make_source(config_for(name, data_dir), split)


@pytest.mark.parametrize(
    "file, line, text, message",
    [
        ("image_class_labels.txt", 5, "5", r"image_class_labels.txt:5: expected '<image id> <class id>', found 1"),
        ("bounding_boxes.txt", 3, "3 2.0 3.0 20.0", r"bounding_boxes.txt:3: expected '<image id> <x> <y> <width> <h"),
        ("images.txt", 7, b"7 001.Alpha_bird/\xff\xfe.jpg", r"images.txt:7: not UTF-8 text \(byte 0xff\)"),
        ("bounding_boxes.txt", 4, "4 2.0 three 20.0 15.0", r"bounding_boxes.txt:4: box '2.0 three 20.0 15.0' is not"),
        ("bounding_boxes.txt", 4, "4 2.0 3.0 nan 15.0", r"bounding_boxes.txt:4: box .* is not finite"),
        ("bounding_boxes.txt", 6, "6 2.0 3.0 -20.0 15.0", r"bounding_boxes.txt:6: box of negative size -20 x 15"),
        ("bounding_boxes.txt", 6, "6 -2.0 3.0 20.0 15.0", r"bounding_boxes.txt:6: box at \(-2, 3\) starts outside"),
        ("images.txt", 17, "12 001.Alpha_bird/a.jpg", r"images.txt:17: duplicated image id 12 \(first on line 12\)"),
        ("image_class_labels.txt", 2, "2 4", r"image_class_labels.txt:2: class '4' is not one of 1..3 \(classes.txt\)"),
        ("image_class_labels.txt", 2, "2 0", r"image_class_labels.txt:2: class '0' is not one of 1..3"),
        ("train_test_split.txt", 1, "18 2", r"train_test_split.txt:1: is-training flag '2' is not 0 or 1"),
        ("bounding_boxes.txt", 9, "99 2.0 3.0 20.0 15.0", r"bounding_boxes.txt:9: image id 99 is not in images.txt"),
        ("classes.txt", 2, "5 002.Beta_bird", r"classes.txt:2: class id 5 out of order \(expected 2\)"),
    ],
)
def test_damaged_cub_index_is_refused_naming_file_and_line(tmp_path, file, line, text, message):
    data_dir, root = cub(tmp_path)
    edit_line(os.path.join(root, file), line, text)
    for split in ("train", "test"):  # a wrong label is refused in the test split too, not counted as a class
        with pytest.raises(sources.DatasetError, match=message) as caught:
            load(data_dir, split)
        assert "\n" not in str(caught.value) and os.path.join("CUB_200_2011", file) in str(caught.value)


def test_a_row_missing_from_one_cub_table_is_named(tmp_path):
    data_dir, root = cub(tmp_path)
    edit_line(os.path.join(root, "bounding_boxes.txt"), 9, "")
    with pytest.raises(sources.DatasetError, match=r"bounding_boxes.txt: no line for image id 9 \(of .*images.txt:9\)"):
        load(data_dir)


def test_missing_images_are_reported_with_their_index_line_and_skipped(tmp_path, caplog):
    data_dir, root = cub(tmp_path)
    complete = load(data_dir)
    os.remove(os.path.join(root, "images", "002.Beta_bird", "train_5.jpg"))
    with caplog.at_level(logging.WARNING, logger="pmg_jax.data.sources"):
        source = load(data_dir)
    assert len(source) == len(complete) - 1
    assert not any(p.endswith("train_5.jpg") for p in source.paths)
    kept = [complete.paths.index(p) for p in source.paths]
    np.testing.assert_array_equal(source.labels, complete.labels[kept])
    np.testing.assert_array_equal(source.boxes, complete.boxes[kept])
    named = [r.getMessage() for r in caplog.records if "train_5.jpg" in r.getMessage()]
    assert len(named) == 1 and "images.txt:6:" in named[0]
    for name in os.listdir(os.path.join(root, "images")):
        for f in os.listdir(os.path.join(root, "images", name)):
            os.remove(os.path.join(root, "images", name, f))
    with pytest.raises(sources.DatasetNotFound, match="none is there"):
        load(data_dir)


@pytest.mark.parametrize(
    "file, line, text, message",
    [
        ("images_box.txt", 2, "1000001 3 4 21", r"images_box.txt:2: expected '<image id> <xmin> <ymin> <xmax> <ymax>'"),
        ("images_box.txt", 2, "1000001 30 4 21 17", r"images_box.txt:2: box of negative size -9 x 13"),
        (
            "images_box.txt",
            3,
            "1000000 3 4 21 17",
            r"images_box.txt:3: duplicated image id 1000000 \(first on line 1\)",
        ),
        ("images_box.txt", 1, "1000099 3 4 21 17", r"images_box.txt: no box for image id 1000000"),
        ("images_variant_trainval.txt", 2, "1000000 Cessna 172", r"trainval.txt:2: duplicated image id 1000000"),
        ("images_variant_trainval.txt", 2, "1000001", r"trainval.txt:2: expected '<image id> <variant>', found 1"),
        ("images_variant_trainval.txt", 2, "1000001 Boeing 747", r"trainval.txt:2: variant 'Boeing 747' is not in"),
        ("variants.txt", 1, b"Boeing \xe9", r"variants.txt:1: not UTF-8 text \(byte 0xe9\)"),
    ],
)
def test_damaged_aircraft_index_is_refused_naming_file_and_line(tmp_path, file, line, text, message):
    root = write_aircraft(str(tmp_path))
    edit_line(os.path.join(root, "data", file), line, text)
    with pytest.raises(sources.DatasetError, match=message):
        load(root, "train", "aircraft")


@pytest.mark.parametrize(
    "line, text, message",
    [
        (2, "00002.jpg,2,3,22,18,4", r"anno_test.csv:2: class '4' is not one of 1..3 \(names.csv\)"),
        (2, "00002.jpg,2,3,22", r"anno_test.csv:2: expected 'file,x1,y1,x2,y2,class', found 4 field\(s\)"),
        (3, "00003.jpg,2,3,1,18,1", r"anno_test.csv:3: box of negative size -1 x 15"),
        (4, "00001.jpg,2,3,22,18,2", r"anno_test.csv:4: duplicated image 00001.jpg \(first on line 1\)"),
        (1, b"\x80.jpg,2,3,22,18,1", r"anno_test.csv:1: not UTF-8 text \(byte 0x80\)"),
    ],
)
def test_damaged_cars_csv_is_refused_naming_file_and_line(tmp_path, line, text, message):
    root = write_cars_csv(str(tmp_path))
    edit_line(os.path.join(root, "anno_test.csv"), line, text)
    with pytest.raises(sources.DatasetError, match=message):
        load(root, "test", "cars")


def test_labels_outside_the_classes_are_refused_in_any_layout(tmp_path):
    """The devkit layout's labels come from a .mat file: the check after loading names the image."""
    root = write_cars_devkit(str(tmp_path))
    rows = _cars_rows("test")
    rows[1]["class"] = 4
    sio.savemat(os.path.join(root, "cars_test_annos_withlabels.mat"), {"annotations": mat_struct(rows)})
    with pytest.raises(sources.DatasetError, match=r"cars_test/00002.jpg has class 4, not one of the 3 classes"):
        load(root, "test", "cars")


def _files(source) -> list[str]:
    return sorted(os.path.realpath(p) for p in source.paths)


def test_image_folder_link_loops_end_and_list_each_file_once(tmp_path, caplog):
    root = write_imagefolder(str(tmp_path))
    folder = os.path.join(root, "train", CLASSES[0])
    plain = load(root, name="imagefolder")
    os.symlink(folder, os.path.join(folder, "loop"))  # a folder that contains itself
    for sub in ("x", "y"):
        write(os.path.join(folder, sub, "deep.jpg"), jpeg(0, 9))
    os.symlink(os.path.join(folder, "y"), os.path.join(folder, "x", "to_y"))  # two links that cross
    os.symlink(os.path.join(folder, "x"), os.path.join(folder, "y", "to_x"))
    with caplog.at_level(logging.WARNING, logger="pmg_jax.data.sources"):
        source = load(root, name="imagefolder")
    assert len(source) == len(plain) + 2
    assert len(set(_files(source))) == len(source)  # no file twice
    assert sum(p.endswith("deep.jpg") for p in source.paths) == 2
    assert any("listed already" in r.getMessage() for r in caplog.records)


def test_image_folder_warns_about_an_empty_class_folder(tmp_path, caplog):
    root = write_imagefolder(str(tmp_path))
    empty = os.path.join(root, "test", "Delta bird")
    os.makedirs(os.path.join(root, "train", "Delta bird"))
    os.makedirs(empty)
    config = config_for("imagefolder", root, **{"dataset.num_classes": 4})
    with caplog.at_level(logging.WARNING, logger="pmg_jax.data.sources"):
        source = sources.make_source(config, "test")
    assert len(source) == len(CLASSES) * TEST and len(source.class_names) == 4
    warned = [r.getMessage() for r in caplog.records if "has no images" in r.getMessage()]
    assert warned == [f"imagefolder: class folder {empty} has no images"]
