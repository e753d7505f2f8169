"""Shared test setup: repo root importable, and one tiny trained demo run reused by many tests."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole session, subprocesses included (set before
# jax is imported): the many tiny end-to-end runs compile the same programs, so only the first pays.
# Under pytest-xdist the workers inherit the controller's directory and share it; whoever made
# it removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="pmg_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


WORKERS = 2  # much of the suite is single-threaded XLA compilation


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`python -m pytest` with no paths (the whole suite, or its fast tier `-m "not slow"`) runs on WORKERS xdist
    workers, tests sharing a fixture grouped onto one (xdist_group("demo_run")); given paths, -n or -p no:xdist,
    pytest's own defaults apply.

    A worker parses the controller's command line again, which does not say loadgroup, and would then name its
    tests without their groups, so that the groups were split over the workers and each trained its own copy of
    a shared run: the controller tells it (pytest_configure_node). Nor do workers start workers of their own."""
    if hasattr(config, "workerinput"):
        if config.workerinput.get("pmg_loadgroup"):
            config.option.loadgroup = True
        return
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if (
        config.pluginmanager.hasplugin("xdist")
        and whole_suite
        and config.option.numprocesses is None
        and config.option.dist == "no"
    ):
        config.option.numprocesses = WORKERS
        config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(xdist, in the controller) Whether the workers group their tests by xdist_group."""
    node.workerinput["pmg_loadgroup"] = node.config.option.dist == "loadgroup"


@pytest.fixture(scope="session")
def compile_cache() -> str:
    """The session's persistent compilation cache directory."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


def tiny_demo_config(**overrides):
    """configs/demo.py shrunk to train in about a minute on 2 CPU cores (still learns the part)."""
    from configs import demo

    c = demo.get_config()
    c.dataset.demo_train_size = 512
    c.dataset.demo_test_size = 128
    c.num_epochs = 6
    c.optim.lr_new = c.optim.lr_backbone = 0.02  # few steps: a higher rate than the demo's so that it learns
    c.log_every_steps = 4
    c.log_cams = 0  # the demo's CAM logging costs a compile; tests/test_cam_log.py turns it on where it tests it
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def one_fast(cases, fast) -> list:
    """`cases` for pytest.mark.parametrize with only `fast` left in the fast tier and the others marked slow: for
    checks repeated per command, method or input, where each case costs its own compilation or process."""
    return [c if c == fast else pytest.param(c, marks=pytest.mark.slow) for c in cases]


def random_variables(model, image_size: int, seed: int = 0) -> dict:
    """Random params and batch_stats for `model`, drawn in NumPy in the shapes its initialisation gives (He-normal
    kernels, zero biases, unit scales, BatchNorm's starting statistics): for tests that need a model that runs, not
    the library's initial values. Only shapes are traced; initialising for real compiles some 150 programs, ~20 s
    on two cores, for each new model."""
    import jax
    import numpy as np

    from pmg_jax import state as state_lib

    shapes = state_lib.abstract_variables(model, image_size)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        raise ValueError(f"random_variables: no rule for a variable named {name!r}")

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(workdir, config, best) of a tiny demo training run, made once per test session.

    Its users are marked `xdist_group("demo_run")` so that pytest-xdist runs them on one worker
    and the run is made once, not once per worker.
    """
    from pmg_jax import loop

    workdir = str(tmp_path_factory.mktemp("demo_run"))
    config = tiny_demo_config()
    best = loop.train_and_evaluate(config, workdir)
    return workdir, config, best
