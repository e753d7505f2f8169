"""explain.py --evaluate with part annotations (CUB's parts/, the demo's wing patch), report.html, Finer-CAM flags."""

import json
import os

import numpy as np
import pytest
import torch
from test_part_annotations import CUB_PARTS, write_parts
from test_report import Page
from test_sources import CLASSES, write_cub, write_lines

from bench.parity import torch_pmg
from pmg_jax import cam, methods, parts, state
from pmg_jax import explain as explain_lib
from pmg_jax.cli import convert as convert_cli
from pmg_jax.cli import explain
from pmg_jax.data import sources

WING = "wing patch"


def evaluate_demo(workdir: str, out, *flags: str) -> dict:
    """explain.py --evaluate on the demo run's test split, in this process; returns the JSON it saved."""
    rc = explain.main(["--evaluate", "--ckpt", workdir, "--auc-steps", "0", "--out", str(out), *flags])
    assert rc == 0
    return json.loads((out / "localization_test.json").read_text())


def report_page(path) -> tuple[str, Page]:
    """The report's text, and its tables, bars and images."""
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


@pytest.mark.slow
def test_cub_miniature_with_parts_end_to_end(tmp_path, capsys):
    """A reference-format PMG converted for CUB, evaluated on a CUB-layout miniature that has parts/ files."""
    data_dir = write_cub(str(tmp_path / "data"))
    write_parts(data_dir)
    names = [*CLASSES, *(f"Filler bird {c}" for c in range(len(CLASSES), 200))]  # CUB's 200 classes, 3 with images
    write_lines(
        os.path.join(data_dir, "CUB_200_2011", "classes.txt"),
        (f"{c + 1} {c + 1:03d}.{n.replace(' ', '_')}" for c, n in enumerate(names)),
    )
    src, run, out = str(tmp_path / "model.pth"), str(tmp_path / "run"), tmp_path / "out"
    torch.save(torch_pmg("resnet50", 8, (1, 1, 1, 1), 16, 200, seed=2, size=64).state_dict(), src)
    convert_cli.main([src, "--out", run, "--dataset", "cub", "--data-dir", data_dir])
    assert (
        explain.main(["--evaluate", "--ckpt", run, "--auc-steps", "0", "--report-images", "2", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "MaxBoxAccV2" in printed and "images whose CAM peak lands on the part" in printed
    assert all(name in printed for name in CUB_PARTS)
    saved = json.loads((out / "localization_test.json").read_text())
    assert saved["count"] == 6 and set(saved["results"]["gradcam"]) == {"block1", "block2", "block3", "concat"}
    tables = saved["parts"]["gradcam"]
    assert tables["parts"] == list(CUB_PARTS) and tables["count"] == 6
    assert set(tables["peak"]) == {"block1", "block2", "block3", "concat"}
    # the miniature's test images are of the first 3 classes (named as in classes.txt)
    assert set(tables["per_class"]) == {n.replace(" ", "_") for n in CLASSES}
    text, page = report_page(out / "report.html")
    assert all(name in text for name in CUB_PARTS) and "<h2>Localisation</h2>" in text
    assert len(page.images) == 2 == len(saved["disagreeing"]["gradcam"])
    assert all(os.path.isfile(out / src) for src in page.images) and page.images[0].startswith("report_images/")


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")
def test_demo_blocks_peak_on_the_wing_patch(demo_run, tmp_path):
    """The demo's classes differ only by the wing patch: a block's peaks land on it far more often than a
    uniform map's (which peaks at the centre), over the first 64 test images (--max-images keeps the parts)."""
    workdir, _, _ = demo_run
    saved = evaluate_demo(workdir, tmp_path, "--max-images", "64", "--report-images", "3")
    tables = saved["parts"]["gradcam"]
    print(parts.format_tables(tables))
    assert tables["parts"] == [WING] and tables["count"] == 64
    shown = tables["visible"][WING]
    assert shown >= 48  # the centre crop keeps the patch in most images
    chance = tables["baseline"]["peak"][WING]
    best = max(tables["peak"][b][WING] for b in cam.BLOCKS)
    # Measured on this fixture: block1's peaks on the patch in 43.8% of the images, the uniform map's in 9.4%
    # (where the patch lies near the centre), and 12.3% of block1's energy on it against 3.1%.
    assert best >= max(3 * chance, chance + 0.2), (best, chance)
    energy = max(tables["energy"][b][WING] for b in cam.BLOCKS)
    assert energy >= 2 * tables["baseline"]["energy"][WING], energy
    text, page = report_page(tmp_path / "report.html")
    assert WING in text and "<h2>Localisation</h2>" in text and "<h2>Parts</h2>" in text
    assert {m for m, _, _, _ in page.bars} >= set(cam.BLOCKS)  # a bar chart per map
    scores = [entry["disagreement"] for entry in saved["disagreeing"]["gradcam"]]
    assert len(page.images) == 3 and scores == sorted(scores, reverse=True)


class Dropped:
    """A source with some record keys (and, for 'parts', the part names) taken away."""

    def __init__(self, source, drop: tuple[str, ...]):
        self.source, self.drop = source, drop
        self.class_names = source.class_names
        self.part_names = () if "parts" in drop else source.part_names

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        return {k: v for k, v in self.source[index].items() if k not in self.drop}


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")
@pytest.mark.parametrize("drop", [("box",), ("parts",), ("box", "parts")])
def test_splits_with_boxes_or_parts_or_neither(demo_run, tmp_path, monkeypatch, capsys, drop):
    workdir, _, _ = demo_run
    real = sources.make_source
    monkeypatch.setattr(sources, "make_source", lambda *args: Dropped(real(*args), drop))
    if drop == ("box", "parts"):
        assert explain.main(["--evaluate", "--ckpt", workdir, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "explain.py: split 'test' of demo has no boxes or part annotations to evaluate against"
        assert not os.path.exists(tmp_path / "report.html")
        return
    saved = evaluate_demo(workdir, tmp_path, "--report-images", "2", "--per-class")
    printed = capsys.readouterr().out
    text, page = report_page(tmp_path / "report.html")
    assert len(page.images) == 2
    if drop == ("box",):
        assert "has no boxes: no localisation tables, only the part tables" in printed
        assert saved["results"] is None and saved["parts"]["gradcam"]["count"] == 16
        per_class = saved["parts"]["gradcam"]["per_class"]
        assert sum(t["count"] for t in per_class.values()) == 16
        assert all(f", class {name}: {t['count']} images" in printed for name, t in per_class.items())
        assert "<h2>Localisation</h2>" not in text and "<h2>Parts</h2>" in text
    else:
        assert "MaxBoxAccV2" in printed and "CAM peak" not in printed
        assert saved["parts"] is None and saved["count"] == 16
        assert "<h2>Localisation</h2>" in text and "<h2>Parts</h2>" not in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "finer", "--method", "eigencam"], "eigencam has no target class"),
        (["--target", "finer", "--finer-k", "0"], "--finer-k must be a positive"),
        (["--target", "finer", "--finer-alpha", "nan"], "--finer-alpha must be a finite"),
        (["--finer-k", "2"], "--finer-k needs --target finer"),
        (["--evaluate", "--finer-alpha", "0.5"], "--finer-alpha needs --target finer"),
        (["--evaluate", "--report-images", "-1"], "--report-images must be 0 or more"),
    ],
)
def test_bad_finer_and_report_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        explain.parse_args(["--ckpt", "runs/x", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_finer_flags_parse():
    args = explain.parse_args(["--ckpt", "r", "--target", "finer", "--finer-k", "2", "--finer-alpha", "0.5"])
    assert (args.target, args.options.finer_k, args.options.finer_alpha) == ("finer", 2, 0.5)
    args = explain.parse_args(["--ckpt", "r", "--evaluate", "--target", "finer"])
    assert (args.options.finer_k, args.options.finer_alpha) == (cam.FINER_K, cam.FINER_ALPHA)
    assert explain.parse_args(["--ckpt", "r"]).report_images == 8


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")
def test_finer_maps_contrast_each_heads_prediction(demo_run, tmp_path):
    """--target finer explains each head's own prediction against its nearest classes: maps unlike the plain
    predicted target's, contrasts that are the next most probable classes, and grids that name them."""
    workdir, config, _ = demo_run
    restored = state.restore(workdir)
    _, items = explain_lib.from_split(config, "test", 4)
    items = list(items)
    finer_options = cam.CamOptions(target="finer", finer_k=2)
    finer = explain_lib.explain(restored, items, options=finer_options, batch_size=4, out_dir=str(tmp_path))
    plain = explain_lib.explain(restored, items, options=cam.CamOptions(target="predicted"), batch_size=4)
    names = restored.class_names
    differ = 0
    for f, p in zip(finer, plain, strict=True):
        for head, probabilities in f.probabilities.items():  # nearest logits to the top one: the runners-up
            assert f.contrasts[head] == tuple(np.argsort(-probabilities, kind="stable")[1:3]), head
        for name in cam.BLOCKS:
            differ += float(np.abs(f.maps["gradcam"][name] - p.maps["gradcam"][name]).max()) > 0.1
        assert os.path.isfile(f.grids["gradcam"])
        titles = explain_lib._titles(f, f.maps["gradcam"], names, methods.PMG)
        assert titles["block2"][2] == "vs " + ", ".join(names[c] for c in f.contrasts["head2"])
    print(f"{differ} of 12 maps differ by more than 0.1 somewhere")
    assert differ >= 4, differ  # of 4 images x 3 blocks
