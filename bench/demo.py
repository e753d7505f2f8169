"""The CPU demo over seeds: each seed trained by a fresh `python train.py` process, as a user would run it.

python -m bench.demo --seeds 0 1 2 [--config configs/demo.py] [--override field=value ...] [--workdirs DIR]

Without --config, the method decides the config: configs/demo.py for PMG, and for `--override method=pmg_v2`
configs/demo_pmg_v2.py (the same net and schedule length at 128 px: PMG-V2's tiles need a crop divisible by 64,
so the 96-px demo is refused).

Each seed runs `python train.py --config CONFIG --workdir <new temporary dir> --config.<field>=<value> ...
--config.seed=N` and its whole wall time is taken, compilation included (`--workdirs DIR` keeps the
runs as DIR/seed<N> instead of removing them). The accuracies come from the
run's own metrics.jsonl: "combined" of its last evaluation (the bar) and of its best one. Prints one JSON
line per seed, then a summary line with the mean, min and max of the final combined accuracy, the commit
and the load (`uptime`), since other processes on the machine change the time but not the accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIGS = {"pmg": "configs/demo.py", "pmg_v2": "configs/demo_pmg_v2.py"}  # method -> its demo config


def read_metrics(path: str) -> dict:
    """Final and best combined accuracy (a tie goes to the later epoch), best epoch and epochs trained."""
    evals, epoch_of_step = [], {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "eval" and record.get("split", "test") == "test":  # not a val split's
                evals.append(record)
            elif record["kind"] == "epoch":
                epoch_of_step[record["step"]] = int(record["epoch"])
    if not evals:
        raise ValueError(f"{path}: no evaluation lines")
    best = max(reversed(evals), key=lambda r: r["combined"])  # max keeps the first maximum: the latest one
    return {
        "combined": evals[-1]["combined"],
        "best_combined": best["combined"],
        "best_epoch": epoch_of_step[best["step"]],
        "epochs": max(epoch_of_step.values()),
    }


def command(config: str, workdir: str, overrides: list[str], seed: int) -> list[str]:
    """The train.py command line of one seed."""
    return [
        sys.executable,
        "train.py",
        "--config",
        config,
        "--workdir",
        workdir,
        *(f"--config.{o}" for o in overrides),
        f"--config.seed={seed}",
    ]


def uptime() -> str:
    """The machine's load as `uptime` prints it."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_seed(config: str, overrides: list[str], seed: int, workdir: str) -> dict:
    """Train one seed in a new workdir; its accuracies, wall and CPU seconds, and the load after it."""
    cpu = os.times()
    start = time.perf_counter()
    done = subprocess.run(command(config, workdir, overrides, seed), cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu_seconds = sum(os.times()[2:4]) - sum(cpu[2:4])  # user + system time of the finished child
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"error: seed {seed}: train.py exited with status {done.returncode}: {last}")
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {
        "seed": seed,
        **metrics,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "uptime": uptime(),
    }


def commit() -> str:
    """Short hash of HEAD, with '+dirty' when the working tree has changes."""
    git = ["git", "-C", ROOT]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def summarize(runs: list[dict], config: str) -> dict:
    """Mean, min and max of the final combined accuracy over the seeds, and where and when they ran."""
    final = [r["combined"] for r in runs]
    return {
        "summary": True,
        "seeds": [r["seed"] for r in runs],
        "config": os.path.relpath(config, ROOT),
        "mean": statistics.mean(final),
        "min": min(final),
        "max": max(final),
        "mean_best": statistics.mean(r["best_combined"] for r in runs),
        "max_seconds": max(r["seconds"] for r in runs),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "uptime": uptime(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="config.seed of each run")
    parser.add_argument(
        "--config",
        help="config file (default: the method's demo, "
        + ", ".join(f"{m}: {c}" for m, c in DEMO_CONFIGS.items())
        + ")",
    )
    parser.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="FIELD=VALUE",
        help="config overrides for every run, e.g. num_epochs=4 (passed as --config.FIELD=VALUE)",
    )
    parser.add_argument("--workdirs", help="keep the runs as WORKDIRS/seed<N> (default: temporary, removed)")
    args = parser.parse_args(argv)
    for o in args.override:
        if "=" not in o or o.startswith("="):
            parser.error(f"--override {o!r}: expected FIELD=VALUE")
    if args.config is None:
        method = method_of(args.override)
        if method not in DEMO_CONFIGS:
            parser.error(f"--override method={method}: no demo config for it; pass --config FILE")
        args.config = DEMO_CONFIGS[method]
    path = args.config if os.path.isfile(args.config) else os.path.join(ROOT, args.config)  # defaults: from ROOT
    if not os.path.isfile(path):
        parser.error(f"--config {args.config}: no such config file")
    args.config = os.path.abspath(path)
    if args.workdirs:
        args.workdirs = os.path.abspath(args.workdirs)  # train.py runs from the repository root
        if len(set(args.seeds)) < len(args.seeds):
            parser.error("--workdirs: each seed can run once (a second run would resume the first)")
        for seed in args.seeds:
            if os.path.exists(seed_dir(args.workdirs, seed)):
                parser.error(f"--workdirs: {seed_dir(args.workdirs, seed)} already exists (train.py would resume it)")
    return args


def method_of(overrides: list[str]) -> str:
    """The method an `--override method=...` names (the last one wins, as in train.py), else PMG."""
    methods = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "method"]
    return methods[-1] if methods else "pmg"


def seed_dir(workdirs: str, seed: int) -> str:
    """Where --workdirs keeps one seed's run."""
    return os.path.join(workdirs, f"seed{seed}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = []
    for seed in args.seeds:
        if args.workdirs:
            runs.append(run_seed(args.config, args.override, seed, seed_dir(args.workdirs, seed)))
        else:
            with tempfile.TemporaryDirectory(prefix=f"pmg_demo_seed{seed}_") as workdir:
                runs.append(run_seed(args.config, args.override, seed, workdir))
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps(summarize(runs, args.config)), flush=True)


if __name__ == "__main__":
    main()
