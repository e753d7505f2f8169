"""explain.py end to end on the tiny demo run: seed-named overlays, maps, grids, index.html, bad inputs."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT

from pmg_jax import cam, methods, viz
from pmg_jax import explain as explain_lib
from pmg_jax.cli import explain
from pmg_jax.data import synthetic

pytestmark = pytest.mark.xdist_group("demo_run")  # share one demo_run fixture (conftest)

SEED_STEMS = ("conv_block1", "conv_block2", "conv_block3", "conv_block_concat")


def write_demo_images(folder, config, n: int = 3) -> list[str]:
    """Demo test images as files of different formats and sizes; returns their stems."""
    os.makedirs(folder, exist_ok=True)
    spec = synthetic.DemoSpec(config.dataset.num_classes, config.dataset.demo_image_size, config.dataset.demo_seed)
    stems = []
    for i in range(n):
        image = synthetic.make_example(spec, "test", i)["image"]
        if i == 1:
            image = cv2.resize(image, (150, 100))  # not square, not the input size
        name = f"bird{i}.{'png' if i % 2 else 'jpg'}"
        cv2.imwrite(os.path.join(folder, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        stems.append(f"bird{i}")
    return stems


@pytest.mark.slow
def test_command_line_writes_seed_files_grids_and_gallery(demo_run, tmp_path):
    """`python explain.py --ckpt <demo workdir> --block all --images <dir>`, as the README shows it."""
    workdir, config, _ = demo_run
    stems = write_demo_images(tmp_path / "images", config)
    result = subprocess.run(
        [
            sys.executable,
            "explain.py",
            "--ckpt",
            workdir,
            "--block",
            "all",
            "--images",
            str(tmp_path / "images"),
            "--save-npy",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = os.path.join(workdir, "explain")  # default: inside the run
    names = synthetic.class_names(config.dataset.num_classes)
    for stem in stems:
        original = cv2.imread(str(tmp_path / "images" / f"{stem}.{'png' if stem == 'bird1' else 'jpg'}"))
        peaks = []
        for prefix in SEED_STEMS:
            overlay = cv2.imread(os.path.join(out, f"{prefix}_{stem}.jpg"))
            assert overlay.shape == original.shape, (prefix, stem)  # on the original image at its own size
            m = np.load(os.path.join(out, f"{prefix}_{stem}.npy"))
            assert m.shape == (config.data.crop_size,) * 2 and m.dtype == np.float32
            assert m.min() >= 0.0 and m.max() <= 1.0
            peaks.append(m.max())
        assert max(peaks) > 0.5  # (a single map may be all zero: no positive evidence at that block)
        assert os.path.isfile(os.path.join(out, f"grid_{stem}.png"))
        assert stem in result.stdout
    index = open(os.path.join(out, "index.html")).read()
    assert all(f'src="grid_{stem}.png"' in index for stem in stems)
    top5 = [line for line in result.stdout.splitlines() if line.strip().startswith(("head1", "concat"))]
    assert len(top5) == 2 * len(stems)
    assert all(sum(name in line for name in names) == 5 for line in top5)  # five classes, by name


@pytest.mark.slow
def test_bad_inputs_are_reported_and_skipped(demo_run, tmp_path, capsys):
    workdir, config, _ = demo_run
    write_demo_images(tmp_path / "good", config, n=1)
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty").mkdir()
    bad = [
        str(tmp_path / "missing.png"),
        str(tmp_path / "notes.jpg"),
        str(tmp_path / "empty"),
        str(tmp_path / "nothing*.png"),
    ]
    rc = explain.main(
        [
            "--ckpt",
            workdir,
            "--block",
            "3",
            "--out",
            str(tmp_path / "out"),
            "--images",
            str(tmp_path / "good" / "bird0.jpg"),
            *bad,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0
    skipped = [line for line in err.splitlines() if "skipping " in line]
    assert len(skipped) == len(bad) and all(any(b in line for line in skipped) for b in bad)
    assert sorted(os.listdir(tmp_path / "out")) == ["conv_block3_bird0.jpg", "grid_bird0.png", "index.html"]

    rc = explain.main(["--ckpt", workdir, "--out", str(tmp_path / "out2"), "--images", *bad])
    assert rc == 1 and "none of the" in capsys.readouterr().err


@pytest.mark.slow
def test_ckpt_forms_methods_and_class_targets(demo_run, tmp_path, capsys):
    """A folder of runs and a checkpoint step dir; two methods write a subfolder each."""
    workdir, config, _ = demo_run
    write_demo_images(tmp_path / "images", config, n=1)
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(workdir, runs / "demo")
    step = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    for i, ckpt in enumerate((str(runs), os.path.join(workdir, "checkpoints", str(step)))):
        out = tmp_path / f"out{i}"
        rc = explain.main(
            [
                "--ckpt",
                ckpt,
                "--block",
                "2",
                "--block",
                "concat",
                "--method",
                "gradcam",
                "--method",
                "eigencam",
                "--target",
                "3",
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        assert f"checkpoint {step}" in capsys.readouterr().out
        for method in ("gradcam", "eigencam"):
            assert {"conv_block2_bird0.jpg", "conv_block_concat_bird0.jpg", "index.html"} <= set(
                os.listdir(out / method)
            )


@pytest.mark.slow
def test_evaluate_prints_tables_and_saves_json(demo_run, tmp_path, capsys):
    workdir, _, _ = demo_run
    rc = explain.main(
        [
            "--evaluate",
            "--ckpt",
            workdir,
            "--split",
            "test",
            "--block",
            "1",
            "--block",
            "concat",
            "--max-images",
            "20",
            "--auc-steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "MaxBoxAccV2" in out and "Pointing" in out and "centre guess" in out
    report = json.load(open(tmp_path / "localization_test.json"))
    assert report["count"] == 20 and report["target"] == "label"
    assert set(report["results"]["gradcam"]) == {"block1", "concat"}
    assert 0.0 <= report["results"]["gradcam"]["block1"]["Insertion"] <= 1.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "label", "--images", "a.jpg"],
        ["--target", "big", "--images", "a"],
        ["--block", "4", "--images", "a.jpg"],
        ["--evaluate", "--target", "3"],
        ["--num-images", "0"],
    ],
)
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        explain.parse_args(["--ckpt", "runs/x", *argv])
    assert e.value.code == 2


def test_overlay_is_the_seeds_blend(tmp_path):
    """cv2.imread, JET of the map resized to the image, heatmap * 0.3 + img * 0.5, as the seed writes it."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    m = rng.random((12, 12)).astype(np.float32)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    img = cv2.imread(str(tmp_path / "x.png"))
    heatmap = cv2.applyColorMap(np.uint8(255 * cv2.resize(m, (53, 37))), cv2.COLORMAP_JET)
    seed = np.clip(np.rint(heatmap * 0.3 + img * 0.5), 0, 255).astype(np.uint8)
    got = viz.overlay(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), m)
    np.testing.assert_array_equal(cv2.cvtColor(got, cv2.COLOR_RGB2BGR), seed)


