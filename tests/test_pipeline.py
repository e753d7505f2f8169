"""The Grain pipeline: determinism, resumption, host sharding, eval coverage, and bad images."""

import dataclasses
import io
import logging
import os

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from pmg_jax.data import decode, pipeline, positives, sources, synthetic, transforms

SPEC = pipeline.TransformSpec(resize_size=36, crop_size=32, pad=2)


def demo(size: int = 40) -> synthetic.DemoSource:
    return synthetic.DemoSource(synthetic.DemoSpec(num_classes=4, image_size=32), "train", size)


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_same_batches_and_other_seed_others():
    layout = pipeline.Layout(8)
    runs = [take(pipeline.train_batches(demo(), SPEC, layout, seed=s, num_epochs=2)[1], 6) for s in (3, 3, 4)]
    assert_same(runs[0], runs[1])
    assert not np.array_equal(runs[0][0]["image"], runs[2][0]["image"])
    assert set(runs[0][0]) == {"image", "label"} and runs[0][0]["image"].shape == (8, 32, 32, 3)


def test_resuming_at_step_k_gives_batch_k():
    """The iterator state is the step: a restart at k continues exactly where the run was, across epochs."""
    layout = pipeline.Layout(8)
    steps, full = pipeline.train_batches(demo(), SPEC, layout, seed=1, num_epochs=3)
    uninterrupted = list(full)
    assert steps == 5 and len(uninterrupted) == 15
    for k in (1, 5, 7, 14):
        _, resumed = pipeline.train_batches(demo(), SPEC, layout, seed=1, num_epochs=3, start_step=k)
        assert_same(list(resumed), uninterrupted[k:])


def test_each_epoch_is_a_permutation_and_worker_processes_change_nothing():
    layout = pipeline.Layout(8)
    single = take(pipeline.train_batches(demo(), SPEC, layout, seed=2, num_epochs=2)[1], 10)
    labels = np.concatenate([b["label"] for b in single[:5]])
    assert np.bincount(labels, minlength=4).tolist() == [10, 10, 10, 10]  # every example once per epoch
    workers = take(pipeline.train_batches(demo(), SPEC, layout, seed=2, num_epochs=2, workers=2)[1], 10)
    assert_same(single, workers)


def test_hosts_load_disjoint_shares_of_the_global_batch():
    whole = take(pipeline.train_batches(demo(), SPEC, pipeline.Layout(8), seed=0, num_epochs=1)[1], 3)
    shares = [
        take(pipeline.train_batches(demo(), SPEC, pipeline.Layout(8, p, 2), seed=0, num_epochs=1)[1], 3)
        for p in range(2)
    ]
    for step, batch in enumerate(whole):
        for k in batch:
            np.testing.assert_array_equal(np.concatenate([s[step][k] for s in shares]), batch[k])


def test_uint8_batches_normalised_on_device_equal_the_host_normalised_ones():
    layout = pipeline.Layout(8)
    host = take(pipeline.train_batches(demo(), SPEC, layout, seed=5, num_epochs=1)[1], 2)
    spec = dataclasses.replace(SPEC, normalize_on_device=True)
    raw = take(pipeline.train_batches(demo(), spec, layout, seed=5, num_epochs=1)[1], 2)
    normalize = jax.jit(pipeline.normalize_on_device, static_argnums=1)
    for h, r in zip(host, raw):
        assert r["image"].dtype == np.uint8
        np.testing.assert_allclose(np.asarray(normalize(r["image"], spec)), h["image"], atol=1e-6)
    np.testing.assert_array_equal(normalize(host[0]["image"], spec), host[0]["image"])


def test_eval_covers_every_example_once_with_padding_masked():
    src = demo(13)
    n, batches = pipeline.eval_batches(src, SPEC, pipeline.Layout(4), with_box=True)
    got = list(batches)
    assert n == len(got) == 4
    mask = np.concatenate([b["mask"] for b in got])
    assert mask.tolist() == [1] * 13 + [0] * 3
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in got])[:13], [src[i]["label"] for i in range(13)])
    assert all(b["box"].shape == (4, 4) for b in got)


