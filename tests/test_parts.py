"""Part attribution against a brute-force reading of its definitions, on hand-made maps and parts."""

import math
import subprocess
import sys

import numpy as np
import pytest

from pmg_jax import parts

SIDE = 100  # radius 0.1 -> r = 10 px


def brute_owner(x: float, y: float, pts, r: float) -> int:
    """The part a point belongs to, by the definition: nearest visible part within r, the first of equals."""
    best, owner = None, -1
    for p, (px, py, visible) in enumerate(pts):
        d = math.hypot(x - px, y - py)
        if visible and d <= r and (best is None or d < best):
            best, owner = d, p
    return owner


def brute_peak(m: np.ndarray):
    """(row, col) of the maximum nearest the maxima's centroid, scanning rows then columns, or None."""
    top = max(m.ravel())
    if top <= 0:
        return None
    maxima = [(i, j) for i in range(m.shape[0]) for j in range(m.shape[1]) if m[i, j] >= top - parts.TIE_TOL]
    ci, cj = sum(i for i, _ in maxima) / len(maxima), sum(j for _, j in maxima) / len(maxima)
    best = None
    for i, j in maxima:
        d = (i - ci) ** 2 + (j - cj) ** 2
        if best is None or d < best[0]:
            best = (d, (i, j))
    return best[1]


def brute_attribute(m: np.ndarray, pts, r: float):
    """(peak part, energy shares with background last) of one map."""
    h, w = m.shape
    mass = [0.0] * (len(pts) + 1)
    for i in range(h):
        for j in range(w):
            mass[brute_owner(j + 0.5, i + 0.5, pts, r)] += float(m[i, j])  # -1 is the last: background
    total = sum(mass)
    energy = [v / total for v in mass] if total > 0 else [0.0] * len(pts) + [1.0]
    pixel = brute_peak(m)
    return (-1 if pixel is None else brute_owner(pixel[1] + 0.5, pixel[0] + 0.5, pts, r)), energy


def one(m: np.ndarray, pts) -> parts.Attribution:
    return parts.attribute({"m": np.asarray(m, np.float32)[None]}, np.asarray(pts, np.float32)[None])["m"]


def spike(row: int, col: int, size: int = SIDE) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[row, col] = 1.0
    return m


def test_random_maps_with_ties_agree_with_brute_force():
    rng = np.random.default_rng(0)
    size = 24
    r = 0.2 * size
    for trial in range(12):
        m = np.round(rng.random((size, size)) * 3) / 3  # few levels: many equal maxima
        if trial % 4 == 0:
            m[:] = 0  # no peak, no mass
        pts = np.column_stack([rng.uniform(-2, size + 2, (6, 2)), rng.random(6) > 0.3])
        pts[1, :2] = pts[0, :2] + [1.0, 0.0]  # close parts: discs overlap
        got = parts.attribute({"m": m[None]}, pts[None], radius=0.2)["m"]
        want_peak, want_energy = brute_attribute(m, pts, r)
        assert got.peak[0] == want_peak, trial
        np.testing.assert_allclose(got.energy[0], want_energy, atol=1e-12, err_msg=str(trial))
        np.testing.assert_array_equal(got.visible[0], pts[:, 2] > 0)


def test_a_peak_on_a_part_counts_there():
    pts = [[20.5, 30.5, 1], [70.5, 70.5, 1], [50.5, 10.5, 1]]
    for p, (x, y, _) in enumerate(pts):
        assert one(spike(int(y), int(x)), pts).peak[0] == p
        assert one(spike(int(y) + 5, int(x) - 4), pts).peak[0] == p  # still within r = 10
    assert one(spike(90, 10), pts).peak[0] == -1


def test_the_radius_edge_counts():
    """A 6-8-10 triangle: the pixel centre (10.5, 10.5) is exactly r = 10 from (16.5, 18.5)."""
    assert parts.radius_px((SIDE, SIDE)) == 10.0
    assert one(spike(10, 10), [[16.5, 18.5, 1]]).peak[0] == 0
    assert one(spike(10, 10), [[16.5, 18.5 + 1e-4, 1]]).peak[0] == -1
    m = np.ones((SIDE, SIDE))
    inside = sum(math.hypot(j + 0.5 - 50.5, i + 0.5 - 50.5) <= 10 for i in range(SIDE) for j in range(SIDE))
    np.testing.assert_allclose(one(m, [[50.5, 50.5, 1]]).energy[0], [inside / SIDE**2, 1 - inside / SIDE**2])


def test_ties_between_maxima_and_between_parts():
    m = np.zeros((SIDE, SIDE))
    m[40:43, 60:63] = 1.0  # a plateau peaks at its middle
    assert one(m, [[61.5, 41.5 + 10, 1]]).peak[0] == 0 and one(m, [[61.5, 41.5 + 10.5, 1]]).peak[0] == -1
    m = np.zeros((SIDE, SIDE))
    m[5, [0, 40, 50]] = 1.0  # centroid column 30: the maximum at column 40
    assert one(m, [[40.5, 5.5, 1]]).peak[0] == 0 and one(m, [[0.5, 5.5, 1], [52.5, 5.5, 1]]).peak[0] == -1
    m = np.zeros((SIDE, SIDE))
    m[5, [20, 40]] = 1.0  # both 10 columns from the centroid: the first in row-major order
    assert one(m, [[20.5, 5.5, 1], [40.5, 5.5, 1]]).peak[0] == 0
    m[5, 20] = 1.0 - parts.TIE_TOL / 2  # still a tie
    assert one(m, [[20.5, 5.5, 1], [40.5, 5.5, 1]]).peak[0] == 0
    m[5, 20] = 1.0 - 2 * parts.TIE_TOL  # no longer a tie
    assert one(m, [[20.5, 5.5, 1], [40.5, 5.5, 1]]).peak[0] == 1
    two = [[50.5, 44.5, 1], [50.5, 56.5, 1]]  # 6 px either side of the peak: the part listed first
    assert one(spike(50, 50), two).peak[0] == 0
    assert one(spike(50, 50), two[::-1]).peak[0] == 0
    shares = one(np.ones((SIDE, SIDE)), two).energy[0]  # the row between them goes to the first
    row = sum(math.hypot(j + 0.5 - 50.5, 6) <= 10 for j in range(SIDE))
    assert shares[0] - shares[1] == pytest.approx(row / SIDE**2)


