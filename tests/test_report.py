"""report.html from small hand-made tables, and the ranking of images by how much their blocks disagree."""

import html.parser
import itertools
import math

import numpy as np
import pytest

from pmg_jax import report


class Page(html.parser.HTMLParser):
    """The table cells (text by table), the SVG bars (map, part, height) and the images of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.bars, self.images, self._map, self._cell = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "svg":
            self._map = a["data-map"]
        elif tag == "rect":
            self.bars.append((self._map, a["data-part"], float(a["height"]), float(a["y"])))
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


LOCALIZATION = {
    "count": 3,
    "centre_pointing": 1 / 3,
    "results": {
        "gradcam": {
            "block1": {"MaxBoxAcc": 0.5, "Pointing": 0.25, "Deletion": 0.123456, "Insertion": float("nan")},
            "concat": {"MaxBoxAcc": 0.875, "Pointing": 1.0, "Deletion": 0.5, "Insertion": 0.75},
        }
    },
}
PARTS = {
    "radius": 0.1,
    "parts": ["beak", "left <eye>"],
    "count": 4,
    "visible": {"beak": 4, "left <eye>": 0},
    "peak": {
        "block1": {"beak": 0.75, "left <eye>": float("nan"), "background": 0.25},
        "block2": {"beak": 0.125, "left <eye>": float("nan"), "background": 0.5},
    },
    "energy": {
        "block1": {"beak": 0.4, "left <eye>": float("nan"), "background": 0.6},
        "block2": {"beak": 0.2, "left <eye>": float("nan"), "background": 0.8},
    },
    "baseline": {
        "peak": {"beak": 0.0, "left <eye>": float("nan"), "background": 1.0},
        "energy": {"beak": 0.03, "left <eye>": float("nan"), "background": 0.97},
    },
}


def test_report_holds_the_tables_bars_and_grids(tmp_path):
    grid = tmp_path / "grids" / "bird_1.jpg"
    grid.parent.mkdir()
    grid.write_bytes(b"")
    per_class = {
        "per_class": {"Crested Auklet": {k: PARTS[k] for k in ("count", "visible", "peak", "energy", "baseline")}}
    }
    path = report.write_report(
        str(tmp_path / "out" / "report.html"),
        LOCALIZATION,
        {**PARTS, **per_class},
        [(str(grid), "bird_1 <block1 vs block3>")],
    )
    text = open(path, encoding="utf-8").read()
    page = Page()
    page.feed(text)
    loc, peak, energy = page.tables[:3]
    assert loc[:5] == ["map", "MaxBoxAcc", "Pointing", "Deletion", "Insertion"]
    assert loc[5:] == ["block1", "50.0", "25.0", "0.123", "-", "concat", "87.5", "100.0", "0.500", "0.750"]
    assert "pointing game of a centre guess 33.3%" in text
    assert peak == [
        "map",
        "beak",
        "left <eye>",
        "background",
        "block1",
        "75.0",
        "-",
        "25.0",
        "block2",
        "12.5",
        "-",
        "50.0",
        "uniform map",
        "0.0",
        "-",
        "100.0",
    ]
    assert energy[4:8] == ["block1", "40.0", "-", "60.0"] and energy[-4:] == ["uniform map", "3.0", "-", "97.0"]
    assert len(page.tables) == 5 and "Crested Auklet (4 images)" in text  # the class's two tables
    bars = {(m, p): (h, y) for m, p, h, y in page.bars}
    assert set(bars) == {(m, p) for m in ("block1", "block2") for p in ("beak", "background")}  # NaN: no bar
    for m, values in PARTS["peak"].items():
        for p in ("beak", "background"):
            height, y = bars[(m, p)]
            assert height == pytest.approx(values[p] * report.CHART_HEIGHT, abs=1e-3)
            assert y + height == pytest.approx(bars[("block1", "beak")][0] + bars[("block1", "beak")][1])  # one base
    assert page.images == ["../grids/bird_1.jpg"]
    assert "bird_1 &lt;block1 vs block3&gt;" in text and "left &lt;eye&gt;" in text
    assert "<eye>" not in text and "<block1" not in text  # names and captions are escaped
    assert "<script" not in text


def test_sections_are_optional(tmp_path):
    path = report.write_report(str(tmp_path / "report.html"), parts=PARTS)
    page = Page()
    page.feed(open(path).read())
    assert len(page.tables) == 2 and page.images == [] and len(page.bars) == 4


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Plain-loop Pearson correlation, 0 when either side is constant."""
    a, b = a.ravel().tolist(), b.ravel().tolist()
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def test_disagreement_is_one_minus_the_mean_pairwise_correlation():
    rng = np.random.default_rng(0)
    maps = {name: rng.random((5, 9, 7)) for name in report.BLOCKS}
    maps["block2"][1] = maps["block1"][1]
    maps["block3"][1] = maps["block1"][1]  # image 1: all agree
    maps["block3"][2] = 0.0  # image 2: a dead block
    got = report.disagreement(maps)
    for i in range(5):
        pairs = [pearson(maps[a][i], maps[b][i]) for a, b in itertools.combinations(report.BLOCKS, 2)]
        assert got[i] == pytest.approx(1 - sum(pairs) / 3, abs=1e-12)
    assert got[1] == pytest.approx(0.0, abs=1e-12)
    opposite = {"block1": maps["block1"][:1], "block2": 1 - maps["block1"][:1]}
    assert report.disagreement(opposite, ("block1", "block2"))[0] == pytest.approx(2.0)


def test_most_disagreeing_ranks_highest_first():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert report.most_disagreeing(scores, 3).tolist() == [1, 3, 2]
    assert report.most_disagreeing(scores, 10).tolist() == [1, 3, 2, 0, 4]
    with pytest.raises(ValueError, match="two maps"):
        report.disagreement({"block1": np.zeros((1, 2, 2))}, ("block1",))
