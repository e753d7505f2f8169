"""bench/demo.py end to end at a tiny size: one JSON line per seed, a summary, figures from the run's own metrics."""

import json
import os
import signal
import subprocess
import sys

import pytest

from bench import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few seconds of training per seed (a tiny model, as tests/test_robustness.py's TINY).
TINY = [
    "dataset.demo_train_size=48",
    "dataset.demo_test_size=24",
    "dataset.demo_image_size=40",
    "data.resize_size=40",
    "data.crop_size=32",
    "model.width=8",
    "model.feature_size=16",
    "batch_size=8",
    "eval_batch_size=8",
    "num_epochs=2",
    "log_every_steps=3",
]
SEED_FIELDS = {"seed", "combined", "best_combined", "best_epoch", "seconds", "cpu_seconds", "epochs", "uptime"}
SUMMARY_FIELDS = {
    *("summary", "seeds", "config", "mean", "min", "max", "mean_best", "max_seconds"),
    *("commit", "date", "uptime"),
}


def bench(*args: str) -> subprocess.CompletedProcess:
    """Run bench/demo.py; on a timeout its train.py children go too (they share its process group)."""
    cmd = [sys.executable, "-m", "bench.demo", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def evaluations(workdir: str) -> list[tuple[int, float]]:
    """(epoch, combined) of every evaluation in a run's metrics.jsonl, an eval line paired with its epoch line."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    epochs = {r["step"]: r["epoch"] for r in records if r["kind"] == "epoch"}
    return [(epochs[r["step"]], r["combined"]) for r in records if r["kind"] == "eval"]


@pytest.mark.slow
def test_one_line_per_seed_then_a_summary_with_the_runs_own_accuracies(tmp_path):
    done = bench("--seeds", "0", "1", "--override", *TINY, "--workdirs", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3
    *runs, summary = lines
    for seed, run in zip((0, 1), runs):
        assert set(run) == SEED_FIELDS and run["seed"] == seed and run["epochs"] == 2
        evals = evaluations(tmp_path / f"seed{seed}")
        assert [e for e, _ in evals] == [1, 2]
        assert run["combined"] == evals[-1][1]
        best = max(c for _, c in evals)
        assert run["best_combined"] == best
        assert run["best_epoch"] == max(e for e, c in evals if c == best)  # a tie goes to the later epoch
        assert run["cpu_seconds"] > 0 and run["seconds"] > 0 and "load average" in run["uptime"]
    finals = [r["combined"] for r in runs]
    assert set(summary) == SUMMARY_FIELDS and summary["summary"] is True and summary["seeds"] == [0, 1]
    assert summary["config"] == os.path.join("configs", "demo.py")
    assert summary["mean"] == pytest.approx(sum(finals) / 2)
    assert (summary["min"], summary["max"]) == (min(finals), max(finals))
    assert summary["mean_best"] == pytest.approx(sum(r["best_combined"] for r in runs) / 2)
    assert summary["max_seconds"] == max(r["seconds"] for r in runs)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert summary["commit"].startswith(head.strip())


def test_final_is_the_last_evaluation_and_the_best_tie_goes_to_the_later_epoch(tmp_path):
    # eval every 2 epochs of 5 steps: evaluations at epochs 2 (60%), 4 (75%), 6 (75%) and 7 (70%, the last epoch)
    lines = [{"step": 3, "kind": "train", "loss1": 1.0}]
    for epoch, combined in ((1, None), (2, 60.0), (3, None), (4, 75.0), (5, None), (6, 75.0), (7, 70.0)):
        if combined is not None:
            lines.append({"step": 5 * epoch, "kind": "eval", "head1": 99.0, "concat": 99.0, "combined": combined})
        lines.append({"step": 5 * epoch, "kind": "epoch", "epoch": epoch, "seconds": 1.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert demo.read_metrics(str(path)) == {"combined": 70.0, "best_combined": 75.0, "best_epoch": 6, "epochs": 7}


def test_bad_input_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "seed0").mkdir()
    for args, flag in (
        (["--override", "num_epochs"], "--override"),
        (["--config", "configs/nope.py"], "--config"),
        (["--workdirs", str(tmp_path)], "--workdirs"),
    ):
        done = bench("--seeds", "0", *args)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().splitlines()[-1].startswith(f"demo.py: error: {flag}"), done.stderr
    done = bench("--seeds", "3", "--override", "optim.lr_nw=0.1")  # train.py refuses the field before any work
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().startswith("error: seed 3: train.py exited with status 1") and "lr_nw" in done.stderr


def test_the_method_picks_its_demo_config_unless_one_is_given(tmp_path):
    import importlib

    from pmg_jax import methods, validate

    assert set(demo.DEMO_CONFIGS) == set(methods.METHODS)  # every method has a demo
    for method, path in demo.DEMO_CONFIGS.items():
        chosen = demo.parse_args(["--override", "num_epochs=1", f"method={method}"]).config
        assert chosen == os.path.join(ROOT, path)
        c = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config()
        assert c.method == method  # the demo trains the method asked for, and validates
        validate.check(c, num_devices=1)
    assert demo.parse_args([]).config == os.path.join(ROOT, "configs", "demo.py")
    given = tmp_path / "mine.py"
    given.write_text("")
    assert demo.parse_args(["--config", str(given), "--override", "method=pmg_v2"]).config == str(given)
    with pytest.raises(SystemExit):
        demo.parse_args(["--override", "method=nope"])
