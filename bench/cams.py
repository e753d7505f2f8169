"""What config.log_cams costs a demo run: seconds per evaluation with the CAMs logged and without.

python -m bench.cams [--epochs 3] [--log-cams 4] [--config configs/demo.py]
python -m bench.cams --run runs/demo        # the same figures from one finished run's own records

Trains the config twice by `python train.py` in fresh processes, with --config.log_cams=0 and with
--config.log_cams=N, for --epochs epochs each (an evaluation after every epoch), and reads each run's epoch
records: `eval_seconds` (the test-split evaluation) and `cams_seconds` (the CAM pass and its pictures, after
it). Prints one JSON line: per run the seconds of the first evaluation (which compiles) and the median of the
later ones, evaluation and CAMs apart and together, with the commit and the machine's load. With --run, no
training: the figures of that run alone (its `eval` seconds are the cost without the CAMs, `eval_and_cams` with).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

from bench.demo import ROOT, commit, run_seed, uptime


def per_evaluation(workdir: str) -> dict:
    """First and median-of-the-rest seconds of the evaluation, of the CAMs, and of both, from metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["kind"] == "epoch" and "eval_seconds" in r]
    totals = {
        "eval": [r["eval_seconds"] for r in records],
        "cams": [r.get("cams_seconds", 0.0) for r in records],
    }
    totals["eval_and_cams"] = [a + b for a, b in zip(totals["eval"], totals["cams"])]
    return {
        "evaluations": len(records),
        **{f"{k}_first": round(v[0], 3) for k, v in totals.items()},
        **{f"{k}_later_median": round(statistics.median(v[1:]), 3) for k, v in totals.items() if len(v) > 1},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cams", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs of each run (one evaluation after each)")
    p.add_argument("--log-cams", type=int, default=4, help="images whose CAMs the second run logs")
    p.add_argument("--config", default="configs/demo.py", help="config file (default configs/demo.py)")
    p.add_argument("--run", default="", help="read this finished run's metrics.jsonl instead of training")
    args = p.parse_args(argv)
    if args.run:
        if not os.path.isfile(os.path.join(args.run, "metrics.jsonl")):
            p.error(f"--run {args.run}: no metrics.jsonl there")
        print(json.dumps({"run": args.run, **per_evaluation(args.run), "uptime": uptime()}), flush=True)
        return
    if args.epochs < 2:
        p.error(f"--epochs {args.epochs}: at least 2 (the first evaluation compiles)")
    if args.log_cams < 1:
        p.error(f"--log-cams {args.log_cams}: at least 1")
    if not os.path.isfile(os.path.join(ROOT, args.config)):
        p.error(f"--config {args.config}: no such config file")
    result = {}
    for n in (0, args.log_cams):
        with tempfile.TemporaryDirectory(prefix=f"pmg_cams{n}_") as workdir:
            run = run_seed(args.config, [f"num_epochs={args.epochs}", f"log_cams={n}"], 0, workdir)
            result[f"log_cams={n}"] = {**per_evaluation(workdir), "run_seconds": run["seconds"]}
    result.update(
        command="python -m bench.cams " + " ".join(argv if argv is not None else sys.argv[1:]),
        commit=commit(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        uptime=uptime(),
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
