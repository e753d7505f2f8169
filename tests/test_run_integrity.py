"""A run cannot be silently damaged: damaged checkpoints are detected and passed over, one training per workdir,
a resume that changes what a step means is refused, Ctrl-C is handled at once, a full disk ends the run in one
line, and metrics.jsonl never holds a torn line or a row twice."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_demo_config

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import loop, runguard, validate
from pmg_jax import state as state_lib
from pmg_jax.cli import predict as predict_cli
from pmg_jax.errors import PMGError

pytestmark = pytest.mark.xdist_group("run_integrity")  # one worker: the finished run is trained once

# 48 images in batches of 8: 6 steps an epoch, 12 in all; a checkpoint every 2 steps (the latest 3 are kept).
TINY = {
    "dataset.demo_train_size": 48,
    "dataset.demo_test_size": 16,
    "dataset.demo_image_size": 40,
    "data.resize_size": 40,
    "data.crop_size": 32,
    "model.width": 8,
    "model.feature_size": 16,
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_epochs": 2,
    "log_every_steps": 1,
    "checkpoint.every_steps": 2,
    "optim.lr_new": 0.02,
    "optim.lr_backbone": 0.02,
}
LAST, BEFORE = 12, 10  # the last checkpoint, and the one written before it


def tiny_config(**overrides):
    return tiny_demo_config(**{**TINY, **overrides})


def train_cmd(workdir):
    """train.py with exactly tiny_config()."""
    flags = [f"--config.{k}={v}" for k, v in TINY.items()]
    return [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(workdir), *flags]


def params_at(run: str, step: int) -> dict:
    state, _ = ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).restore(step=step)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def metrics_rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(run dir, its final parameters): one uninterrupted tiny training."""
    run = str(tmp_path_factory.mktemp("finished") / "run")
    loop.train_and_evaluate(tiny_config(), run)
    return run, params_at(run, LAST)


