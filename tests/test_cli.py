"""The command lines as a new user meets them: help, one-line refusals that leave nothing on disk, which run a
folder of runs resolves to, and metrics in one unit."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, one_fast
from test_robustness import start_and_wait

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import loop
from pmg_jax.cli import explain, export, predict


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_help_exits_zero_and_says_where_the_fields_are():
    done = cli(os.path.join(ROOT, "train.py"), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pmg_jax/config.py" in done.stdout and "--config.FIELD=VALUE" in done.stdout
    assert "optim.lr_new" in done.stdout and "dataset.num_classes" in done.stdout


@pytest.mark.parametrize(
    "override,section,fields",
    [("optim.lr=0.1", "optim", ("lr_new", "lr_backbone", "momentum")), ("optimm.lr=1", "the config", ("optim",))],
)
def test_an_unknown_config_field_is_one_line_listing_its_sections_fields(tmp_path, override, section, fields):
    """A misspelt field with no near match is named, with the fields its section does have."""
    config = os.path.join(ROOT, "configs", "demo.py")
    done = cli(os.path.join(ROOT, "train.py"), "--config", config, f"--config.{override}", cwd=str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    field = override.split("=")[0]
    assert "\n" not in line and line.startswith(f"error: --config.{field}: {section} has no field "), line
    assert all(name in line.split("its fields: ")[1] for name in fields), line
    assert os.listdir(tmp_path) == []  # nothing written


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of a tiny PMG with random weights for the demo's 8 classes, and a demo image file."""
    import cv2
    from conftest import random_variables, tiny_demo_config

    from pmg_jax import convert
    from pmg_jax import state as state_lib
    from pmg_jax.data import synthetic

    config = tiny_demo_config(**{"model.width": 8, "model.feature_size": 16, "data.crop_size": 32})
    model = state_lib.create_model(config)
    variables = random_variables(model, config.data.crop_size, seed=0)
    root = tmp_path_factory.mktemp("cli")
    convert.write_checkpoint(variables, str(root / "run"), config, synthetic.class_names(8))
    image = synthetic.make_example(synthetic.DemoSpec(8, 48), "test", 0)["image"]
    cv2.imwrite(str(root / "bird.png"), image)
    (root / "a_file").write_text("")
    return root


COMMANDS = {  # how each command is run, then its arguments for: a missing checkpoint, an output it cannot write
    "train": (
        [os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "demo.py")],
        ["--config.eval_only=True", "--config.init.checkpoint={missing}", "--workdir={root}/w"],
        ["--workdir={unwritable}"],
    ),
    "explain": (
        [os.path.join(ROOT, "explain.py")],
        ["--ckpt", "{missing}", "--images", "{root}/bird.png"],
        ["--ckpt", "{root}/run", "--images", "{root}/bird.png", "--out", "{unwritable}"],
    ),
    "predict": (
        ["-m", "pmg_jax.predict"],
        ["--ckpt", "{missing}", "--images", "{root}/bird.png"],
        ["--ckpt", "{root}/run", "--images", "{root}/bird.png", "--out", "{unwritable}/rows.csv"],
    ),
    "predict --split": (
        ["-m", "pmg_jax.predict", "--split", "test"],
        ["--ckpt", "{missing}"],
        ["--ckpt", "{root}/run", "--out", "{unwritable}/rows.csv"],
    ),
    "export": (
        ["-m", "pmg_jax.export", "--format", "stablehlo"],
        ["--ckpt", "{missing}", "--out", "{root}/exported"],
        ["--ckpt", "{root}/run", "--out", "{unwritable}"],
    ),
    "convert": (
        ["-m", "pmg_jax.convert"],
        ["{missing}/model.pth", "--out", "{root}/converted"],
        ["{root}/bird.png", "--out", "{unwritable}"],
    ),
}


@pytest.mark.parametrize(
    "command",  # three commands in fresh processes each: one in the fast tier, all five in the whole suite
    one_fast(COMMANDS, "explain"),
)
def test_every_command_helps_and_refuses_a_missing_checkpoint_or_unwritable_output_in_one_line(tiny_run, command):
    """--help exits 0; a checkpoint (or source) that is not there and an output under a file (which even root
    cannot write) each exit 1 with one line 'error: ...' naming the path, the output's with the flag that moves
    it, no traceback and nothing written."""
    how, missing, unwritable = COMMANDS[command]
    where = {"root": tiny_run, "missing": tiny_run / "no_such_run", "unwritable": tiny_run / "a_file" / "sub"}
    assert cli(*how, "--help").returncode == 0
    before = sorted(os.listdir(tiny_run))
    for args, path in ((missing, where["missing"]), (unwritable, where["unwritable"])):
        done = cli(*how, *(a.format(**where) for a in args))
        lines = [line for line in done.stderr.strip().splitlines() if "warning:" not in line]
        assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        assert re.match(r"^(\S+: )?error: ", lines[0]) and str(path) in lines[0], lines[0]
        if path == where["unwritable"]:
            assert f"cannot write {path}" in lines[0] and ": pass --" in lines[0], lines[0]
    assert sorted(os.listdir(tiny_run)) == before


INFERENCE = {  # the commands over a checkpoint, in this process: each one's arguments besides --ckpt
    "explain": (explain, ["--images", "{root}/bird.png", "--out", "{root}/explained"]),
    "predict": (predict, ["--images", "{root}/bird.png"]),
    "export": (export, ["--format", "stablehlo", "--out", "{root}/exported"]),
}


@pytest.mark.parametrize("command", INFERENCE)
def test_a_run_with_no_intact_checkpoint_is_one_line_and_status_1(tiny_run, tmp_path, capsys, command):
    """The shared restore and error wrapper: a run whose only checkpoint lost its state is refused by every
    command with one line 'PROG: error: ...' naming the run (the damage itself is a warning), and status 1."""
    module, extra = INFERENCE[command]
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    shutil.rmtree(run / "checkpoints" / "0" / "state")
    assert module.main(["--ckpt", str(run), *(a.format(root=tmp_path) for a in extra)]) == 1
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "warning:" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{module.PROG}: error: no intact checkpoint in {run}"), lines
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing written


def test_the_checkpoint_flag_offers_what_the_checkpoint_module_offers(monkeypatch, capsys):
    """--checkpoint's choices are checkpoint.WHICH, whatever it holds, its first the default; another value is
    refused by argparse (status 2) in a line naming the flag, the value and the choices."""
    monkeypatch.setattr(ckpt_lib, "WHICH", ("newest", "best", "second_best"))
    for module, extra in INFERENCE.values():
        args = [a.format(root="r") for a in extra]
        assert module.parse_args(["--ckpt", "r", *args]).checkpoint == "newest"
        assert module.parse_args(["--ckpt", "r", *args, "--checkpoint", "second_best"]).checkpoint == "second_best"
        with pytest.raises(SystemExit) as refused:
            module.parse_args(["--ckpt", "r", *args, "--checkpoint", "latest"])
        assert refused.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--checkpoint" in error and "'latest'" in error and "second_best" in error, error
