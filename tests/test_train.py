"""The real training loop on the tiny demo: learns, checkpoints, resumes, evaluates every example once."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_demo_config

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import loop
from pmg_jax import state as state_lib
from pmg_jax import steps as steps_lib

pytestmark = pytest.mark.xdist_group("demo_run")  # share one demo_run fixture (conftest)


@pytest.mark.slow
def test_demo_run_learns_and_checkpoints(demo_run):
    workdir, config, best = demo_run
    chance = 100.0 / config.dataset.num_classes
    assert best["combined"] > 2 * chance, best
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    steps_per_epoch = config.dataset.demo_train_size // config.batch_size
    assert ckpts.latest_step() == steps_per_epoch * config.num_epochs
    state, meta = ckpts.restore()
    assert meta["epoch"] == config.num_epochs and len(meta["class_names"]) == config.dataset.num_classes
    assert ckpts.config()["model"]["width"] == config.model.width
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [l for l in lines if l["kind"] == "eval"]
    assert len(evals) == config.num_epochs and all(e["count"] == config.dataset.demo_test_size for e in evals)
    assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.slow
def test_rerun_resumes_instead_of_restarting(tmp_path, capsys):
    config = tiny_demo_config(num_epochs=2, **{"dataset.demo_train_size": 64, "dataset.demo_test_size": 20})
    config.num_epochs = 1
    loop.train_and_evaluate(config, str(tmp_path))
    config.num_epochs = 2
    capsys.readouterr()
    loop.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 4" in out
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in lines if l["kind"] == "epoch"] == [4, 8]


@pytest.mark.slow
def test_evaluation_counts_every_example_once(demo_run):
    """A test set that does not fill the last batch: padded slots are masked, nothing dropped or repeated."""
    workdir, config, _ = demo_run
    from pmg_jax import parallel
    from pmg_jax.data import pipeline, sources

    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    model = state_lib.create_model(config)
    state, _ = ckpts.restore()
    state = state_lib.TrainState(**state)
    mesh = parallel.make_mesh()
    _, p_eval = steps_lib.compile_steps(model, None, config, mesh)
    src = sources.make_source(config, "test")
    spec = state_lib.transform_spec(config)
    results = {}
    for batch_size in (7, len(src)):
        n, it = pipeline.eval_batches(src, spec, pipeline.host_layout(batch_size))
        results[batch_size] = steps_lib.evaluate(p_eval, state, it, parallel.batch_sharding(mesh))
        assert results[batch_size]["count"] == len(src)
    np.testing.assert_allclose(results[7]["combined"], results[len(src)]["combined"])
