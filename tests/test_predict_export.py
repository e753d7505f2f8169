"""From a run to an application: batch prediction of files and of a split, and exported models (StableHLO,
ONNX) that compute what the JAX model computes. A tiny model from random weights, written as a run."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, random_variables, tiny_demo_config

from pmg_jax import convert, export, kernels, loop, predict
from pmg_jax import state as state_lib
from pmg_jax.cli import export as export_cli
from pmg_jax.cli import predict as predict_cli
from pmg_jax.data import synthetic, transforms

pytestmark = pytest.mark.xdist_group("predict_export")  # one worker: the fixtures' run and compilations are shared

TINY = {
    "model.width": 8,
    "model.feature_size": 16,
    "data.crop_size": 32,
    "data.resize_size": 40,
    "dataset.demo_image_size": 48,
    "dataset.demo_test_size": 20,
    "eval_batch_size": 8,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, config) of a tiny PMG with random weights for the demo's 8 classes."""
    config = tiny_demo_config(**TINY)
    model = state_lib.create_model(config)
    variables = random_variables(model, config.data.crop_size, seed=3)
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    convert.write_checkpoint(variables, out, config, synthetic.class_names(8))
    return out, config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with a colour PNG, a greyscale JPEG, a corrupt JPEG and a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    spec = synthetic.DemoSpec(8, 56)
    colour = synthetic.make_example(spec, "test", 0)["image"]
    cv2.imwrite(str(folder / "bird.png"), cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
    grey = cv2.cvtColor(synthetic.make_example(spec, "test", 1)["image"], cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(folder / "grey.jpg"), grey)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder, colour


def reference_outputs(restored, crops: np.ndarray) -> list[np.ndarray]:
    """(probabilities, head1, head2, head3, concat) of uint8 crops, normalised here and run by model.apply."""
    d = restored.config.data
    x = (crops.astype(np.float32) / 255.0 - np.asarray(d.mean, np.float32)) / np.asarray(d.std, np.float32)
    forward = jax.jit(lambda v, x: restored.model.apply(v, x, train=False))  # one program, not op by op
    logits = [np.asarray(z) for z in forward(restored.variables, x)]
    total = sum(logits)
    probs = np.exp(total - total.max(-1, keepdims=True))
    return [probs / probs.sum(-1, keepdims=True), *logits]


def crop(restored, image: np.ndarray) -> np.ndarray:
    d = restored.config.data
    return transforms.eval_crop(image, resize_size=d.resize_size, crop_size=d.crop_size)


def test_predict_a_folder_writes_a_row_per_file_and_reports_the_corrupt_one(run, images, tmp_path, capsys):
    folder, colour = images
    out = tmp_path / "preds.csv"
    args = ["--ckpt", run[0], "--images", str(folder), "--top-k", "3", "--heads", "--batch-size", "2"]
    assert predict_cli.main([*args, "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [os.path.basename(r["path"]) for r in rows] == ["bird.png", "broken.jpg", "grey.jpg"]
    assert capsys.readouterr().err.count("broken.jpg") == 1
    bird, broken, grey = rows
    assert broken["error"] and not broken["combined_top1"]
    assert grey["combined_top1"] and not grey["error"]
    restored = state_lib.restore(run[0])
    want = reference_outputs(restored, crop(restored, colour)[None])
    for i, name in enumerate(predict.outputs(restored)):
        probs = want[0][0] if name == "combined" else np.exp(want[i][0]) / np.exp(want[i][0]).sum()
        order = np.argsort(-probs)[:3]
        assert [bird[f"{name}_top{r}"] for r in (1, 2, 3)] == [restored.class_names[j] for j in order]
        np.testing.assert_allclose([float(bird[f"{name}_top{r}_prob"]) for r in (1, 2, 3)], probs[order], atol=1e-5)

    jsonl = tmp_path / "preds.jsonl"
    assert predict_cli.main([*args, "--out", str(jsonl)]) == 0
    lines = [json.loads(line) for line in open(jsonl)]
    assert [os.path.basename(r["path"]) for r in lines] == ["bird.png", "broken.jpg", "grey.jpg"]
    assert "error" in lines[1] and set(lines[2]) == {"path", *predict.outputs(restored)}
    assert [e["class"] for e in lines[0]["combined"]] == [bird[f"combined_top{r}"] for r in (1, 2, 3)]


def test_no_readable_image_exits_1_with_one_line(run, images, tmp_path, capsys):
    folder, _ = images
    missing = str(tmp_path / "missing.jpg")
    assert predict_cli.main(["--ckpt", run[0], "--images", str(folder / "broken.jpg"), missing]) == 1
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()  # the progress bar rewrites its line
    assert err[-1] == "pmg_jax.predict: none of the 2 inputs could be read as an image"
    assert sum("broken.jpg" in line for line in err) == 1 and sum("missing.jpg" in line for line in err) == 1


def test_bad_flags_and_checkpoints_get_one_line(run, tmp_path, capsys):
    assert predict_cli.main(["--ckpt", str(tmp_path / "nowhere"), "--images", "x.jpg"]) == 1
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_cli.main(["--ckpt", run[0], "--images", "x.jpg", "--out", str(tmp_path / "preds.txt")])
    assert "--out" in capsys.readouterr().err
    assert export_cli.main(["--ckpt", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(tmp_path)]) == 1


@pytest.mark.slow
def test_split_accuracy_equals_evaluation(run, tmp_path, capsys):
    workdir, config = run
    evaluated = loop.train_and_evaluate(
        tiny_demo_config(**TINY, eval_only=True, **{"init.checkpoint": workdir}), str(tmp_path / "unused")
    )
    restored = state_lib.restore(workdir)
    result = predict.predict_split(predict.make_predictor(restored, 8), "test")
    assert result.accuracy() == {k: evaluated[k] for k in (*predict.outputs(restored), "count")}
    assert result.confusion.sum() == config.dataset.demo_test_size

    out = tmp_path / "split" / "preds.jsonl"
    assert predict_cli.main(["--ckpt", workdir, "--split", "test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{evaluated['combined']:8.2f}" in printed and "per class" in printed
    assert all(name in printed for name in restored.class_names)
    confusion = list(csv.reader(open(tmp_path / "split" / "confusion_test.csv")))
    assert confusion[0][1:] == restored.class_names
    cells = np.array([[int(v) for v in row[1:]] for row in confusion[1:]])
    assert np.trace(cells) == round(evaluated["combined"] * config.dataset.demo_test_size / 100)
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == config.dataset.demo_test_size and rows[0]["path"] == "test[0]" and "label" in rows[0]


@pytest.fixture(scope="module")
def batch(run):
    """Three uint8 crops and what the JAX model makes of them."""
    restored = state_lib.restore(run[0])
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    return restored, crops, reference_outputs(restored, crops)


def test_exports_trace_every_convolution_direct():
    """A convolution that the kernels compute as Winograd on CPU (>= 256 channels and enough pixels) is chosen from
    the batch size, which a symbolic batch does not have: exports trace plain XLA operations, a direct convolution."""
    images = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 28, 28, 256"), jnp.float32)
    conv = lambda x: kernels.conv2d(x, jnp.zeros((3, 3, 256, 256)), 1, 1)
    with pytest.raises(jax.errors.InconclusiveDimensionOperation):
        jax.export.export(jax.jit(conv))(images)
    module = jax.export.export(jax.jit(export._portable(conv)))(images).mlir_module()
    assert "stablehlo.convolution" in module and "dot_general" not in module  # Winograd's GEMMs are dots
    assert kernels.current() == kernels.PRESETS["auto"]  # the choice was bound to the function, not left behind


STABLEHLO_RUNNER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
    outputs = exported.call(np.load(sys.argv[2]))
    assert "pmg_jax" not in sys.modules, "the exported model needs no pmg_jax"
    np.savez(sys.argv[3], *[np.asarray(o) for o in outputs])
""")


@pytest.mark.slow  # exports, then runs it in a fresh process
def test_stablehlo_export_runs_without_pmg_jax(batch, run, tmp_path):
    restored, crops, want = batch
    out = tmp_path / "shlo"
    assert export_cli.main(["--ckpt", run[0], "--format", "stablehlo", "--out", str(out)]) == 0
    card = json.load(open(out / "model.json"))
    assert card["class_names"] == restored.class_names and card["files"] == ["model.stablehlo"]
    assert (card["crop_size"], card["resize_size"], card["input"]["dtype"]) == (32, 40, "uint8")
    assert [o["name"] for o in card["outputs"]] == list(export.output_names(restored))
    assert "caller" in card["preprocessing"]["done_by"]
    for n in (3, 1):  # any batch size
        np.save(tmp_path / "x.npy", crops[:n])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                STABLEHLO_RUNNER,
                str(out / "model.stablehlo"),
                str(tmp_path / "x.npy"),
                str(tmp_path / "y.npz"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = np.load(tmp_path / "y.npz")
        got = [got[f"arr_{i}"] for i in range(5)]
        assert export.max_relative_difference(got[1:], [w[:n] for w in want[1:]]) <= 1e-4
        np.testing.assert_allclose(got[0], want[0][:n], atol=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_jax_under_onnxruntime(batch, run, tmp_path):
    import onnxruntime

    restored, crops, want = batch
    out = tmp_path / "onnx"
    assert export_cli.main(["--ckpt", run[0], "--format", "onnx", "--out", str(out)]) == 0
    card = json.load(open(out / "model.json"))
    session = onnxruntime.InferenceSession(str(out / card["files"][0]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [card["input"]["name"]]
    assert [o.name for o in session.get_outputs()] == list(export.output_names(restored))
    for n in (3, 1):
        got = session.run(None, {"images": crops[:n]})
        assert export.max_relative_difference(got[1:], [w[:n] for w in want[1:]]) <= 1e-4
        np.testing.assert_allclose(got[0], want[0][:n], atol=1e-5)


@pytest.mark.slow  # a whole ONNX export
def test_a_successful_onnx_export_says_only_what_it_did(run, tmp_path):
    """The converter's chatter (its plugins' skipped-import tracebacks, debugging prints) is held back."""
    done = subprocess.run(
        [sys.executable, "-m", "pmg_jax.export", "--ckpt", run[0], "--format", "onnx", "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "Traceback" not in said and "DEBUG" not in said and "WARNING" not in said, said[-3000:]
    assert done.stdout.splitlines()[-1].startswith(f"exported {run[0]} step 0 as onnx") and not done.stderr.strip()


@pytest.mark.slow
def test_onnx_example_classifies_an_image(run, images, tmp_path):
    out = tmp_path / "onnx"
    assert export_cli.main(["--ckpt", run[0], "--format", "onnx", "--out", str(out)]) == 0
    restored = state_lib.restore(run[0])
    # an image at the resize size: no resampling, so the example's OpenCV crop is the transform's exactly
    image = cv2.resize(images[1], (restored.config.data.resize_size,) * 2)
    cv2.imwrite(str(tmp_path / "bird.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "onnx_predict.py"), str(out), str(tmp_path / "bird.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line.rsplit(" ", 1) for line in proc.stdout.strip().splitlines()]
    want = reference_outputs(restored, crop(restored, image)[None])[0][0]
    top = np.argsort(-want)[:5]
    assert [name for name, _ in printed] == [restored.class_names[j] for j in top]
    np.testing.assert_allclose([float(p) for _, p in printed], want[top], atol=6e-5)  # printed to 4 decimals


@pytest.mark.slow
def test_predict_bench_runs_and_checks_parity(capsys):
    from bench import predict as bench_predict

    # the tiny run's model and batch: predict's function is then already in the compilation cache
    headline = bench_predict.main(
        [
            "--size",
            "32",
            "--batch",
            "2",
            "--rounds",
            "2",
            "--pause",
            "0",
            "--width",
            "8",
            "--feature-size",
            "16",
            "--stage-sizes",
            "1,1,1,1",
            "--classes",
            "8",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps = [(line["impl"], line["round"]) for line in lines if line.get("kind") == "step"]
    assert steps == [("jax", 0), ("onnx", 0), ("jax", 1), ("onnx", 1)]
    assert lines[-1] == headline and headline["jax_images_per_s"] > 0 and headline["onnx_images_per_s"] > 0
    assert headline["onnx_over_jax"] == pytest.approx(headline["onnx_images_per_s"] / headline["jax_images_per_s"])
    assert headline["onnx_max_rel_logit_diff"] <= 1e-4 and headline["stablehlo_max_rel_logit_diff"] <= 1e-4
