"""Part annotations: CUB's parts/ files and the demo's wing patch, read by the sources and carried by eval batches."""

import os

import cv2
import numpy as np
import pytest
from test_sources import config_for, write_cub, write_imagefolder, write_lines

from pmg_jax.data import pipeline, sources, synthetic, transforms

CUB_PARTS = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)
SPEC = pipeline.TransformSpec(resize_size=40, crop_size=32, pad=2)  # centre crop offset 4


def image_ids(root: str) -> dict[str, int]:
    """Image path -> CUB image id, from images.txt."""
    with open(os.path.join(root, "images.txt")) as f:
        return {os.path.join(root, "images", name): int(i) for i, name in (line.split() for line in f)}


def write_parts(tmp: str) -> dict[int, np.ndarray]:
    """parts/ for the miniature CUB: random points inside each image, a third invisible (0 0 0 as in CUB).

    The rows are shuffled: a reader must go by their image and part ids, not their order.
    """
    root = os.path.join(tmp, "CUB_200_2011")
    os.makedirs(os.path.join(root, "parts"))
    write_lines(os.path.join(root, "parts", "parts.txt"), (f"{i + 1} {n}" for i, n in enumerate(CUB_PARTS)))
    rng = np.random.default_rng(0)
    truth, lines = {}, []
    for path, image_id in sorted(image_ids(root).items(), key=lambda item: item[1]):
        h, w = cv2.imread(path).shape[:2]
        rows = np.column_stack([rng.uniform(0, w, 15), rng.uniform(0, h, 15), rng.random(15) > 1 / 3])
        rows[rows[:, 2] == 0, :2] = 0
        truth[image_id] = rows.astype(np.float32)
        lines += [f"{image_id} {p + 1} {x:.1f} {y:.1f} {int(v)}" for p, (x, y, v) in enumerate(rows)]
    write_lines(os.path.join(root, "parts", "part_locs.txt"), rng.permutation(lines))
    for rows in truth.values():
        rows[:, :2] = np.round(rows[:, :2], 1)  # as written
    return truth


@pytest.fixture
def cub(tmp_path):
    data_dir = write_cub(str(tmp_path))
    return data_dir, write_parts(data_dir)


def test_cub_parts_are_read_per_image(cub):
    data_dir, truth = cub
    for split in ("train", "test"):
        source = sources.make_source(config_for("cub", data_dir), split)
        assert tuple(source.part_names) == CUB_PARTS
        ids = image_ids(os.path.join(data_dir, "CUB_200_2011"))
        for i in range(len(source)):
            record = source[i]
            np.testing.assert_allclose(record["parts"], truth[ids[record["image"]]], atol=1e-4)
            assert record["parts"].dtype == np.float32


def test_eval_batches_move_parts_with_the_centre_crop(cub):
    """Resize scale and crop offset as for boxes; a point the crop leaves out, or never visible, is invisible."""
    data_dir, truth = cub
    source = sources.make_source(config_for("cub", data_dir), "test")
    ids = image_ids(os.path.join(data_dir, "CUB_200_2011"))
    _, batches = pipeline.eval_batches(source, SPEC, pipeline.Layout(4), with_box=True, with_parts=True)
    got = np.concatenate([b["parts"] for b in batches])
    assert got.shape == (8, 15, 3)  # 6 images and 2 padding slots
    assert np.all(got[6:] == 0)
    cropped_out = 0
    for i in range(len(source)):
        h, w = cv2.imread(source.paths[i]).shape[:2]
        for p in range(15):
            x0, y0, visible = truth[ids[source.paths[i]]][p]
            x, y = x0 * 40 / w - 4, y0 * 40 / h - 4
            inside = 0 <= x <= 32 and 0 <= y <= 32
            cropped_out += bool(visible and not inside)
            assert got[i, p, 2] == float(visible and inside), (i, p)
            if visible:
                np.testing.assert_allclose(got[i, p, :2], [x, y], atol=1e-4)
            if visible and inside:  # the same move as a box's corner
                box = transforms.eval_box(np.array([x0, y0, x0, y0]), (h, w), resize_size=40, crop_size=32)
                np.testing.assert_allclose(got[i, p, :2], box[:2], atol=1e-4)
    assert cropped_out > 0  # the miniature exercises the crop


def test_cub_without_parts_and_other_datasets_carry_none(tmp_path):
    for name, data_dir in (
        ("cub", write_cub(str(tmp_path / "cub"))),
        ("imagefolder", write_imagefolder(str(tmp_path / "if"))),
    ):
        source = sources.make_source(config_for(name, data_dir), "test")
        assert pipeline.part_names(source) == () and "parts" not in source[0]
        _, batches = pipeline.eval_batches(source, SPEC, pipeline.Layout(4), with_box=name == "cub", with_parts=True)
        assert all("parts" not in b for b in batches)


def test_broken_part_files_name_the_file(cub):
    data_dir, _ = cub
    parts_dir = os.path.join(data_dir, "CUB_200_2011", "parts")
    locs = os.path.join(parts_dir, "part_locs.txt")
    lines = open(locs).read().splitlines()
    lost = next(i for i, line in enumerate(lines) if int(line.split()[0]) > 12)  # a test image (ids 13-18)
    image_id, part = lines[lost].split()[:2]
    write_lines(locs, lines[:lost] + lines[lost + 1 :])
    with pytest.raises(sources.DatasetNotFound, match=rf"part_locs.txt .*image id {image_id} has 0 for part {part}"):
        sources.make_source(config_for("cub", data_dir), "test")
    write_lines(locs, [*lines[:3], "1 4 12.0 oops 1", *lines[4:]])
    with pytest.raises(ValueError, match="part_locs.txt: expected lines"):
        sources.make_source(config_for("cub", data_dir), "train")
    os.remove(locs)
    with pytest.raises(sources.DatasetNotFound, match="parts.txt and parts/part_locs.txt"):
        sources.make_source(config_for("cub", data_dir), "train")


def test_demo_part_is_the_wing_patch_centre():
    spec = synthetic.DemoSpec(num_classes=4, image_size=48)
    source = synthetic.DemoSource(spec, "test", 6)
    assert pipeline.part_names(source) == ("wing patch",)
    for i in range(6):
        record = source[i]
        x0, y0, x1, y1 = record["box"]
        np.testing.assert_array_equal(record["parts"], [[(x0 + x1) / 2, (y0 + y1) / 2, 1]])
    _, batches = pipeline.eval_batches(source, SPEC, pipeline.Layout(3), with_parts=True)
    got = np.concatenate([b["parts"] for b in batches])
    assert got.shape == (6, 1, 3)
    for i in range(6):
        x0, y0, x1, y1 = source[i]["box"]
        x, y = (x0 + x1) / 2 * 40 / 48 - 4, (y0 + y1) / 2 * 40 / 48 - 4
        np.testing.assert_allclose(got[i, 0], [x, y, float(0 <= x <= 32 and 0 <= y <= 32)], atol=1e-4)