def test_grid_titles_fit_and_unique_tags():
    tiles = [
        (np.zeros((50, 80, 3), np.uint8), ["a very long class name " * 4, "93%"]),
        (np.zeros((100, 100, 3), np.uint8), ["block1"]),
    ]
    g = viz.grid(tiles, height=64)
    assert g.shape[0] > 64 and g.shape[1] == round(80 * 64 / 50) + 4 + 64
    assert explain_lib.unique_tags(["a/x.jpg", "b/x.png", "c/y.jpg", "d/x.jpg"]) == ["x", "x_2", "y", "x_3"]


def explained(probabilities: list[float], targets: dict[str, int] | None = None) -> explain_lib.Explained:
    """One image's result with every head's given probabilities and flat maps that are not all zero."""
    item = explain_lib.Item("x", "some/dir/x.png", np.zeros((8, 8, 3), np.uint8), label=0)
    maps = {n: np.full((8, 8), 0.5, np.float32) for n in ("block1", "block2", "block3", "concat")}
    heads = ("head1", "head2", "head3", "concat")
    return explain_lib.Explained(
        item, {"gradcam": maps}, {h: np.asarray(probabilities) for h in heads}, {}, {}, targets or {}
    )


def test_each_panel_is_titled_with_the_class_it_explains_and_the_prediction_when_another():
    names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    asked = explained([0.05, 0.1, 0.6, 0.1, 0.05, 0.1], dict.fromkeys(("head1", "head2", "head3", "concat"), 5))
    titles = explain_lib._titles(asked, asked.maps["gradcam"], names, methods.PMG)
    for name in ("block1", "block2", "block3", "concat"):
        assert titles[name][1:] == ["fox 10%", "predicted: cat 60%"], titles[name]
    plain = explained([0.05, 0.1, 0.6, 0.1, 0.05, 0.1])  # no target asked: the prediction, once
    assert explain_lib._titles(plain, plain.maps["gradcam"], names, methods.PMG)["block2"][1:] == ["cat 60%"]


