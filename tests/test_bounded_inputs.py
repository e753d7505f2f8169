"""Images are decoded within a pixel cap read from their header: oversized and undecodable files are reported
and skipped by predict, explain and training, which go on with the rest in bounded memory."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from big_images import write_grey_png, write_noise_jpeg
from conftest import ROOT, random_variables, tiny_demo_config
from PIL import Image

from pmg_jax import convert, validate, viz
from pmg_jax import explain as explain_lib
from pmg_jax import state as state_lib
from pmg_jax.cli import predict as predict_cli
from pmg_jax.data import decode, synthetic
from pmg_jax.errors import ConfigError

pytestmark = pytest.mark.xdist_group("bounded_inputs")  # one worker: the big files and the run are made once

PEAK_LIMIT_KB = 2 * 1024 * 1024  # every command's peak resident memory must stay under 2 GiB
TINY = {
    "model.backbone": "resnet18",
    "model.width": 8,
    "model.stage_sizes": (1, 1, 1, 1),
    "model.feature_size": 16,
    "data.crop_size": 32,
    "data.resize_size": 40,
    "data.pad": 2,
    "dataset.demo_image_size": 48,
    "eval_batch_size": 8,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A run directory holding a tiny PMG with random weights for the demo's 8 classes."""
    config = tiny_demo_config(**TINY)
    model = state_lib.create_model(config)
    variables = random_variables(model, config.data.crop_size, seed=0)
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    convert.write_checkpoint(variables, out, config, synthetic.class_names(8))
    return out


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, str]:
    """Grey PNGs of 40000 x 40000 (over OpenCV's own limit) and 15000 x 15000 (under it, over the cap)."""
    folder = tmp_path_factory.mktemp("bombs")
    paths = {"huge": str(folder / "huge_40000.png"), "large": str(folder / "large_15000.png")}
    write_grey_png(paths["huge"], 40000, 40000)
    write_grey_png(paths["large"], 15000, 15000)
    return paths


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    """A 12000 x 9000 colour JPEG (108 megapixels, under the default cap)."""
    path = str(tmp_path_factory.mktemp("photo") / "photo.jpg")
    write_noise_jpeg(path, 12000, 9000)
    return path


def good_images(folder, n: int = 2) -> list[str]:
    """n small demo images written as files; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    spec = synthetic.DemoSpec(8, 48)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"good{i}.{'png' if i % 2 else 'jpg'}")
        cv2.imwrite(path, cv2.cvtColor(synthetic.make_example(spec, "test", i)["image"], cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr, "peak_kb": peak}))
"""


