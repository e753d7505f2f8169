"""config.log_cams: CAMs of fixed test images at every evaluation (TensorBoard, cams/), and their strip over epochs."""

import glob
import json
import os
import struct

import numpy as np
import pytest
from conftest import tiny_demo_config
from PIL import Image
from tensorboardX.proto import event_pb2

from pmg_jax import cam, cam_log, loop, methods, validate
from pmg_jax import state as state_lib
from pmg_jax.cli import explain_history as explain_history_cli
from pmg_jax.data import decode, sources

EPOCHS = 2
# The smallest demo run that still has every map: 2 steps per epoch on 32 images, 16 test images.
TINY = {
    "num_epochs": EPOCHS,
    "dataset.demo_train_size": 32,
    "dataset.demo_test_size": 16,
    "model.width": 8,
    "model.feature_size": 16,
    "data.resize_size": 40,
    "data.crop_size": 32,
}


def tensorboard_images(workdir: str) -> dict[str, list[tuple[int, tuple[int, int]]]]:
    """(step, (height, width)) of every image summary in the run's event files, by tag (TFRecord framing:
    length, its crc, the Event proto, its crc)."""
    images: dict[str, list] = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.setdefault(value.tag, []).append((event.step, (value.image.height, value.image.width)))
    return images


def epoch_records(workdir: str) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["kind"] == "epoch"]


@pytest.fixture
def explainer_calls(monkeypatch) -> list:
    """Counts the explainers built (each is one jitted function, traced at its first call)."""
    calls = []
    make = cam.make_explainer

    def counted(*args, **kwargs):
        calls.append(args)
        return make(*args, **kwargs)

    monkeypatch.setattr(cam, "make_explainer", counted)
    return calls


@pytest.mark.slow  # trains through the loop
def test_every_evaluation_logs_each_map_to_tensorboard_and_cams_with_one_explainer(tmp_path, explainer_calls):
    workdir = str(tmp_path / "run")
    config = tiny_demo_config(**TINY, log_cams=2)
    loop.train_and_evaluate(config, workdir)

    assert len(explainer_calls) == 1  # built once, reused by both evaluations
    maps = cam.default_maps(methods.PMG)  # the run's method's: each block's map and the concat map
    images = tensorboard_images(workdir)
    steps = [r["step"] for r in epoch_records(workdir)]
    assert sorted(images) == [f"cams/{m}" for m in sorted(maps)]
    for tag, logged in images.items():
        assert [s for s, _ in logged] == steps, tag  # one image per map per evaluation, at its step
        assert all(shape == (cam_log.TILE, 2 * cam_log.TILE) for _, shape in logged), tag  # 2 images side by side
    pngs = sorted(os.listdir(os.path.join(workdir, "cams")))
    assert pngs == [f"epoch_{e:04d}.{x}" for e in range(1, EPOCHS + 1) for x in ("npz", "png")]
    grid = Image.open(os.path.join(workdir, "cams", "epoch_0002.png"))
    assert grid.width > (1 + len(maps)) * cam_log.TILE and grid.height > 2 * cam_log.TILE
    assert all(r["cams_seconds"] > 0 and r["eval_seconds"] > 0 for r in epoch_records(workdir))

    # The last record's maps are those of the final weights on the same test images, explained afresh.
    restored = state_lib.restore(workdir)
    with np.load(os.path.join(workdir, "cams", "epoch_0002.npz")) as f:
        logged_maps, indices = f["maps"], list(f["indices"])
    assert indices == [0, 15]  # spread over the 16 test images
    test = sources.make_source(restored.config, "test")
    size, mean, std = config.data.crop_size, config.data.mean, config.data.std
    x = np.stack([cam.prepare(decode.load_example(test[i])["image"], size, mean, std) for i in indices])
    fresh = cam.make_explainer(restored.model, cam.CamOptions(maps))(restored.variables, x)
    expected = np.stack([np.asarray(fresh.maps[m]) for m in maps], axis=1)
    np.testing.assert_allclose(logged_maps, expected, atol=1e-5)

    # One image's strip over the epochs: a row per map, the image then one tile per evaluation.
    out = str(tmp_path / "strip.png")
    explain_history_cli.main(["--run", workdir, "--image", "1", "--out", out])
    strip = Image.open(out)
    assert (1 + EPOCHS) * cam_log.TILE < strip.width < (2 + EPOCHS) * cam_log.TILE
    assert len(maps) * cam_log.TILE < strip.height < (len(maps) + 1) * (cam_log.TILE + 60)
    with pytest.raises(SystemExit, match="--image 2: the run logged 2 images"):
        explain_history_cli.main(["--run", workdir, "--image", "2"])


@pytest.mark.slow  # trains through the loop
def test_log_cams_zero_builds_no_explainer_and_writes_no_cams(tmp_path, explainer_calls):
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(tiny_demo_config(**TINY, log_cams=0, log_every_steps=1), workdir)
    assert explainer_calls == []
    assert not os.path.exists(os.path.join(workdir, "cams"))
    assert tensorboard_images(workdir) == {}
    assert not any("cams_seconds" in r for r in epoch_records(workdir))
    # The epoch record's losses are the means over every step of the epoch (here each step is logged too).
    train = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["kind"] == "train"]
    for record in epoch_records(workdir):
        steps = [t for t in train if record["step"] - record["train_steps"] < t["step"] <= record["step"]]
        assert len(steps) == record["train_steps"] == 2
        for k in ("loss1", "loss2", "loss3", "loss_concat", "accuracy"):
            assert record[k] == pytest.approx(np.mean([t[k] for t in steps]), rel=1e-6), k


def test_a_run_without_cams_and_a_negative_count_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="no cams/epoch_.*npz .*--config.log_cams=N"):
        explain_history_cli.main(["--run", str(tmp_path)])
    os.makedirs(tmp_path / "cams")
    (tmp_path / "cams" / "epoch_0001.npz").write_bytes(b"not an npz")
    with pytest.raises(SystemExit, match="epoch_0001.npz: not a CAM record"):
        explain_history_cli.main(["--run", str(tmp_path)])
    with pytest.raises(validate.ConfigError, match="config.log_cams=-1 must be >= 0"):
        validate.check(tiny_demo_config(log_cams=-1), 1)


def test_bench_cams_reads_evaluation_and_cam_seconds_of_a_run(tmp_path, capsys):
    from bench import cams

    records = [{"kind": "eval", "step": 1}] + [
        {"kind": "epoch", "step": e, "eval_seconds": float(e), "cams_seconds": 10.0 * e} for e in (1, 2, 3, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cams.main(["--run", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert out["evaluations"] == 4 and out["eval_first"] == 1.0 and out["eval_and_cams_first"] == 11.0
    assert out["eval_later_median"] == 3.0 and out["cams_later_median"] == 30.0  # epochs 2-4, the first compiles