def copy_run(finished, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(finished[0], run)
    return run


def _biggest_chunk(step_dir: str) -> str:
    chunks = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max((p for p in chunks if f"{os.sep}d{os.sep}" in p), key=os.path.getsize)


def flip_bytes(step_dir: str) -> None:
    """64 bytes inverted in the middle of the largest data chunk (it still decodes: only a digest can tell)."""
    path = _biggest_chunk(step_dir)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    open(path, "wb").write(data)


DAMAGE = {
    "flipped": flip_bytes,
    "truncated": lambda d: os.truncate(_biggest_chunk(d), os.path.getsize(_biggest_chunk(d)) // 2),
    "state_deleted": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "metadata_deleted": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "meta_garbled": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write('{"epoch": 2, "cla'),
}


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_reported_and_the_newest_intact_one_used(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    step_dir = os.path.join(run, "checkpoints", str(LAST))
    DAMAGE[damage](step_dir)
    restored = state_lib.restore(run)
    assert restored.step == BEFORE
    warning, using = capsys.readouterr().err.strip().splitlines()[-2:]
    assert warning.startswith(f"warning: {step_dir}: damaged checkpoint (") and warning.endswith(")")
    assert using == f"using checkpoint {BEFORE}, the newest intact one"
    with pytest.raises(ckpt_lib.CheckpointDamaged, match=f"^{step_dir}: damaged checkpoint") as named:
        state_lib.restore(step_dir)  # the one the user named: refused, not replaced
    assert "\n" not in str(named.value)


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_predict_says_which_checkpoint_it_used_and_refuses_when_none_is_intact(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    flip_bytes(os.path.join(run, "checkpoints", str(LAST)))
    out = str(tmp_path / "pred.csv")
    assert predict_cli.main(["--ckpt", run, "--split", "test", "--out", out]) == 0
    captured = capsys.readouterr()
    assert f"using checkpoint {BEFORE}, the newest intact one" in captured.err
    assert f"{run} checkpoint {BEFORE} " in captured.out
    for step in ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).manager.all_steps():
        if step != LAST:  # flipped already (twice would undo it)
            flip_bytes(os.path.join(run, "checkpoints", str(step)))
    assert predict_cli.main(["--ckpt", run, "--split", "test", "--out", out]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    command, message = last.split(": error: ", 1)
    assert command.endswith("predict") and message.startswith(f"no intact checkpoint in {run}/checkpoints (newest: ")


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_a_run_with_no_intact_checkpoint_is_refused_not_trained_from_scratch(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    for step in ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).manager.all_steps():
        DAMAGE["state_deleted"](os.path.join(run, "checkpoints", str(step)))
    before = sorted(os.listdir(os.path.join(run, "checkpoints")))
    with pytest.raises(ckpt_lib.CheckpointDamaged, match="no intact checkpoint in"):
        loop.train_and_evaluate(tiny_config(), run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before


def test_a_checkpoint_without_digests_restores_and_is_checked_for_non_finite_values(tmp_path):
    """Checkpoints written before the digests existed (meta without them) still restore, with a finite check."""
    ckpts = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))
    for step, value in ((1, 1.0), (2, np.nan)):
        args = ckpt_lib.ocp.args.Composite(
            state=ckpt_lib.ocp.args.StandardSave({"params": {"w": np.full(3, value, np.float32)}}),
            meta=ckpt_lib.ocp.args.JsonSave({"epoch": step}),
            config=ckpt_lib.ocp.args.JsonSave({}),
        )
        ckpts.manager.save(step, args=args, force=True)
    ckpts.wait()
    state, meta = ckpts.restore(step=1)
    assert meta == {"epoch": 1} and float(state["params"]["w"][0]) == 1.0
    with pytest.raises(ckpt_lib.CheckpointDamaged, match="non-finite values in params/w"):
        ckpts.restore(step=2)


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_resume_passes_over_a_damaged_checkpoint_and_ends_as_an_uninterrupted_run(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    flip_bytes(os.path.join(run, "checkpoints", str(LAST)))
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 13, "kind": "tr')  # a torn last line, as a kill leaves it
    loop.train_and_evaluate(tiny_config(), run)
    err = capsys.readouterr().err
    assert f"using checkpoint {BEFORE}, the newest intact one" in err
    assert os.path.isdir(os.path.join(run, "damaged_checkpoints", str(LAST)))
    assert_same(params_at(run, LAST), finished[1])  # bitwise: as if resumed from BEFORE by hand
    rows = metrics_rows(run)  # every line parses: the torn one is gone
    keys = [(r["step"], r["kind"], r.get("split")) for r in rows]
    assert len(keys) == len(set(keys)), "a metrics row was written twice"
    assert keys == [(r["step"], r["kind"], r.get("split")) for r in metrics_rows(finished[0])]


def test_trim_metrics_drops_a_torn_line_and_the_rows_after_the_resumed_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "kind": "train"} for s in (1, 2, 3, 4)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 5, "ki')
    loop.trim_metrics(path, 3)
    assert [json.loads(line) for line in open(path)] == rows[:3]


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_a_resume_that_changes_the_batch_size_is_refused_unless_the_override_names_it(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    files = [os.path.join(r, f) for r, _, fs in os.walk(run) for f in fs if f != runguard.LOCK_NAME]
    before = {p: os.path.getmtime(p) for p in files}
    with pytest.raises(validate.ConfigError) as refused:
        loop.train_and_evaluate(tiny_config(batch_size=4), run)
    message = str(refused.value)
    assert "config.batch_size is 4 but the run was trained with 8" in message and "\n" not in message
    assert "--config.resume_changes=batch_size" in message
    assert {p: os.path.getmtime(p) for p in files} == before  # the lock aside, nothing was written
    assert sorted(os.listdir(run)) == sorted(os.listdir(finished[0]))
    saved = ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).config()
    validate.check_resume(saved, tiny_config(batch_size=4, resume_changes="batch_size"), 48, 48, run)
    validate.check_resume(saved, tiny_config(batch_size=4, resume_changes="all"), 48, 48, run)
    with pytest.raises(validate.ConfigError, match="config.seed is 3"):
        validate.check_resume(saved, tiny_config(seed=3, resume_changes="batch_size"), 48, 48, run)
    validate.check_resume(saved, tiny_config(num_epochs=3), 48, 48, run)  # training longer is allowed
    with pytest.raises(validate.ConfigError, match="train_images"):
        validate.check_resume(saved, tiny_config(), 48, 40, run)
    with pytest.raises(validate.ConfigError, match="config.resume_changes: batch is not a field"):
        validate.check(tiny_config(resume_changes="batch"), num_devices=1)


@pytest.mark.slow  # uses the trained `finished` run
def test_a_resume_that_changes_the_method_is_refused_whatever_resume_changes_says(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    v2 = {"method": "pmg_v2", "data.resize_size": 64, "data.crop_size": 64, "dataset.demo_image_size": 64}
    for allowed in ("", "all"):
        with pytest.raises(validate.ConfigError) as refused:
            loop.train_and_evaluate(tiny_config(resume_changes=allowed, **v2), run)
        message = str(refused.value)
        assert "trained with config.method='pmg' but the config says 'pmg_v2'" in message and "\n" not in message
    assert sorted(os.listdir(run)) == sorted(os.listdir(finished[0]))


def test_a_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A second locker is refused while the holder lives; kill -9 the holder and the lock is free."""
    code = "import sys, time; from pmg_jax import runguard; runguard.RunLock(sys.argv[1]); print('locked', flush=True)"
    code += "; time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(runguard.RunLocked, match=f"is in use by another training \\(pid {holder.pid} on "):
        runguard.RunLock(str(tmp_path))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    runguard.RunLock(str(tmp_path)).release()


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (our Interrupts): /proc's caught-signal mask."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_ctrl_c_at_start_exits_130_in_one_line_and_leaves_nothing(tmp_path):
    workdir = tmp_path / "new" / "run"
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["SIGINT: stopped before training started; nothing was written"], err[-2000:]
    assert not os.path.exists(tmp_path / "new")


def test_a_signal_is_acknowledged_at_once_and_a_second_one_stops_at_once(tmp_path):
    """While the main thread is busy, the first SIGINT is answered at once and the second exits with 130."""
    code = (
        "import time; from pmg_jax import runguard\n"
        "with runguard.Interrupts() as interrupts:\n"
        "    interrupts.training(); print('training', flush=True)\n"
        "    deadline = time.time() + 60\n"
        "    while time.time() < deadline: sum(range(10**6))\n"  # busy, never checking interrupts.signal
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"training\n"
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline().decode()
    assert first == "SIGINT: stopping after this iteration, which writes a checkpoint; Ctrl-C again to stop now\n"
    assert proc.poll() is None  # the first one only asks
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert proc.stderr.read().decode().startswith("SIGINT: stopped now; the checkpoints already written are intact")


def logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max((json.loads(line)["step"] for line in open(path) if line.endswith("}\n")), default=0)


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_a_second_training_is_refused_and_ctrl_c_stops_the_first_after_its_iteration(finished, tmp_path):
    """Training A runs in a subprocess; B on its workdir is refused before writing anything; Ctrl-C stops A
    after the iteration with a checkpoint; the resumed run ends bit for bit as the uninterrupted one."""
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while logged_step(workdir) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    with pytest.raises(runguard.RunLocked, match=f"in use by another training \\(pid {proc.pid} on "):
        loop.train_and_evaluate(tiny_config(), workdir)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT: stopping after this iteration, which writes a checkpoint; Ctrl-C again to stop now" in err
    stopped = int(out.split("at iteration ")[1].split(":")[0])
    assert 2 <= stopped < LAST
    assert ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).latest_step() == stopped
    loop.train_and_evaluate(tiny_config(), workdir)
    assert_same(params_at(workdir, LAST), finished[1])


def _mount_small_disk(path, size: str) -> bool:
    os.makedirs(path)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_a_full_disk_ends_the_run_in_one_line_and_the_checkpoints_resume_exactly(
    finished, tmp_path, caplog, monkeypatch
):
    """On a small tmpfs (as root) the disk really fills; elsewhere tensorstore's ENOSPC is raised from the save."""
    disk = tmp_path / "disk"
    mounted = _mount_small_disk(disk, "16m")
    try:
        run = str(disk / "run")
        shutil.copytree(finished[0], run, ignore=shutil.ignore_patterns(str(BEFORE), str(LAST)))
        resumed_from = ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).latest_step()
        if mounted:
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * (free - 200_000))
        else:
            save = ckpt_lib.Checkpoints.save

            def failing_save(self, step, *args, **kwargs):
                os.makedirs(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp"), exist_ok=True)
                raise ValueError(f"RESOURCE_EXHAUSTED: writing {step}: No space left on device [os_error_code='28']")

            monkeypatch.setattr(ckpt_lib.Checkpoints, "save", failing_save)
        caplog.clear()
        with pytest.raises(loop.RunIOError) as full:
            loop.train_and_evaluate(tiny_config(), run)
        assert str(full.value) == (
            f"no space left on {run} while writing checkpoint {resumed_from + 2}; "
            f"the checkpoints up to step {resumed_from} are intact"
        )
        assert full.value.__cause__ is not None and ckpt_lib.io_error(full.value).errno == errno.ENOSPC
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR]  # what a command would print
        assert not logged, [r.getMessage()[:200] for r in logged]
        if mounted:
            os.remove(disk / "filler")
        else:
            monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save)
        loop.train_and_evaluate(tiny_config(), run)
        assert_same(params_at(run, LAST), finished[1])
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)])  # lazy: the failed attempt may still hold files