def measured(*argv: str) -> dict:
    """Run a command in a fresh process and return its exit status, output and peak resident memory (KiB):
    the maxrss of the children of an intermediate process whose only child is the command (printed: pytest -s)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900, check=True
    )
    result = json.loads(done.stdout)
    print(f"peak {result['peak_kb'] / 1024:.0f} MiB: {' '.join(os.path.basename(a) for a in argv[1:])}")
    return result


def test_header_is_checked_before_any_pixel_is_decoded(bombs, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded an image over the cap")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    for path, size in ((bombs["huge"], "40000x40000"), (bombs["large"], "15000x15000")):
        with open(path, "rb") as f:
            data = f.read()
        assert decode.header_size(data) == tuple(int(v) for v in size.split("x"))
        with pytest.raises(decode.UnreadableImage, match=f"{size} pixels is more than the 178956970 pixels"):
            decode.decode_image(data)
    with pytest.raises(decode.UnreadableImage, match="more than the 100 pixels"):
        decode.load_example({"image": bombs["large"], "label": 0}, max_pixels=100)


def test_the_default_cap_is_pils_bomb_limit_and_config_checks_it():
    assert decode.DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    config = tiny_demo_config(**TINY)
    assert config.data.max_image_pixels == decode.DEFAULT_MAX_PIXELS
    validate.check(config, 1)
    for bad in (0, 2**31):
        config.data.max_image_pixels = bad
        with pytest.raises(ConfigError, match="config.data.max_image_pixels"):
            validate.check(config, 1)


def test_what_opencv_refuses_is_unreadable_not_a_crash(monkeypatch):
    png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()

    def refuse(*args):
        raise cv2.error("OpenCV(5.1.0) loadsave.cpp:77: error: (-215:Assertion failed) pixels <= LIMIT")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    with pytest.raises(decode.UnreadableImage, match="OpenCV cannot decode it"):
        decode.decode_image(png)


def test_a_format_pil_cannot_size_is_checked_after_decoding(tmp_path):
    """Radiance HDR: PIL reads no header of it, so OpenCV decodes it (under its own limit) and the cap applies."""
    data = cv2.imencode(".hdr", np.ones((20, 30, 3), np.float32))[1].tobytes()
    assert decode.header_size(data) is None
    assert decode.decode_image(data).shape == (20, 30, 3)
    with pytest.raises(decode.UnreadableImage, match="30x20 pixels is more than the 500 pixels"):
        decode.decode_image(data, max_pixels=500)


def test_pictures_are_drawn_at_a_bounded_size():
    small = np.zeros((300, 200, 3), np.uint8)
    assert viz.bounded(small) is small
    wide = np.zeros((900, 6000, 3), np.uint8)
    assert viz.bounded(wide).shape == (307, 2048, 3)


def test_predict_reports_bombs_and_predicts_the_rest_in_bounded_memory(run, bombs, tmp_path):
    good = good_images(tmp_path / "good")
    out = tmp_path / "preds.jsonl"
    done = measured(
        sys.executable, "-m", "pmg_jax.predict", "--ckpt", run, "--images", *good, *bombs.values(), "--out", str(out)
    )
    assert done["rc"] == 0, done["err"][-3000:]
    rows = {os.path.basename(r["path"]): r for r in map(json.loads, open(out))}
    assert set(rows) == {"good0.jpg", "good1.png", "huge_40000.png", "large_15000.png"}
    assert all("combined" in rows[name] for name in ("good0.jpg", "good1.png"))
    assert "40000x40000 pixels is more than" in rows["huge_40000.png"]["error"]
    assert "15000x15000 pixels is more than" in rows["large_15000.png"]["error"]
    assert "predicted 2 of 4 images" in done["err"]
    assert done["peak_kb"] < PEAK_LIMIT_KB, done["peak_kb"]


def test_max_pixels_flag_overrides_the_checkpoints_cap(run, tmp_path, capsys):
    good = good_images(tmp_path / "good")  # 48 x 48 = 2304 pixels each
    assert predict_cli.main(["--ckpt", run, "--images", *good, "--max-pixels", "2304"]) == 0
    capsys.readouterr()
    assert predict_cli.main(["--ckpt", run, "--images", *good, "--max-pixels", "2303"]) == 1
    err = capsys.readouterr().err
    assert err.count("48x48 pixels is more than the 2303 pixels allowed") == 2
    for bad in ("0", str(2**30 + 1), "many"):
        with pytest.raises(SystemExit):
            predict_cli.main(["--ckpt", run, "--images", *good, "--max-pixels", bad])
        assert "--max-pixels" in capsys.readouterr().err


@pytest.mark.slow  # a whole command in a subprocess over large files
def test_explain_reports_bombs_and_explains_the_rest_in_bounded_memory(run, bombs, tmp_path):
    good = good_images(tmp_path / "good")
    out = tmp_path / "out"
    argv = ["--ckpt", run, "--block", "3", "--images", *good, *bombs.values(), "--out", str(out)]
    done = measured(sys.executable, "explain.py", *argv)
    assert done["rc"] == 0, done["err"][-3000:]
    skipped = [line for line in done["err"].splitlines() if line.startswith("skipping ")]
    assert len(skipped) == 2 and all(any(os.path.basename(p) in line for line in skipped) for p in bombs.values())
    assert sorted(f for f in os.listdir(out) if f.startswith("grid_")) == ["grid_good0.png", "grid_good1.png"]
    assert "explained 2 of 4 images" in done["out"]
    assert done["peak_kb"] < PEAK_LIMIT_KB, done["peak_kb"]


@pytest.mark.slow  # a whole command in a subprocess over large files
def test_a_100_megapixel_photo_is_predicted_and_explained_in_bounded_memory(run, photo, tmp_path):
    out = tmp_path / "preds.jsonl"
    done = measured(sys.executable, "-m", "pmg_jax.predict", "--ckpt", run, "--images", photo, "--out", str(out))
    assert done["rc"] == 0, done["err"][-3000:]
    assert "combined" in json.loads(open(out).readline())
    assert done["peak_kb"] < PEAK_LIMIT_KB, ("predict", done["peak_kb"])

    folder = tmp_path / "explain"
    done = measured(sys.executable, "explain.py", "--ckpt", run, "--images", photo, "--out", str(folder))
    assert done["rc"] == 0, done["err"][-3000:]
    assert done["peak_kb"] < PEAK_LIMIT_KB, ("explain", done["peak_kb"])
    overlays = [f for f in os.listdir(folder) if f.endswith(".jpg")]
    assert len(overlays) == 4
    for name in overlays:
        assert cv2.imread(str(folder / name)).shape == (1536, 2048, 3)  # 12000 x 9000 drawn at 2048 x 1536


def test_explaining_a_split_skips_its_bombs(bombs, tmp_path):
    """explain.py without --images samples the run's own split: an oversized image there is a problem, not a crash."""
    from test_sources import config_for

    root = tmp_path / "data"
    for split in ("train", "test"):
        good_images(root / split / "a", 2)
    os.symlink(bombs["large"], root / "test" / "a" / "large.png")
    config = config_for("imagefolder", str(root), **{"dataset.num_classes": 1})
    problems = []
    indices, items = explain_lib.from_split(config, "test", 8, problems)
    assert [item.origin.rsplit("/", 1)[-1] for item in items] == ["good0.jpg", "good1.png"]
    assert len(indices) == 3 and len(problems) == 1 and "large.png: 15000x15000 pixels is more than" in problems[0]
    with pytest.raises(decode.UnreadableImage, match="large.png"):
        list(explain_lib.from_split(config, "test", 8)[1])