# --- bad images ---------------------------------------------------------------------------------------------------

RGB = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def pil_bytes(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(out, fmt)
    return out.getvalue()


def cv2_bytes(array: np.ndarray, ext: str) -> bytes:
    return cv2.imencode(ext, array)[1].tobytes()


CONVERTIBLE = {
    "grey.jpg": pil_bytes(RGB[..., 0], "JPEG"),
    "cmyk.jpg": pil_bytes(RGB, "JPEG", "CMYK"),
    "alpha.png": pil_bytes(np.dstack([RGB, RGB[..., :1]]), "PNG"),
    "one_pixel.png": pil_bytes(RGB[:1, :1], "PNG"),
    "sixteen_bit.png": cv2_bytes((RGB.astype(np.uint16) * 257)[..., ::-1], ".png"),
}
UNREADABLE = {
    "truncated.jpg": cv2_bytes(RGB, ".jpg")[:300],
    "truncated.png": cv2_bytes(RGB, ".png")[:300],
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(200),
    "empty.png": b"",
    "text.jpg": b"not an image at all",
}


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_convertible_images_decode_to_rgb(name):
    image = decode.decode_image(CONVERTIBLE[name])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == ((1, 1) if name == "one_pixel.png" else RGB.shape[:2])
    if name == "alpha.png":
        np.testing.assert_array_equal(image, RGB)
    if name == "cmyk.jpg":
        assert (
            np.abs(image.astype(int) - np.asarray(Image.open(io.BytesIO(CONVERTIBLE[name])).convert("RGB"))).max() <= 2
        )


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_images_raise_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(UNREADABLE[name])
    with pytest.raises(decode.UnreadableImage, match=name):
        decode.load_example({"image": str(path), "label": 0})


def test_missing_file_and_odd_arrays_are_unreadable(tmp_path):
    with pytest.raises(decode.UnreadableImage, match="cannot read"):
        decode.read_image(str(tmp_path / "gone.jpg"))
    with pytest.raises(decode.UnreadableImage):
        decode.read_image(np.zeros((4, 4, 2), np.uint8))
    assert decode.read_image(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)


def test_relative_boxes_become_pixels_after_decoding():
    example = decode.load_example({"image": RGB, "label": 2, "rel_box": [0.25, 0.5, 0.75, 1.0]})
    np.testing.assert_allclose(example["box"], [8, 12, 24, 24])


@pytest.fixture
def bad_folder(tmp_path) -> sources.FileSource:
    """An ImageFolder of 16 good images, the convertible oddities and the unreadable files, all in class 'a' or 'b'."""
    files = {f"good{i:02d}.png": cv2_bytes(np.full((20, 20, 3), 10 * i, np.uint8), ".png") for i in range(16)}
    files |= CONVERTIBLE | UNREADABLE
    for i, (name, data) in enumerate(sorted(files.items())):
        folder = tmp_path / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return sources.image_folder_source(str(tmp_path), "train", "train")


def test_training_skips_unreadable_images_deterministically_and_reports_each_once(bad_folder, caplog):
    n = len(bad_folder)
    unreadable = {i for i in range(n) if os.path.basename(bad_folder.paths[i]) in UNREADABLE}
    assert len(unreadable) == len(UNREADABLE)
    layout = pipeline.Layout(8)
    with caplog.at_level(logging.WARNING, logger="pmg_jax.data.pipeline"):
        steps, it = pipeline.train_batches(bad_folder, SPEC, layout, seed=0, num_epochs=3)
        batches = list(it)
    assert len(batches) == 3 * steps and all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skips) == len(UNREADABLE)
    for name in UNREADABLE:
        assert sum(name in m for m in skips) == 1
    assert f"{len(UNREADABLE)} unreadable images were skipped" in caplog.records[-1].getMessage()
    assert it.unreadable.indices == unreadable
    again = list(pipeline.train_batches(bad_folder, SPEC, layout, seed=0, num_epochs=3)[1])
    assert_same(batches, again)


