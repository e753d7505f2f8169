"""The best checkpoint (highest combined accuracy) outlives the latest-N retention and restores bit for bit."""

import logging
import os

import jax
import numpy as np
import pytest
from conftest import tiny_demo_config

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import loop
from pmg_jax import state as state_lib
from pmg_jax import steps as steps_lib
from pmg_jax.cli import common

# every test reads the module's run trained through the loop: on one worker, so that it is trained once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("best_checkpoint")]

# combined accuracy per epoch: up, down, up again but not as high, then a tie with the best
SCRIPTED = (30.0, 60.0, 40.0, 50.0, 60.0, 20.0)
BEST_EPOCH = 5  # 60.0 first at epoch 2, again at epoch 5: a tie goes to the later checkpoint


def _scripted_evaluate(saved_params: dict):
    """steps.evaluate replaced: the real eval counts, with combined taken from SCRIPTED in turn."""
    real = steps_lib.evaluate
    calls = []

    def evaluate(p_eval, state, batches, sharding, *names):
        result = real(p_eval, state, batches, sharding, *names)
        result["combined"] = SCRIPTED[len(calls)]
        calls.append(int(state.step))
        saved_params[int(state.step)] = jax.tree.map(np.asarray, jax.device_get(state.params))
        return result

    return evaluate


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """A tiny run with keep=1 whose eval accuracy goes up, down, up, ties and falls."""
    workdir = str(tmp_path_factory.mktemp("best_run"))
    config = tiny_demo_config(
        **{
            "dataset.demo_train_size": 32,
            "dataset.demo_test_size": 8,
            "model.width": 8,
            "model.feature_size": 16,
            "data.crop_size": 32,
            "data.resize_size": 40,
            "dataset.demo_image_size": 40,
            "batch_size": 8,
            "eval_batch_size": 8,
            "num_epochs": len(SCRIPTED),
            "checkpoint.keep": 1,
        }
    )
    params: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps_lib, "evaluate", _scripted_evaluate(params))
        best = loop.train_and_evaluate(config, workdir)
    return workdir, config, best, params


def test_best_is_kept_beside_the_latest_and_restored_exactly(scripted_run):
    workdir, config, best, params = scripted_run
    steps_per_epoch = config.dataset.demo_train_size // config.batch_size
    best_step, last_step = BEST_EPOCH * steps_per_epoch, len(SCRIPTED) * steps_per_epoch
    assert best["epoch"] == BEST_EPOCH and best["combined"] == 60.0
    kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert kept == [best_step, last_step]
    restored = state_lib.restore(workdir, "best")
    assert restored.step == best_step
    want = jax.tree_util.tree_leaves_with_path(params[best_step])
    got = dict(jax.tree_util.tree_leaves_with_path(restored.variables["params"]))
    assert len(want) == len(got)
    for path, value in want:
        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=jax.tree_util.keystr(path))
    assert state_lib.restore(workdir, "latest").step == last_step
    assert ckpt_lib.resolve(workdir, "best") == (workdir, best_step)


def test_the_best_checkpoint_of_a_finished_run_is_not_called_unfinished(scripted_run, capsys):
    """Epoch 5 of 6 is the best; the run itself went to its last epoch, so no warning (the latest's is the same)."""
    workdir, config, _, _ = scripted_run
    for which in ("best", "latest"):
        restored = common.restore_and_report(workdir, which, "prog")
        printed = capsys.readouterr()
        assert "unfinished" not in printed.err, (which, printed.err)
    assert restored.meta["epoch"] == len(SCRIPTED) and "epoch 6 of 6" in printed.out


def test_reading_a_run_brings_no_orbax_warnings(scripted_run, caplog):
    """Finding, listing and restoring checkpoints (as a re-run and every command do) opens orbax managers for
    reading: they warn of nothing (orbax's 'Given directory is read only' and its read-only option changes)."""
    workdir = scripted_run[0]
    with caplog.at_level(logging.INFO):
        assert ckpt_lib.has_checkpoint(os.path.join(workdir, "checkpoints"))
        state_lib.restore(workdir, "best")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [], warned
