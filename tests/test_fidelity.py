"""bench.fidelity: pmg_jax and the reference's PyTorch loop trained on the same files, compared over seeds."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

from bench import fidelity
from pmg_jax.data import synthetic


@pytest.mark.slow  # trains a tiny model on both sides
def test_tiny_run_trains_both_sides_on_the_same_files(tmp_path):
    out = tmp_path / "fidelity"
    cmd = [sys.executable, "-m", "bench.fidelity", "--tiny", "--seeds", "0", "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its train.py and reference children too
        raise
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.load(open(out / "summary.json"))
    tiny = fidelity.TINY
    # Both read OUT/data: the same images and the same class folders.
    expected = {
        "train": tiny["dataset.demo_train_size"],
        "test": tiny["dataset.demo_test_size"],
        "classes": sorted(synthetic.class_names(8)),
    }
    assert summary["data"] == {"pmg_jax": [expected], "reference": [expected]}
    assert len(os.listdir(out / "data" / "train")) == 8
    for curve in fidelity.CURVES:
        for side in fidelity.SIDES:
            assert len(summary["curves"][curve][side]["mean"]) == tiny["num_epochs"]
    assert (out / "fidelity.png").stat().st_size > 10_000
    assert json.loads(stdout.strip().splitlines()[-1])["within_spread"] in (True, False)


def _runs(values: dict[str, list[list[float]]]) -> dict[str, list[dict]]:
    """Runs whose every curve is the given per-seed, per-epoch values."""
    return {side: [{"curves": dict.fromkeys(fidelity.CURVES, v)} for v in seeds] for side, seeds in values.items()}


def test_summary_compares_final_means_with_the_spread_and_names_epochs_outside_the_other_band():
    runs = _runs(
        {
            "pmg_jax": [[10.0, 50.0, 80.0], [12.0, 60.0, 84.0]],  # final 82 +- 2
            "reference": [[10.0, 30.0, 76.0], [12.0, 40.0, 80.0]],  # final 78 +- 2; epoch 2 far below
        }
    )
    s = fidelity.summarize(runs)
    assert s["final_combined"]["pmg_jax"]["mean"] == 82.0 and s["final_combined"]["reference"]["spread"] == 4.0
    assert s["final_combined_difference"] == 4.0 and s["within_spread"] is False  # 4 is not less than 4
    curve = s["curves"]["test_combined"]
    assert curve["pmg_jax"]["min"] == [10.0, 50.0, 80.0] and curve["reference"]["max"] == [12.0, 40.0, 80.0]
    assert curve["epochs_outside_other_band"] == [2, 3]  # epoch 1: each mean inside the other's band
    close = _runs({"pmg_jax": [[70.0], [90.0]], "reference": [[75.0], [80.0]]})
    assert fidelity.summarize(close)["within_spread"] is True
    assert fidelity.summarize(close)["curves"]["test_combined"]["epochs_outside_other_band"] == []
    # One side's wide band holds the other's mean, but its own mean lies outside the other's narrow band.
    one_sided = _runs({"pmg_jax": [[0.0], [100.0]], "reference": [[60.0], [62.0]]})
    assert fidelity.summarize(one_sided)["curves"]["test_combined"]["epochs_outside_other_band"] == [1]


@pytest.mark.slow  # builds both sides' networks
def test_initial_weight_scales_match_the_reference():
    """A whole run starts from each side's own random weights: their scales must agree layer by layer."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax.traverse_util import flatten_dict

    from bench import torch_reference as ref
    from pmg_jax import convert
    from pmg_jax import state as state_lib

    config = fidelity.demo_config({})
    m = config.model
    crop = config.data.crop_size
    model = state_lib.create_model(config, 8)
    ours = flatten_dict(model.init(jax.random.PRNGKey(0), jnp.zeros((1, crop, crop, 3)), train=False)["params"])
    theirs: dict[tuple, list[float]] = {}
    for seed in range(3):
        torch.manual_seed(seed)
        net = ref.PMG(ref.make_resnet("resnet50", m.width, m.stage_sizes), feature_size=m.feature_size, num_classes=8)
        for k, v in flatten_dict(convert.variables_from_torch(net.state_dict())["params"]).items():
            theirs.setdefault(k, []).append(float(np.std(v)))
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        if v.size >= 256:  # smaller tensors' standard deviations vary too much from one draw to the next
            want = np.mean(theirs[k])
            assert abs(float(np.std(v)) - want) <= 0.1 * want, "/".join(k)