def test_a_skipped_image_is_replaced_by_the_next_readable_one(bad_folder):
    n = len(bad_folder)
    bad = next(i for i in range(n) if os.path.basename(bad_folder.paths[i]) in UNREADABLE)
    example, skipped = pipeline.first_readable(bad_folder, bad)
    j = (bad + skipped) % n
    assert skipped >= 1 and os.path.basename(bad_folder.paths[j]) not in UNREADABLE
    assert example["label"] == bad_folder.labels[j]


def test_eval_masks_unreadable_images_and_counts_the_rest_once(bad_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="pmg_jax.data.pipeline"):
        _, it = pipeline.eval_batches(bad_folder, SPEC, pipeline.Layout(8))
        mask = np.concatenate([b["mask"] for b in it])
    readable = [os.path.basename(p) not in UNREADABLE for p in bad_folder.paths]
    np.testing.assert_array_equal(mask[: len(bad_folder)], readable)
    assert mask.sum() == len(bad_folder) - len(UNREADABLE)
    assert sum(m.getMessage().startswith("skipping") for m in caplog.records) == len(UNREADABLE)


# --- positive pairs (PMG-V2) -----------------------------------------------------------------------------------


def expected_positives(src, spec: pipeline.TransformSpec, layout: pipeline.Layout, seed: int, step: int) -> np.ndarray:
    """Step `step`'s positives made by hand: the first candidate of each example, cropped with the positive stream."""
    pairing, n = positives.Pairing.of(src), len(src)
    per_epoch = (n // layout.global_batch) * layout.global_batch
    out = []
    for slot in range(layout.local_batch):
        position = layout.global_position(step, slot)
        epoch, k = divmod(position, per_epoch)
        index = int(np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)[k])
        others = pairing.others(index)
        assert index not in others and (src.labels[others] == src.labels[index]).all() and len(others)
        other = int(pairing.candidates(index, pairing.first(index, seed, position))[0])
        params = transforms.position_crop(
            seed,
            position,
            resize_size=spec.resize_size,
            crop_size=spec.crop_size,
            pad=spec.pad,
            hflip=spec.hflip,
            stream=transforms.POSITIVE_CROP_STREAM,
        )
        crop = transforms.train_crop(
            src[other]["image"], params, resize_size=spec.resize_size, crop_size=spec.crop_size, pad=spec.pad
        )
        out.append(transforms.normalize(crop, spec.mean, spec.std))
    return np.stack(out)


def test_positives_are_other_images_of_the_class_cropped_independently_and_resume_bit_for_bit():
    src, layout = demo(), pipeline.Layout(8)
    pairing = positives.Pairing.of(src)
    steps, full = pipeline.train_batches(src, SPEC, layout, seed=1, num_epochs=2, pairing=pairing)
    uninterrupted = list(full)
    batch = uninterrupted[0]
    assert set(batch) == {"image", "positive", "label"}
    assert batch["positive"].shape == batch["image"].shape and batch["positive"].dtype == batch["image"].dtype
    for step in (0, 6):
        np.testing.assert_array_equal(uninterrupted[step]["positive"], expected_positives(src, SPEC, layout, 1, step))
    without = take(pipeline.train_batches(src, SPEC, layout, seed=1, num_epochs=2)[1], 2)
    for a, b in zip(without, uninterrupted):  # the examples and their crops are those of a run without pairs
        np.testing.assert_array_equal(a["image"], b["image"])
    _, resumed = pipeline.train_batches(src, SPEC, layout, seed=1, num_epochs=2, start_step=7, pairing=pairing)
    assert_same(list(resumed), uninterrupted[7:])
    assert steps == 5
    _, workers = pipeline.train_batches(src, SPEC, layout, seed=1, num_epochs=2, workers=2, pairing=pairing)
    assert_same([{k: v.copy() for k, v in b.items()} for b in workers], uninterrupted)
    shares = [
        take(pipeline.train_batches(src, SPEC, pipeline.Layout(8, p, 2), seed=1, num_epochs=1, pairing=pairing)[1], 2)
        for p in range(2)
    ]
    for step in range(2):
        np.testing.assert_array_equal(
            np.concatenate([s[step]["positive"] for s in shares]),
            uninterrupted[step]["positive"],
        )


