"""Every dataset layout, written in miniature by the tests, read by its source and trained on end to end.

All miniatures have 3 classes, 12 train and 6 test images, so the tiny model of
every end-to-end run compiles to the same programs (a persistent compilation
cache, set up in conftest, makes all but the first run take seconds).
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import cv2
import numpy as np
import pytest
from conftest import ROOT, tiny_demo_config
from scipy import io as sio

from pmg_jax import loop
from pmg_jax.data import decode, pipeline, sources

CLASSES = ("Alpha bird", "Beta bird", "Gamma bird")
TRAIN, TEST = 4, 2  # images per class


def jpeg(label: int, index: int) -> bytes:
    """A small JPEG whose colour says its class (sizes vary, as in real datasets)."""
    rng = np.random.default_rng([label, index])
    colour = np.eye(3)[label] * 200 + 30
    image = np.clip(colour + rng.normal(0, 20, (30 + 3 * (index % 4), 40 + index % 5, 3)), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", image[..., ::-1])[1].tobytes()


def examples():
    """(split, label, index within the split) of every miniature image, in a fixed order."""
    for split, n in (("train", TRAIN), ("test", TEST)):
        for label in range(len(CLASSES)):
            for k in range(n):
                yield split, label, label * n + k


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_lines(path: str, lines) -> None:
    with open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


def mat_struct(rows: list[dict]) -> np.ndarray:
    """A 1xN MATLAB struct array, as in the Stanford Cars .mat files."""
    out = np.empty((1, len(rows)), dtype=[(k, object) for k in rows[0]])
    for i, row in enumerate(rows):
        out[0, i] = tuple(v if isinstance(v, str) else np.array([[v]], np.uint16) for v in row.values())
    return out


def cell(strings) -> np.ndarray:
    return np.array(list(strings), dtype=object).reshape(1, -1)


def write_cub(tmp: str) -> str:
    """CUB_200_2011/ as extracted from the tgz; returns its parent (as users often point at)."""
    root = os.path.join(tmp, "CUB_200_2011")
    names, labels, split_flags, boxes = [], [], [], []
    for i, (split, label, k) in enumerate(examples(), start=1):
        name = f"{label + 1:03d}.{CLASSES[label].replace(' ', '_')}/{split}_{k}.jpg"
        write(os.path.join(root, "images", name), jpeg(label, i))
        names.append(f"{i} {name}")
        labels.append(f"{i} {label + 1}")
        split_flags.append(f"{i} {int(split == 'train')}")
        boxes.append(f"{i} 2.0 3.0 20.0 15.0")
    write_lines(os.path.join(root, "images.txt"), names)
    write_lines(os.path.join(root, "image_class_labels.txt"), labels)
    write_lines(os.path.join(root, "train_test_split.txt"), reversed(split_flags))  # files are joined by id
    write_lines(os.path.join(root, "bounding_boxes.txt"), boxes)
    write_lines(
        os.path.join(root, "classes.txt"), (f"{c + 1} {c + 1:03d}.{n.replace(' ', '_')}" for c, n in enumerate(CLASSES))
    )
    return tmp


def write_aircraft(tmp: str) -> str:
    data = os.path.join(tmp, "fgvc-aircraft-2013b", "data")
    variants = ("Boeing 737-200", "F-16A/B", "Cessna 172")
    listing = {"trainval": [], "test": []}
    boxes = []
    for i, (split, label, _) in enumerate(examples()):
        image_id = f"{1000000 + i:07d}"
        write(os.path.join(data, "images", f"{image_id}.jpg"), jpeg(label, i))
        listing["trainval" if split == "train" else "test"].append(f"{image_id} {variants[label]}")
        boxes.append(f"{image_id} 3 4 21 17")
    write_lines(os.path.join(data, "variants.txt"), variants)
    for split, lines in listing.items():
        write_lines(os.path.join(data, f"images_variant_{split}.txt"), lines)
    write_lines(os.path.join(data, "images_box.txt"), boxes)
    return os.path.join(tmp, "fgvc-aircraft-2013b")


def _cars_rows(split: str) -> list[dict]:
    """Devkit annotations of a split's images, named cars_<split>/<k + 1:05d>.jpg."""
    return [
        {"bbox_x1": 2, "bbox_y1": 3, "bbox_x2": 22, "bbox_y2": 18, "class": label + 1, "fname": f"{k + 1:05d}.jpg"}
        for s, label, k in examples()
        if s == split
    ]


