"""Tests for the generated fine-grained bird dataset."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pmg_jax.data.synthetic import MAX_CLASSES, DemoSource, DemoSpec, class_names, make_example

SPEC = DemoSpec(num_classes=10, image_size=128, seed=0)


def _in_box(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Boolean image that is True inside the half-open pixel box."""
    x0, y0, x1, y1 = box.astype(int)
    inside = np.zeros_like(mask, dtype=bool)
    inside[y0:y1, x0:x1] = True
    return inside


def test_shapes_and_dtypes() -> None:
    """Examples have the documented keys, shapes and dtypes."""
    ex = make_example(SPEC, "train", 3)
    assert set(ex) == {"image", "label", "box", "object_box", "parts"}
    assert ex["image"].shape == (128, 128, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["label"], int) and 0 <= ex["label"] < SPEC.num_classes
    assert ex["box"].shape == (4,) and ex["box"].dtype == np.float32
    assert ex["object_box"].shape == (4,) and ex["object_box"].dtype == np.float32
    small = make_example(DemoSpec(image_size=64), "train", 0)
    assert small["image"].shape == (64, 64, 3)


def test_determinism_and_variation() -> None:
    """Same arguments give identical bytes; another index, split or seed gives another image."""
    a = make_example(SPEC, "train", 5)
    b = make_example(SPEC, "train", 5)
    assert a["image"].tobytes() == b["image"].tobytes()
    np.testing.assert_array_equal(a["box"], b["box"])
    np.testing.assert_array_equal(a["object_box"], b["object_box"])
    others = [
        make_example(SPEC, "train", 6),
        make_example(SPEC, "test", 5),
        make_example(DemoSpec(seed=1), "train", 5),
    ]
    for other in others:
        assert not np.array_equal(a["image"], other["image"])


def test_label_balance() -> None:
    """Every class appears equally often in a source whose size is a multiple of num_classes."""
    source = DemoSource(SPEC, "train", 50)
    counts = collections.Counter(source[i]["label"] for i in range(len(source)))
    assert counts == dict.fromkeys(range(SPEC.num_classes), 5)


@pytest.mark.parametrize("split", ["train", "test"])
def test_boxes_inside_image_and_object(split: str) -> None:
    """The part box is non-empty, small, inside the image and inside the object box."""
    size = SPEC.image_size
    for i in range(40):
        ex = make_example(SPEC, split, i)
        x0, y0, x1, y1 = ex["box"]
        ox0, oy0, ox1, oy1 = ex["object_box"]
        assert 0 <= ox0 <= x0 < x1 <= ox1 <= size
        assert 0 <= oy0 <= y0 < y1 <= oy1 <= size
        assert 0.04 * size <= max(x1 - x0, y1 - y0) <= 0.14 * size
        assert (ox1 - ox0) * (oy1 - oy0) > 4 * (x1 - x0) * (y1 - y0)


def test_class_only_changes_pixels_in_part_box() -> None:
    """Re-rendering a scene with another label changes some pixels, all inside the part boxes."""
    spec = DemoSpec(num_classes=MAX_CLASSES)
    for i in range(8):
        base = make_example(spec, "test", i)
        for label in range(spec.num_classes):
            if label == base["label"]:
                continue
            other = make_example(spec, "test", i, label=label)
            assert other["label"] == label
            np.testing.assert_array_equal(other["object_box"], base["object_box"])
            differ = (base["image"] != other["image"]).any(axis=-1)
            assert differ.any()
            allowed = _in_box(differ, base["box"]) | _in_box(differ, other["box"])
            assert not (differ & ~allowed).any()


def test_part_box_is_tight() -> None:
    """Changing only the patch colour changes pixels spanning the whole part box (within 1 px)."""
    # Classes 0 and 5 are the red and blue disc: same shape, so the same mask and box.
    for i in range(8):
        red = make_example(SPEC, "train", i, label=0)
        blue = make_example(SPEC, "train", i, label=5)
        np.testing.assert_array_equal(red["box"], blue["box"])
        ys, xs = np.nonzero((red["image"] != blue["image"]).any(axis=-1))
        spanned = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(spanned - red["box"]).max() <= 1


def test_class_names() -> None:
    """Names are unique, human-readable and cover at least 16 classes."""
    names = class_names(MAX_CLASSES)
    assert MAX_CLASSES >= 16 and len(set(names)) == MAX_CLASSES
    assert class_names(10) == names[:10] and names[0] == "red disc wing patch"
    with pytest.raises(ValueError):
        class_names(MAX_CLASSES + 1)


def test_invalid_arguments() -> None:
    """Out-of-range labels and indices are rejected."""
    with pytest.raises(ValueError):
        make_example(SPEC, "train", 0, label=SPEC.num_classes)
    with pytest.raises(ValueError):
        make_example(SPEC, "train", -1)
    with pytest.raises(IndexError):
        DemoSource(SPEC, "train", 3)[3]


def test_source_matches_make_example() -> None:
    """DemoSource is a random-access view of make_example with class names attached."""
    source = DemoSource(SPEC, "test", 20)
    assert len(source) == 20 and source.class_names == class_names(SPEC.num_classes)
    for i in (0, 7, np.int64(19)):
        ex = source[i]
        assert ex["image"].tobytes() == make_example(SPEC, "test", int(i))["image"].tobytes()
    assert source[-1]["image"].tobytes() == source[19]["image"].tobytes()
