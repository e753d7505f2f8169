"""The command lines as a new user meets them: help, one-line refusals that leave nothing on disk, which run a
folder of runs resolves to, and metrics in one unit."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from test_robustness import start_and_wait

from pmg_jax import loop


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_help_exits_zero_and_says_where_the_fields_are():
    done = cli(os.path.join(ROOT, "train.py"), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pmg_jax/config.py" in done.stdout and "--config.FIELD=VALUE" in done.stdout
    assert "optim.lr_new" in done.stdout and "dataset.num_classes" in done.stdout


@pytest.mark.parametrize("case", ["parent_is_a_file", "no_data", "no_data_convnext"])
def test_refusals_are_one_line_and_leave_nothing_on_disk(tmp_path, case):
    (tmp_path / "a_file").write_text("")
    if case == "parent_is_a_file":
        args = ["--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(tmp_path / "a_file" / "run")]
        where = "a_file"
    else:  # the user's command, with no CUB download: the default workdir runs/<config> must not appear
        config = "cub.py" if case == "no_data" else "cub_convnext_tiny.py"
        args = ["--config", os.path.join(ROOT, "configs", config), f"--config.dataset.data_dir={tmp_path / 'no_cub'}"]
        where = "no_cub"
    before = sorted(os.listdir(tmp_path))
    done = cli(os.path.join(ROOT, "train.py"), *args, cwd=str(tmp_path))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and where in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no runs/, no half-made workdir


@pytest.mark.slow
def test_a_folder_of_runs_says_which_run_and_warns_when_it_is_unfinished(tmp_path):
    runs = tmp_path / "runs"
    proc = start_and_wait(runs / "stopped", 3)  # a tiny run stopped by SIGTERM after a few steps
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    done = cli("explain.py", "--ckpt", str(runs), "--block", "3", "--num-images", "2", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{runs} is a folder of runs: using the one with the newest checkpoint, {runs / 'stopped'}" in done.stdout
    warning = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "is unfinished (stopped at epoch 0 of 2)" in warning[0]


def test_training_throughput_leaves_out_the_step_that_compiled(monkeypatch):
    """The first step of a process compiles: an epoch's images/s counts from its end, later epochs from their start."""
    clock = iter([20.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    # epoch from step 0 at t=0; the step that compiled ended at t=15 (step 1); now t=20 at step 11: 10 steps in 5 s
    assert loop._rate((0, 0.0), (1, 15.0), 11, 8) == pytest.approx(10 * 8 / 5.0)
    clock = iter([20.0])
    # a later epoch (from step 32 at t=10) did not compile: 8 steps in 10 s
    assert loop._rate((32, 10.0), (1, 15.0), 40, 8) == pytest.approx(8 * 8 / 10.0)


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")  # shares the session's demo run (conftest)
def test_metrics_are_in_percent_everywhere(demo_run):
    workdir, _, _ = demo_run
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [line["accuracy"] for line in lines if line["kind"] == "train"]
    evals = [line["combined"] for line in lines if line["kind"] == "eval"]
    assert max(train) > 1.0 and max(evals) > 1.0  # a fraction would never exceed 1
    assert all(0.0 <= v <= 100.0 for v in train + evals)