def write_cars_devkit(tmp: str) -> str:
    for split in ("train", "test"):
        for s, label, k in examples():
            if s == split:
                write(os.path.join(tmp, f"cars_{split}", f"{k + 1:05d}.jpg"), jpeg(label, k))
    os.makedirs(os.path.join(tmp, "devkit"))
    sio.savemat(os.path.join(tmp, "devkit", "cars_meta.mat"), {"class_names": cell(CLASSES)})
    sio.savemat(os.path.join(tmp, "devkit", "cars_train_annos.mat"), {"annotations": mat_struct(_cars_rows("train"))})
    sio.savemat(os.path.join(tmp, "cars_test_annos_withlabels.mat"), {"annotations": mat_struct(_cars_rows("test"))})
    return tmp


def write_cars_annos(tmp: str) -> str:
    rows = []
    for i, (split, label, _) in enumerate(examples()):
        write(os.path.join(tmp, "car_ims", f"{i + 1:06d}.jpg"), jpeg(label, i))
        rows.append(
            {
                "relative_im_path": f"car_ims/{i + 1:06d}.jpg",
                "bbox_x1": 2,
                "bbox_y1": 3,
                "bbox_x2": 22,
                "bbox_y2": 18,
                "class": label + 1,
                "test": int(split == "test"),
            }
        )
    sio.savemat(os.path.join(tmp, "cars_annos.mat"), {"annotations": mat_struct(rows), "class_names": cell(CLASSES)})
    return tmp


def write_cars_csv(tmp: str) -> str:
    rows = {"train": [], "test": []}
    for split, label, k in examples():
        write(os.path.join(tmp, "car_data", "car_data", split, CLASSES[label], f"{k + 1:05d}.jpg"), jpeg(label, k))
        rows[split].append(f"{k + 1:05d}.jpg,2,3,22,18,{label + 1}")
    for split, lines in rows.items():
        write_lines(os.path.join(tmp, f"anno_{split}.csv"), lines)
    write_lines(os.path.join(tmp, "names.csv"), CLASSES)
    return tmp


def write_dogs(tmp: str) -> str:
    files = {"train": [], "test": []}
    for split, label, k in examples():
        folder = f"n0208560{label}-{CLASSES[label].replace(' ', '_')}"
        stem = f"n0208560{label}_{split}{k}"
        write(os.path.join(tmp, "Images", folder, f"{stem}.jpg"), jpeg(label, k))
        xml = ElementTree.Element("annotation")
        for x0 in (2, 6):  # two dogs: the box is their union
            box = ElementTree.SubElement(ElementTree.SubElement(xml, "object"), "bndbox")
            for key, v in zip(("xmin", "ymin", "xmax", "ymax"), (x0, 3, x0 + 14, 18)):
                ElementTree.SubElement(box, key).text = str(v)
        write(os.path.join(tmp, "Annotation", folder, stem), ElementTree.tostring(xml))
        files[split].append((f"{folder}/{stem}.jpg", label + 1))
    for split, items in files.items():
        sio.savemat(
            os.path.join(tmp, f"{split}_list.mat"),
            {
                "file_list": np.array([f for f, _ in items], dtype=object).reshape(-1, 1),
                "labels": np.array([[label] for _, label in items], np.float64),
            },
        )
    return tmp


def write_imagefolder(tmp: str) -> str:
    for split, label, k in examples():
        write(os.path.join(tmp, split, CLASSES[label], f"img{k}.JPG"), jpeg(label, k))
    write(os.path.join(tmp, "train", CLASSES[0], "notes.txt"), b"not an image")
    return tmp