def test_a_class_with_one_training_image_is_refused_naming_it(tmp_path):
    for name, count in (("finch", 3), ("lonely_wren", 1)):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{name}{i}.png").write_bytes(cv2_bytes(np.full((20, 20, 3), 40 * i, np.uint8), ".png"))
    src = sources.image_folder_source(str(tmp_path), "train", "train")
    with pytest.raises(
        sources.DatasetError, match=r"class 1 \('lonely_wren'\) has one training image \(.*lonely_wren0.png\)"
    ):
        positives.Pairing.of(src)


def test_unreadable_or_oversized_positives_are_passed_over_and_reported_once(tmp_path, caplog):
    """A positive that cannot be read (corrupt, or over the pixel cap) is replaced by the next image of its class;
    a class whose other images are all unreadable pairs an image with itself; each skipped file is reported once."""
    classes = {
        "a": {"a0.png": 10, "a1_corrupt.png": None, "a2_huge.png": 2000, "a3.png": 30},
        "b": {"b0.png": 50, "b1_corrupt.png": None},
    }
    for name, files in classes.items():
        (tmp_path / "train" / name).mkdir(parents=True)
        for file, grey in files.items():
            side = 40 if grey == 2000 else 20
            data = (
                UNREADABLE["truncated.png"]
                if grey is None
                else cv2_bytes(np.full((side, side, 3), grey % 256, np.uint8), ".png")
            )
            (tmp_path / "train" / name / file).write_bytes(data)
    src = sources.image_folder_source(str(tmp_path), "train", "train")
    spec = dataclasses.replace(SPEC, max_pixels=30 * 30)
    with caplog.at_level(logging.WARNING, logger="pmg_jax.data.pipeline"):
        _, it = pipeline.train_batches(
            src, spec, pipeline.Layout(2), seed=0, num_epochs=4, pairing=positives.Pairing.of(src)
        )
        batches = list(it)
    skips = sorted(r.getMessage().split()[3] for r in caplog.records if r.getMessage().startswith("skipping"))
    assert [os.path.basename(p.rstrip(":")) for p in skips] == ["a1_corrupt.png", "a2_huge.png", "b1_corrupt.png"]
    greys = {10, 30, 50}  # each crop keeps some of its image's grey (pad 2 of 36: the centre is always inside)
    for b in batches:
        for image, positive, label in zip(b["image"], b["positive"], b["label"]):
            g_image, g_positive = (int(round((x[16, 16, 0] * 0.5 + 0.5) * 255)) for x in (image, positive))
            assert {g_image, g_positive} <= greys
            assert (g_positive == 50) == (label == 1)  # class b has one readable image: it is its own positive
            if label == 0:
                assert g_positive != g_image  # class a: the other readable image
    bad = {i for i, path in enumerate(src.paths) if "_" in os.path.basename(path)}
    pairing, passed_over = positives.Pairing.of(src), 0
    for seed in range(8):  # one example per step: what step 0 reports is its example's and its positive's skips
        _, it = pipeline.train_batches(src, spec, pipeline.Layout(1), seed=seed, num_epochs=1, pairing=pairing)
        next(it)
        index = int(np.random.default_rng([seed, 0, 0x5EED]).permutation(len(src))[0])
        anchor_skips = set()
        while index in bad:
            anchor_skips.add(index)
            index = (index + 1) % len(src)
        tried = pairing.candidates(index, pairing.first(index, seed, 0))
        readable = [i for i, c in enumerate(tried) if c not in bad]
        skipped = set(tried[: readable[0] if readable else len(tried)].tolist())
        assert it.unreadable.indices == anchor_skips | skipped
        passed_over += len(skipped)
    assert passed_over  # some positive was passed over