def test_invisible_parts_are_skipped_and_not_counted():
    pts = [[50.5, 50.5, 0], [55.5, 50.5, 1]]
    a = one(spike(50, 50), pts)
    assert a.peak[0] == 1 and a.energy[0][0] == 0
    b = one(spike(50, 50), [[50.5, 50.5, 0]])
    assert b.peak[0] == -1 and b.energy[0].tolist() == [0.0, 1.0]


def test_energy_shares_sum_to_one_and_a_dead_map_is_background():
    rng = np.random.default_rng(1)
    maps = rng.random((5, 40, 40)) ** 4
    pts = np.column_stack([rng.uniform(0, 40, (5 * 4, 2)), rng.random(20) > 0.2]).reshape(5, 4, 3)
    a = parts.attribute({"m": maps}, pts)["m"]
    np.testing.assert_allclose(a.energy.sum(axis=1), 1.0)
    dead = parts.attribute({"m": np.zeros((1, 40, 40))}, pts[:1])["m"]
    assert dead.peak[0] == -1 and dead.energy[0].tolist() == [0, 0, 0, 0, 1]


def test_tables_count_over_the_images_that_show_each_part():
    pts = np.array(
        [
            [[20.5, 20.5, 1], [80.5, 80.5, 1]],
            [[20.5, 20.5, 1], [80.5, 80.5, 0]],
            [[20.5, 20.5, 0], [80.5, 80.5, 1]],
            [[20.5, 20.5, 1], [80.5, 80.5, 1]],
        ],
        np.float32,
    )
    maps = np.stack([spike(20, 20), spike(20, 20), spike(80, 80), spike(2, 97)])
    attributions = parts.attribute({"block1": maps, "block2": maps[::-1]}, pts)
    baseline = parts.uniform_baseline(pts, (SIDE, SIDE))
    report = parts.tables(
        attributions, baseline, ["head", "tail"], labels=np.array([0, 1, 0, 1]), class_names=["A", "B"]
    )
    # block1: peaks head, head, tail, background; head shown by images 0, 1, 3; tail by 0, 2, 3.
    assert report["peak"]["block1"] == {"head": 2 / 3, "tail": 1 / 3, "background": 1 / 4}
    assert report["visible"] == {"head": 3, "tail": 3} and report["count"] == 4
    # block2 sees the maps reversed: spike(2, 97) on image 0, tail on 1 (hidden there), head on 2 (hidden), head on 3.
    assert report["peak"]["block2"] == {"head": 1 / 3, "tail": 0.0, "background": 3 / 4}
    spike_energy = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]  # all mass on one pixel
    assert report["energy"]["block1"]["head"] == pytest.approx(np.mean([spike_energy[i][0] for i in (0, 1, 3)]))
    assert report["energy"]["block1"]["background"] == pytest.approx(1 / 4)
    assert report["baseline"]["peak"] == {"head": 0.0, "tail": 0.0, "background": 1.0}  # the centre: no part
    disc = sum(math.hypot(j + 0.5 - 20.5, i + 0.5 - 20.5) <= 10 for i in range(SIDE) for j in range(SIDE)) / SIDE**2
    assert report["baseline"]["energy"]["head"] == pytest.approx(disc)
    a, b = report["per_class"]["A"], report["per_class"]["B"]
    assert a["count"] == b["count"] == 2
    assert a["peak"]["block1"] == {"head": 1.0, "tail": 0.5, "background": 0.0}
    assert b["visible"] == {"head": 2, "tail": 1}
    assert b["peak"]["block1"] == {"head": 0.5, "tail": 0.0, "background": 0.5}


def test_a_part_nobody_shows_is_undefined_and_the_text_says_so():
    pts = np.array([[[20.5, 20.5, 1], [80.5, 80.5, 0]]], np.float32)
    attributions = parts.attribute({"block3": spike(20, 20)[None]}, pts)
    report = parts.tables(attributions, parts.uniform_baseline(pts, (SIDE, SIDE)), ["head", "tail"])
    assert np.isnan(report["peak"]["block3"]["tail"]) and np.isnan(report["energy"]["block3"]["tail"])
    text = parts.format_tables(report, " on test")
    lines = text.splitlines()
    assert "images whose CAM peak lands on the part (of those showing it) on test: 1 images" in lines[0]
    assert lines[2].split() == ["block3", "100.0", "-", "0.0"]
    assert lines[3].split() == ["uniform", "map", "0.0", "-", "100.0"]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="parts must be"):
        parts.attribute({"m": np.zeros((2, 8, 8))}, np.zeros((3, 1, 3)))
    with pytest.raises(ValueError, match="one shape"):
        parts.attribute({"a": np.zeros((2, 8, 8)), "b": np.zeros((2, 9, 9))}, np.zeros((2, 1, 3)))


def test_no_jax_needed():
    code = "import sys, pmg_jax.parts; assert not any(m.split('.')[0] in ('jax', 'flax') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