def test_a_class_target_reaches_the_titles_through_explain(tmp_path):
    """explain(target='class') on a converted tiny model: each result's maps explain the class asked for, and
    the panels say so (and name the prediction) when it is not the predicted one."""
    import torch
    from test_parity import torch_pmg

    from pmg_jax import state
    from pmg_jax.cli import convert

    src, run = str(tmp_path / "model.pth"), str(tmp_path / "run")
    torch.save(torch_pmg("resnet50", 8, (1, 1, 1, 1), 16, 8, seed=2, size=64).state_dict(), src)
    convert.main([src, "--out", run, "--dataset", "demo"])
    restored = state.restore(run)
    _, items = explain_lib.from_split(restored.config, "test", 2)
    options = cam.CamOptions(target="class")
    results = explain_lib.explain(restored, items, options=options, class_id=5, batch_size=2, out_dir=str(tmp_path))
    names, other = restored.class_names, 0
    for result in results:
        titles = explain_lib._titles(result, result.maps["gradcam"], names, methods.PMG)
        for name, head in (("block1", "head1"), ("block2", "head2"), ("block3", "head3"), ("concat", "concat")):
            predicted = int(np.argmax(result.probabilities[head]))
            assert titles[name][1].startswith(f"{names[5]} "), titles[name]
            if predicted != 5:
                other += 1
                assert titles[name][-1].startswith(f"predicted: {names[predicted]} "), titles[name]
            else:
                assert not any(line.startswith("predicted") for line in titles[name]), titles[name]
    assert other > 0  # some panel explains a class that is not its head's prediction


def test_figure_text_is_at_least_12_px_and_wrapped_not_cut():
    """Capitals 12 px tall at the saved size whatever the text's length; a long file name or contrast line goes
    on over more lines, every character kept."""
    text = "TEST_00000_RED_DISC_WING_PATCH.PNG vs RED-WINGED BLACKBIRD, YELLOW-HEADED BLACKBIRD"
    lines = viz.wrap(text, 120)
    assert len(lines) > 3 and "".join(lines).replace(" ", "") == text.replace(" ", "")
    tile = np.zeros((64, 128, 3), np.uint8)
    g = viz.grid([(tile, [text, "HELD 93%"]), (tile, ["BLOCK1"])], height=64)
    for left, right in ((0, 128), (132, 260)):
        dark = (g[: g.shape[0] - 64, left:right].min(axis=2) < 128).any(axis=1)  # the panel's title band, by row
        edges = np.diff(np.concatenate([[0], dark.astype(int), [0]]))
        heights = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)  # one run of dark rows per text line
        assert len(heights) == (len(lines) + 1 if left == 0 else 1) and heights.min() >= 12, heights
