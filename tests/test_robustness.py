"""Runs that survive: kill -9 and resume bit for bit, SIGTERM checkpoints and exits 0, non-finite steps
stop the run without touching the last good checkpoint, bad configs are refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_demo_config

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import model as model_lib
from pmg_jax import state as state_lib
from pmg_jax import steps as steps_lib
from pmg_jax import validate
from pmg_jax.optim import make_optimizer

TINY = [
    f"--config.{k}={v}"
    for k, v in (
        ("dataset.demo_train_size", 96),
        ("dataset.demo_test_size", 16),
        ("dataset.demo_image_size", 40),
        ("data.resize_size", 40),
        ("data.crop_size", 32),
        ("model.width", 8),
        ("model.feature_size", 16),
        ("batch_size", 8),
        ("eval_batch_size", 8),
        ("num_epochs", 2),
        ("log_every_steps", 1),
        ("checkpoint.every_steps", 1),
    )
]
TOTAL_STEPS = 2 * 96 // 8


def train_cmd(workdir, *extra):
    return [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(workdir), *TINY, *extra]


def run(workdir, *extra, check=True):
    done = subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged_steps(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.strip().endswith("}")]
    return max(steps, default=0)


def start_and_wait(workdir, until_step: int) -> subprocess.Popen:
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while logged_steps(workdir) < until_step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def final_params(workdir) -> dict:
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpts.latest_step() == TOTAL_STEPS
    state, _ = ckpts.restore()
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(workdir)
    return final_params(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [5, 12])  # mid-epoch, and at the epoch boundary (eval + save)
def test_kill_9_then_resume_gives_identical_parameters(tmp_path, uninterrupted, kill_at):
    proc = start_and_wait(tmp_path, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert logged_steps(tmp_path) < TOTAL_STEPS
    resumed = run(tmp_path)
    assert "resuming from" in resumed.stdout
    got = final_params(tmp_path)
    assert got.keys() == uninterrupted.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], uninterrupted[k], err_msg=k)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    proc = start_and_wait(tmp_path, 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "run the same command again to resume" in out
    stopped_at = int(out.split("at iteration ")[1].split(":")[0])
    assert 4 <= stopped_at < TOTAL_STEPS
    ckpts = ckpt_lib.Checkpoints(os.path.join(tmp_path, "checkpoints"), read_only=True)
    assert ckpts.latest_step() == stopped_at
    state, meta = ckpts.restore()
    assert int(state["step"]) == stopped_at and meta["data_state"]["step"] == stopped_at


@pytest.mark.slow  # compiles a whole training step
def test_nonfinite_step_is_not_applied():
    config = tiny_demo_config(**{"model.width": 8, "model.feature_size": 16, "data.crop_size": 32})
    model = state_lib.create_model(config)
    tx = make_optimizer(lr_new=0.01, lr_backbone=0.01, num_epochs=1, steps_per_epoch=1)
    state = state_lib.create_state(model, tx, 0, 32)
    images = jnp.zeros((4, 32, 32, 3)).at[1, 5, 5, 0].set(jnp.nan)
    step = jax.jit(steps_lib.make_train_step(model, tx))
    new, metrics = step(state, {"image": images, "label": jnp.arange(4)})
    assert int(metrics["nonfinite_pass"]) == 1
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run(tmp_path, "--config.num_epochs=1")
    ckpts = ckpt_lib.Checkpoints(os.path.join(tmp_path, "checkpoints"), read_only=True)
    good = ckpts.latest_step()
    diverged = run(tmp_path, "--config.optim.lr_new=1e30", "--config.optim.lr_backbone=1e30", check=False)
    assert diverged.returncode == 1
    message = diverged.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss or gradient at iteration ") and "in the pass for" in message
    iteration = int(message.split("at iteration ")[1].split()[0])
    assert iteration > good
    ckpts = ckpt_lib.Checkpoints(os.path.join(tmp_path, "checkpoints"), read_only=True)
    assert ckpts.latest_step() == good


BAD_CONFIGS = [
    ({"data.crop_size": 600}, "config.data.crop_size=600 is larger than data.resize_size"),
    ({"data.crop_size": 100, "data.resize_size": 120}, "must be divisible by 32"),
    ({"data.crop_size": 96, "jigsaw.granularities": (7, 4, 2)}, "cannot be cut into a 7x7 grid"),
    ({"batch_size": 6}, "config.batch_size=6 must be a positive multiple of the 4 devices"),
    ({"eval_batch_size": 0}, "config.eval_batch_size=0"),
    ({"model.backbone": "resnet51"}, "config.model.backbone='resnet51'"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16'"),
    ({"jigsaw.mode": "spiral"}, "config.jigsaw.mode='spiral'"),
    ({"bn_stats": "some"}, "config.bn_stats='some'"),
    ({"num_epochs": 0}, "config.num_epochs=0 must be at least 1"),
    ({"optim.lr_new": -1.0}, "config.optim.lr_new=-1.0 must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_config_values_are_refused_naming_the_field(overrides, message):
    config = tiny_demo_config(**overrides)
    with pytest.raises(validate.ConfigError, match=None) as e:
        validate.check(config, num_devices=4)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("field", list(validate.choices()))
def test_each_field_with_fixed_choices_is_refused_outside_them_by_the_one_table(field):
    """validate.choices() is the one list of every field's allowed values (taken from the modules that own them):
    a value outside it is refused in one line naming the field and the choices, and every value in it passes
    that check."""
    import inspect

    allowed = validate.choices()[field]
    with pytest.raises(validate.ConfigError) as refused:
        validate.check_choices(tiny_demo_config(**{field: "no_such_choice"}))
    assert str(refused.value) == f"config.{field}='no_such_choice' must be one of {allowed}"
    for value in allowed:
        validate.check_choices(tiny_demo_config(**{field: value}))
    assert inspect.getsource(validate).count("must be one of") == 1  # no second, hand-written check
    assert "must be" not in inspect.getsource(steps_lib.make_train_step)  # nor one where the value is used
    assert "must be one of" not in inspect.getsource(model_lib)


def test_unknown_field_in_a_config_file_is_refused():
    config = tiny_demo_config()
    with config.unlocked():
        config.optim.learning_rate = 0.1
    with pytest.raises(validate.ConfigError, match="unknown field.*optim.learning_rate"):
        validate.check(config, num_devices=1)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.batch_szie=3"], 'Did you mean "batch_size"'),
        (["--config.data.crop_size=64"], "config.data.crop_size=64 is larger than"),
        (["--config.dataset.num_classes=30"], "config.dataset.num_classes=30"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line(tmp_path, args, message):
    done = run(tmp_path, *args, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")  # refused before any work


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path):
    run(tmp_path, "--config.num_epochs=1")
    for args, message in (
        (["--config.model.width=16"], "checkpoint has model.width=8"),
        (["--config.dataset.num_classes=5"], "checkpoint has 8 classes"),
    ):
        done = run(tmp_path, *args, check=False)
        assert done.returncode == 1 and message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