def tiny_builder_class():
    """A TFDS builder like stanford_dogs (image, label, filename, objects/bbox), built without TensorFlow."""
    import tensorflow_datasets as tfds

    class PmgTinyBirds(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "image/filename": tfds.features.Text(),
                        "label": tfds.features.ClassLabel(names=CLASSES),
                        "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in ("train", "test")}

        def _generate_examples(self, split):
            for s, label, k in examples():
                if s == split:
                    yield (
                        f"{split}{k}",
                        {
                            "image": jpeg(label, k),
                            "image/filename": f"{split}{k}.jpg",
                            "label": label,
                            "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)]},
                        },
                    )

    return PmgTinyBirds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the tiny dataset, prepared as array_record."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tiny_builder_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


LAYOUTS = {
    "cub": ("cub", write_cub),
    "aircraft": ("aircraft", write_aircraft),
    "cars-devkit": ("cars", write_cars_devkit),
    "cars-annos": ("cars", write_cars_annos),
    "cars-csv": ("cars", write_cars_csv),
    "dogs": ("dogs", write_dogs),
    "imagefolder": ("imagefolder", write_imagefolder),
}


def config_for(name: str, data_dir: str, **overrides):
    """The tiny demo run's model and schedule on a 3-class miniature: 1 epoch of one 8-image step."""
    return tiny_demo_config(
        **{
            "num_epochs": 1,
            "dataset.name": name,
            "dataset.data_dir": data_dir,
            "dataset.num_classes": 3,
            "dataset.train_split": "trainval" if name == "aircraft" else "train",
            "data.resize_size": 40,
            "data.crop_size": 32,
            "data.pad": 2,
            "model.backbone": "resnet18",
            "model.width": 8,
            "model.feature_size": 16,
            "batch_size": 8,
            "eval_batch_size": 8,
            "log_every_steps": 1,
            **overrides,
        }
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_folder_layouts_read_splits_labels_and_boxes(tmp_path, layout):
    name, writer = LAYOUTS[layout]
    config = config_for(name, writer(str(tmp_path)))
    train, test = (sources.make_source(config, s) for s in ("train", "test"))
    assert (len(train), len(test)) == (3 * TRAIN, 3 * TEST)
    if name in ("cub", "imagefolder"):
        assert [n.replace("_", " ") for n in train.class_names] == list(CLASSES)
    assert np.bincount(train.labels).tolist() == [TRAIN] * 3 and np.bincount(test.labels).tolist() == [TEST] * 3
    for src in (train, test):
        for i in range(len(src)):
            example = decode.load_example(src[i])
            expected = np.eye(3)[example["label"]] * 200 + 30
            assert np.abs(example["image"].mean(axis=(0, 1)) - expected).max() < 25  # the image of that label
            if name != "imagefolder":
                assert example["box"].shape == (4,) and (example["box"][:2] < example["box"][2:]).all()
    if name == "dogs":
        np.testing.assert_array_equal(train[0]["box"], [2, 3, 20, 18])
    if name == "cub":
        np.testing.assert_array_equal(train[0]["box"], [2, 3, 22, 18])


def test_tfds_data_source_reads_array_record_without_tensorflow(tfds_dir):
    src = sources.TfdsSource("pmg_tiny_birds", "train", tfds_dir)
    assert len(src) == 3 * TRAIN and src.class_names == list(CLASSES)
    record = src[0]
    assert isinstance(record["image"], bytes) and "pmg_tiny_birds/train[0]" in record["name"]
    example = decode.load_example(record)
    h, w = example["image"].shape[:2]
    np.testing.assert_allclose(example["box"], [0.2 * w, 0.1 * h, 0.6 * w, 0.5 * h], rtol=1e-5)
    assert "tensorflow" not in sys.modules


def fake_tfds_records(builder, split, decoders=None, **kwargs):
    """What tfds.data_source returns for `builder` with the image left encoded (the real format, see the test above)."""
    assert decoders and "image" in decoders
    objects = "objects" in builder.info.features
    return [
        {
            "image": jpeg(k % 3, k),
            "label": (7 * k) % builder.info.features["label"].num_classes,
            **(
                {"objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)}}
                if objects
                else {"bbox": np.array([0.1, 0.2, 0.5, 0.6], np.float32)}
            ),
        }
        for k in range(10 if split == "train" else 4)
    ]


@pytest.mark.parametrize(
    "name,builder,classes",
    [("cub", "caltech_birds2011", 200), ("cars", "cars196", 196), ("dogs", "stanford_dogs", 120)],
)
def test_tfds_builders_of_the_named_datasets(name, builder, classes):
    import tensorflow_datasets as tfds

    config = config_for(name, "", **{"dataset.source": "tfds", "dataset.num_classes": classes})
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=fake_tfds_records):
        train, test = (sources.make_source(config, s) for s in ("train", "test"))
    assert (len(train), len(test), len(train.class_names)) == (10, 4, classes)
    example = decode.load_example(train[1])
    h, w = example["image"].shape[:2]
    np.testing.assert_allclose(example["box"], [0.2 * w, 0.1 * h, 0.6 * w, 0.5 * h], rtol=1e-5)
    _, batches = pipeline.train_batches(
        train, pipeline.TransformSpec(36, 32, 2), pipeline.Layout(4), seed=0, num_epochs=1
    )
    assert next(batches)["image"].shape == (4, 32, 32, 3)


def test_missing_tfds_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(sources.DatasetNotFound, match="tfds build caltech_birds2011 .*--file_format array_record"):
        sources.TfdsSource("caltech_birds2011", "train", str(tmp_path))


@pytest.mark.parametrize("layout", ["cub", "aircraft", "cars-devkit", "dogs", "imagefolder"])
def test_missing_dataset_says_what_was_expected_and_how_to_get_it(tmp_path, layout):
    name, _ = LAYOUTS[layout]
    with pytest.raises(sources.DatasetNotFound, match=r"expected .*(Download|Arrange|copy)"):
        sources.make_source(config_for(name, str(tmp_path)), "train")


def test_incomplete_datasets_name_what_is_missing(tmp_path):
    """(A few missing images are skipped with a report: tests/test_dataset_validation.py.)"""
    root = write_cub(str(tmp_path / "cub"))
    for folder, _, names in os.walk(os.path.join(root, "CUB_200_2011", "images")):
        for name in names:
            os.remove(os.path.join(folder, name))
    with pytest.raises(sources.DatasetNotFound, match="none is there .*train_0.jpg.*CUB_200_2011.tgz"):
        sources.make_source(config_for("cub", root), "train")
    root = write_cars_devkit(str(tmp_path / "cars"))
    os.remove(os.path.join(root, "cars_test_annos_withlabels.mat"))
    sources.make_source(config_for("cars", root), "train")
    with pytest.raises(sources.DatasetNotFound, match="cars_test_annos_withlabels.mat"):
        sources.make_source(config_for("cars", root), "test")
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(b"")
    with pytest.raises(sources.DatasetNotFound, match="extract it first"):
        sources.make_source(config_for("cub", str(archive)), "train")


def test_config_errors_are_specific(tmp_path):
    root = write_imagefolder(str(tmp_path))
    with pytest.raises(ValueError, match="num_classes=3"):
        sources.make_source(config_for("imagefolder", root, **{"dataset.num_classes": 200}), "train")
    with pytest.raises(ValueError, match="no split 'val'"):
        sources.make_source(config_for("cub", root, **{"dataset.test_split": "val"}), "test")
    with pytest.raises(ValueError, match="no folder reader"):
        sources.make_source(config_for("flowers", root), "train")


def check_run(workdir: str, best: dict) -> None:
    """One epoch trained and every test image evaluated once."""
    assert best["epoch"] == 1
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [line["count"] for line in lines if line["kind"] == "eval"] == [3 * TEST]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["cub", "aircraft", "cars-devkit", "dogs", "imagefolder"])
def test_training_end_to_end_on_each_folder_layout(tmp_path, compile_cache, layout):
    name, writer = LAYOUTS[layout]
    config = config_for(name, writer(str(tmp_path / "data")))
    workdir = str(tmp_path / "run")
    check_run(workdir, loop.train_and_evaluate(config, workdir))


@pytest.mark.slow
def test_training_end_to_end_on_tfds_array_record(tmp_path, compile_cache, tfds_dir):
    config = config_for("pmg_tiny_birds", tfds_dir, **{"dataset.source": "tfds"})
    workdir = str(tmp_path / "run")
    check_run(workdir, loop.train_and_evaluate(config, workdir))


@pytest.mark.slow
def test_train_py_on_the_cub_folder(tmp_path, compile_cache):
    """The user's command, `python train.py --config configs/cub.py`, with the miniature and the tiny model."""
    root = write_cub(str(tmp_path / "data"))
    tiny = config_for("cub", root)
    flags = [
        f"--config.{k}={v}"
        for k, v in (
            ("dataset.data_dir", root),
            ("dataset.num_classes", 3),
            ("num_epochs", 1),
            ("data.resize_size", 40),
            ("data.crop_size", 32),
            ("data.pad", 2),
            ("data.workers", 0),
            ("model.backbone", "resnet18"),
            ("model.width", 8),
            ("model.stage_sizes", "(1,1,1,1)"),
            ("model.feature_size", 16),
            ("batch_size", 8),
            ("eval_batch_size", 8),
            ("log_every_steps", 1),
            ("optim.lr_new", tiny.optim.lr_new),
            ("optim.lr_backbone", tiny.optim.lr_backbone),
        )
    ]
    env = dict(os.environ)
    workdir = str(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/cub.py", "--workdir", workdir, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training resnet18 PMG on cub (12 train / 6 test images, 3 classes)" in done.stdout
    check_run(workdir, {"epoch": 1})
