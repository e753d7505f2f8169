"""Shared test setup: repo root importable, and one tiny trained demo run reused by many tests."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def tiny_demo_config(**overrides):
    """configs/demo.py shrunk to train in about a minute on 2 CPU cores (still learns the part)."""
    from configs import demo

    c = demo.get_config()
    c.dataset.demo_train_size = 512
    c.dataset.demo_test_size = 128
    c.num_epochs = 4
    c.log_every_steps = 4
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(workdir, config, best) of a tiny demo training run, made once per test session."""
    from pmg_jax import train_lib

    workdir = str(tmp_path_factory.mktemp("demo_run"))
    config = tiny_demo_config()
    best = train_lib.train_and_evaluate(config, workdir)
    return workdir, config, best
