"""CAM quality metrics on constructed maps, and on the tiny trained demo model: its CAMs find the wing patch."""

import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from pmg_jax import cam, methods
from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import localization as loc
from pmg_jax import state as state_lib
from pmg_jax.data import pipeline, sources

pytestmark = pytest.mark.xdist_group("demo_run")  # share one demo_run fixture (conftest)


def box_map(size: int, *boxes, values=None) -> np.ndarray:
    """A map that is `value` inside each half-open box and 0 elsewhere."""
    m = np.zeros((size, size), np.float32)
    for (x0, y0, x1, y1), v in zip(boxes, values or [1.0] * len(boxes)):
        m[y0:y1, x0:x1] = v
    return m


def test_contour_boxes_are_half_open_pixel_boxes():
    m = box_map(32, (2, 3, 10, 7), (20, 20, 30, 31), values=[1.0, 0.5])
    boxes, areas = loc.contour_boxes(m, 0.25)
    order = np.argsort(boxes[:, 0])
    np.testing.assert_array_equal(boxes[order], [[2, 3, 10, 7], [20, 20, 30, 31]])
    assert areas[order][1] > areas[order][0]
    np.testing.assert_array_equal(loc.contour_boxes(m, 0.75)[0], [[2, 3, 10, 7]])
    np.testing.assert_array_equal(loc.contour_boxes(m, 1.0)[0], [[0, 0, 0, 0]])  # nothing above: an empty box


def test_box_iou():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(loc.box_iou(boxes, np.array([0, 0, 10, 10], np.float32)), [1, 1 / 3, 0, 0])


def test_max_box_acc_largest_contour_versus_all_contours():
    gt = np.array([4, 4, 12, 12], np.float32)
    exact = box_map(32, (4, 4, 12, 12))
    wrong = box_map(32, (18, 18, 30, 30))
    # The part is found, but a bigger, weaker blob elsewhere is the largest contour below its level:
    # the largest-contour IoU needs a high threshold, the best match over all contours never misses.
    decoy = box_map(32, (4, 4, 12, 12), (16, 16, 32, 32), values=[1.0, 0.6])
    curves = {name: loc.iou_curves(m, gt) for name, m in [("exact", exact), ("wrong", wrong), ("decoy", decoy)]}
    assert loc.max_box_acc(curves["exact"][0][None]) == 1.0
    assert loc.max_box_acc_v2(curves["exact"][1][None]) == 1.0
    assert loc.max_box_acc(curves["wrong"][0][None]) == 0.0
    assert loc.max_box_acc_v2(curves["wrong"][1][None]) == 0.0
    assert np.all(curves["decoy"][0][:60] < 0.5) and loc.max_box_acc(curves["decoy"][0][None]) == 1.0
    assert np.all(curves["decoy"][1] == 1.0)
    # Over a dataset the best single threshold counts: here two images need different thresholds.
    ious = np.array([[0.6, 0.6, 0.0], [0.0, 0.4, 0.8]])
    assert loc.max_box_acc(ious) == 0.5
    assert loc.max_box_acc_v2(ious) == pytest.approx(np.mean([1.0, 0.5, 0.5]))


def test_pointing_game_and_centre_baseline():
    maps = np.stack([box_map(20, (2, 2, 4, 4)), box_map(20, (15, 10, 16, 11))])
    np.testing.assert_array_equal(loc.peak_points(maps), [[2.5, 2.5], [15.5, 10.5]])
    boxes = np.array([[0, 0, 5, 5], [0, 0, 5, 5]], np.float32)
    np.testing.assert_array_equal(loc.points_in_boxes(loc.peak_points(maps), boxes), [True, False])
    np.testing.assert_array_equal(
        loc.centre_baseline(np.array([[8, 8, 12, 12], [0, 0, 5, 5]], np.float32), (20, 20)), [True, False]
    )


class RegionScorer(nn.Module):
    """Four identical heads whose class-0 logit is 20 x the mean of channel 0 over a fixed square."""

    @nn.compact
    def __call__(self, x, train=False):
        s = 20.0 * jnp.mean(x[:, 4:12, 4:12, 0], axis=(1, 2))
        return (jnp.stack([s, -s], axis=-1),) * 4


def test_deletion_and_insertion_reward_the_right_pixels():
    images = jnp.ones((2, 16, 16, 3))
    blurred = jnp.zeros_like(images)
    right = jnp.asarray(np.stack([box_map(16, (4, 4, 12, 12))] * 2))
    wrong = 1.0 - right
    curves = {
        name: loc.deletion_insertion(
            RegionScorer(),
            {"params": {}, "batch_stats": {}},
            images,
            blurred,
            m,
            jnp.zeros(2, jnp.int32),
            0,
            steps=8,
            method=methods.PMG,
        )
        for name, m in [("right", right), ("wrong", wrong)]
    }
    deletion, insertion = (np.asarray(c) for c in curves["right"])
    assert deletion.shape == insertion.shape == (2, 9)
    assert deletion[0, 0] == pytest.approx(1.0) and insertion[0, 0] == pytest.approx(0.5)
    assert loc.auc(deletion).mean() < loc.auc(np.asarray(curves["wrong"][0])).mean() - 0.3
    assert loc.auc(insertion).mean() > loc.auc(np.asarray(curves["wrong"][1])).mean() + 0.3
    assert loc.auc(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)


@pytest.mark.slow
def test_demo_cams_point_at_the_wing_patch(demo_run):
    """The acceptance: a block's pointing game on the part boxes is well above a centred guess."""
    workdir, config, _ = demo_run
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    state, meta = ckpts.restore()
    model = state_lib.create_model(config, len(meta["class_names"]))
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    source = sources.make_source(config, "test")
    spec = state_lib.transform_spec(config)
    _, batches = pipeline.eval_batches(source, spec, pipeline.host_layout(64), with_box=True)
    report = loc.evaluate(
        model,
        variables,
        batches,
        spec,
        options=cam.CamOptions(("block1", "block2", "block3", "concat"), target="class"),
        auc_steps=0,
    )
    print(loc.format_tables(report))
    results = report["results"]["gradcam"]
    baseline = report["centre_pointing"]
    assert report["count"] == len(source)
    best = max(results[b]["Pointing"] for b in cam.BLOCKS)
    assert best >= max(3 * baseline, baseline + 0.2), (best, baseline)
    for metrics in results.values():
        assert 0.0 <= metrics["MaxBoxAccV2"] <= 1.0 and np.isnan(metrics["Deletion"])