@pytest.mark.slow  # trains a run through the loop (the module's `finished` fixture or its own)
def test_explain_streams_its_results(finished, tmp_path):
    """keep=False: every image's files are written and handed to on_result, none is held in the returned list."""
    from pmg_jax import explain

    restored = state_lib.restore(finished[0])
    _, items = explain.from_split(restored.config, "test", 3)
    seen = []
    kept = explain.explain(restored, items, out_dir=str(tmp_path), on_result=lambda r: seen.append(r.grids), keep=False)
    assert kept == [] and len(seen) == 3
    assert all(os.path.isfile(grids["gradcam"]) for grids in seen)
    assert os.path.isfile(tmp_path / "index.html")


def test_pmg_errors_are_one_line():
    assert issubclass(ckpt_lib.CheckpointDamaged, PMGError) and issubclass(loop.RunIOError, PMGError)
    assert issubclass(runguard.RunLocked, PMGError)


# pmg_v2 on the tiny demo: crop 64, the smallest that its tilings (8, 4, 2 tiles per side) cut at every stage.
V2 = {"method": "pmg_v2", "dataset.demo_image_size": 64, "data.resize_size": 64, "data.crop_size": 64}


@pytest.mark.slow
def test_kill_9_of_a_pmg_v2_run_then_resume_gives_identical_parameters(tmp_path):
    """The positives are part of the data position: a pmg_v2 run killed mid-epoch resumes to the uninterrupted
    run's parameters bit for bit (the uninterrupted run here fills the compilation cache the others read)."""
    whole = str(tmp_path / "whole")
    loop.train_and_evaluate(tiny_config(**V2), whole)
    run = tmp_path / "killed"
    flags = [f"--config.{k}={v}" for k, v in V2.items()]
    proc = subprocess.Popen(train_cmd(run) + flags, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    ckpts = run / "checkpoints"
    while not (ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts))):
        assert proc.poll() is None, proc.communicate()[1][-3000:]  # killed mid-epoch once a checkpoint is written
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < ckpt_lib.Checkpoints(os.path.join(run, "checkpoints"), read_only=True).latest_step() < LAST
    loop.train_and_evaluate(tiny_config(**V2), str(run))
    assert_same(params_at(str(run), LAST), params_at(whole, LAST))
