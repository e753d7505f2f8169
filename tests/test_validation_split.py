"""An honest number: a stratified, seeded validation share of the training split picks the best checkpoint, and
the run reports that checkpoint's test accuracy, not the best test accuracy over epochs."""

import json

import numpy as np
import pytest
from conftest import tiny_demo_config

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import loop, validate
from pmg_jax.data import sources

SMALL = {
    "dataset.demo_train_size": 160,
    "dataset.demo_test_size": 32,
    "dataset.demo_image_size": 40,
    "data.resize_size": 40,
    "data.crop_size": 32,
    "model.width": 8,
    "model.feature_size": 16,
    "batch_size": 8,
    "eval_batch_size": 16,
    "num_epochs": 4,
    "log_every_steps": 5,
}


def test_validation_share_is_disjoint_stratified_and_seeded():
    config = tiny_demo_config(**{**SMALL, "dataset.val_fraction": 0.1})
    train, val = sources.make_source(config, "train"), sources.make_source(config, "val")
    whole = sources.source_labels(sources.make_source(tiny_demo_config(**SMALL), "train"))
    assert not set(train.indices) & set(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(len(whole)))
    for c in range(config.dataset.num_classes):  # 20 per class: 2 held out from each
        assert np.sum(whole[val.indices] == c) == round(0.1 * np.sum(whole == c))
    assert all(train[i]["label"] == whole[train.indices[i]] for i in range(0, len(train), 7))
    other = tiny_demo_config(**{**SMALL, "dataset.val_fraction": 0.1, "dataset.val_seed": 1})
    assert not np.array_equal(sources.make_source(other, "val").indices, val.indices)
    with pytest.raises(validate.ConfigError, match="val_fraction is 0"):
        sources.make_source(tiny_demo_config(**SMALL), "val")
    with pytest.raises(validate.ConfigError, match=r"config.dataset.val_fraction=1.0 must be in \[0, 1\)"):
        validate.check(tiny_demo_config(**{"dataset.val_fraction": 1.0}), 1)


@pytest.mark.slow
def test_best_is_chosen_on_val_and_its_test_accuracy_is_reported(tmp_path):
    config = tiny_demo_config(**{**SMALL, "dataset.val_fraction": 0.25})
    best = loop.train_and_evaluate(config, str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    val = {line["step"]: line for line in lines if line["split"] == "val"}
    test = {line["step"]: line for line in lines if line["split"] == "test"}
    assert len(val) == len(test) == config.num_epochs and all(v["count"] == 40 for v in val.values())
    top = max(v["combined"] for v in val.values())
    step = max(s for s, v in val.items() if v["combined"] == top)  # a tie goes to the later checkpoint
    assert (best["step"], best["combined"], best["split"]) == (step, top, "val")
    assert best["test_combined"] == test[step]["combined"]  # that checkpoint's test figure, not the best one
    assert ckpt_lib.resolve(str(tmp_path), "best")[1] == step
    # read back: the best checkpoint evaluated on the test split gives the reported figure
    again = loop.evaluate_only(
        tiny_demo_config(
            **{**SMALL, "dataset.val_fraction": 0.25, "init.which": "best", "init.checkpoint": str(tmp_path)}
        ),
        str(tmp_path),
    )
    assert again["combined"] == best["test_combined"] and again["count"] == 32