@pytest.mark.slow  # trains through the loop
def test_training_skips_bombs_in_its_training_set(bombs, tmp_path):
    """ImageFolder training with both PNGs among the training images: each reported once, the run finishes.
    The model and flags are those of test_sources.py's train.py run, so the compilation cache serves both."""
    from test_sources import config_for

    root = tmp_path / "data"
    for split, n in (("train", 2), ("test", 1)):
        for label in ("a", "b", "c"):
            for i, path in enumerate(good_images(root / split / label, n)):
                os.rename(path, os.path.join(os.path.dirname(path), f"{i}_{os.path.basename(path)}"))
    for name, path in bombs.items():
        os.symlink(path, root / "train" / ("a" if name == "huge" else "b") / os.path.basename(path))
    tiny = config_for("imagefolder", str(root))
    flags = {
        "dataset.name": "imagefolder",
        "dataset.data_dir": str(root),
        "dataset.num_classes": 3,
        "num_epochs": 1,
        "data.resize_size": 40,
        "data.crop_size": 32,
        "data.pad": 2,
        "data.workers": 0,
        "model.backbone": "resnet18",
        "model.width": 8,
        "model.stage_sizes": "(1,1,1,1)",
        "model.feature_size": 16,
        "batch_size": 8,  # the whole training set (6 images and the 2 PNGs): both are met in the one step
        "eval_batch_size": 8,
        "log_every_steps": 1,
        "optim.lr_new": tiny.optim.lr_new,
        "optim.lr_backbone": tiny.optim.lr_backbone,
    }
    argv = [f"--config.{k}={v}" for k, v in flags.items()]
    workdir = str(tmp_path / "run")
    done = measured(sys.executable, "train.py", "--config", "configs/cub.py", "--workdir", workdir, *argv)
    assert done["rc"] == 0, done["err"][-3000:]
    logged = (done["out"] + done["err"]).splitlines()
    for path in bombs.values():
        assert sum(os.path.basename(path) in line for line in logged if "skipping" in line) == 1
    assert done["peak_kb"] < PEAK_LIMIT_KB, done["peak_kb"]
