"""Whole training runs of pmg_jax and of the PyTorch reference's loop, side by side over seeds, on the same files.

python -m bench.fidelity --seeds 0 1 2 [--out runs/fidelity] [--figure docs/images/fidelity_demo.png] [--jobs 2]
    [--tiny] [--summarize]

The demo dataset of configs/demo.py is written once as an ImageFolder (`python -m pmg_jax.data.synthetic
--class-folders`, OUT/data/{train,test}/<class>/) and both sides read those files. For each seed, in fresh
processes: `python train.py --config configs/demo.py --config.dataset.name=imagefolder
--config.dataset.data_dir=OUT/data --config.seed=N` (OUT/pmg_jax/seedN) and `python -m bench.reference_train`
with the same model shape, epochs, batch, learning rates and transforms (OUT/reference/seedN.jsonl). Per
epoch, each side's mean training loss of every head and its test accuracy of every head and of combined.

Prints one JSON line per run and writes OUT/summary.json: the final combined accuracy's mean, min and max
per side, and per epoch and curve the two sides' means, their min-max bands and the epochs where one side's
mean leaves the other's band. The figure shows every curve of both sides: the mean over seeds as a line, the
min-max over seeds as a band. --jobs K runs K trainings at a time (default 2, the two sides of a seed; 6 runs
three seeds at once). --tiny: one epoch of a tiny model on 64 / 32 images (a check that it all runs).
--summarize trains nothing and summarises the runs in OUT as far as all of them have got.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

from bench.demo import ROOT, commit, uptime
from pmg_jax import checkpoint as ckpt_lib

HEADS = ("head1", "head2", "head3", "concat", "combined")
LOSSES = ("loss1", "loss2", "loss3", "loss_concat")
CURVES = (*(f"train_{k}" for k in LOSSES), *(f"test_{k}" for k in HEADS))
SIDES = ("pmg_jax", "reference")
CONFIG = "configs/demo.py"
# --tiny: one epoch of a smaller net on a few images, to check the whole path in well under a minute
TINY = {
    "num_epochs": 1,
    "model.width": 8,
    "model.feature_size": 16,
    "dataset.demo_train_size": 64,
    "dataset.demo_test_size": 32,
    "data.resize_size": 40,
    "data.crop_size": 32,
}
TRAINED_ON = re.compile(r"training .* \((\d+) train / (\d+) test images, (\d+) classes\)")


def demo_config(overrides: dict[str, object]):
    """configs/demo.py with `overrides` ({'section.field': value}) applied."""
    sys.path.insert(0, ROOT)
    from configs import demo

    c = demo.get_config()
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def write_data(config, out: str) -> str:
    """The demo's train and test splits as class folders under OUT/data, written once by the documented command."""
    data = os.path.join(out, "data")
    d = config.dataset
    for split, count in (("train", d.demo_train_size), ("test", d.demo_test_size)):
        if os.path.isdir(os.path.join(data, split)):
            continue  # a rerun reads the files it wrote before
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pmg_jax.data.synthetic",
                "--out",
                data,
                "--split",
                split,
                "--count",
                str(count),
                "--classes",
                str(d.num_classes),
                "--image-size",
                str(d.demo_image_size),
                "--seed",
                str(d.demo_seed),
                "--class-folders",
            ],
            cwd=ROOT,
            check=True,
        )
    return data


def pmg_command(config, overrides: dict[str, object], data: str, workdir: str, seed: int) -> list[str]:
    """The train.py command of one seed: the demo config read from the ImageFolder of `data`."""
    # log_cams off: the comparison is of training, and the CAMs would only add time to one side
    fields = {**overrides, "dataset.name": "imagefolder", "dataset.data_dir": data, "seed": seed, "log_cams": 0}
    fields.pop("dataset.demo_train_size", None)  # sizes of the generated source; the files decide here
    fields.pop("dataset.demo_test_size", None)
    return [
        sys.executable,
        "train.py",
        "--config",
        CONFIG,
        "--workdir",
        workdir,
        *(f"--config.{k}={v}" for k, v in fields.items()),
    ]


def reference_command(config, data: str, out: str, seed: int) -> list[str]:
    """The bench.reference_train command of one seed, with the config's model shape and hyper-parameters."""
    m, d, o = config.model, config.data, config.optim
    return [
        sys.executable,
        "-m",
        "bench.reference_train",
        "--data",
        data,
        "--out",
        out,
        "--width",
        str(m.width),
        "--stage-sizes",
        *(str(s) for s in m.stage_sizes),
        "--feature-size",
        str(m.feature_size),
        "--resize",
        str(d.resize_size),
        "--crop",
        str(d.crop_size),
        "--pad",
        str(d.pad),
        "--epochs",
        str(config.num_epochs),
        "--batch",
        str(config.batch_size),
        "--eval-batch",
        str(config.eval_batch_size),
        "--lr-new",
        str(o.lr_new),
        "--lr-backbone",
        str(o.lr_backbone),
        "--seed",
        str(seed),
        "--threads",
        "1",
    ]


def check_config(config) -> None:
    """Refuse a config the reference loop cannot reproduce (it has one model and one schedule)."""
    differs = {
        "model.backbone": (config.model.backbone, "resnet50"),
        "schedule": (config.schedule, "progressive"),
        "jigsaw.mode": (config.jigsaw.mode, "cycle"),
        "jigsaw.granularities": (tuple(config.jigsaw.granularities), (8, 4, 2)),
        "data.hflip": (config.data.hflip, True),
        "optim.momentum": (config.optim.momentum, 0.9),
        "optim.weight_decay": (config.optim.weight_decay, 5e-4),
        "concat_loss_weight": (config.concat_loss_weight, 2.0),
    }
    bad = [f"{k}={v!r} (the reference: {want!r})" for k, (v, want) in differs.items() if v != want]
    if bad:
        raise SystemExit(f"error: {CONFIG}: the reference loop cannot run {', '.join(bad)}")


def run(command: list[str], log: str) -> float:
    """Run a command from the repository root with its output in `log`; its wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with status {done.returncode}; see {log}")
    return time.perf_counter() - start


def read_pmg(workdir: str, log: str) -> dict:
    """Per-epoch curves of a pmg_jax run from its metrics.jsonl, and the data it says it trained on."""
    evals, epochs = {}, {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "eval" and r.get("split", "test") == "test":
                evals[r["step"]] = r
            elif r["kind"] == "epoch":
                epochs[r["epoch"]] = r
    curves = {c: [] for c in CURVES}
    for e in sorted(epochs):
        record, result = epochs[e], evals[epochs[e]["step"]]
        for k in LOSSES:
            curves[f"train_{k}"].append(record[k])
        for k in HEADS:
            curves[f"test_{k}"].append(result[k])
    with open(log) as f:
        trained_on = TRAINED_ON.search(f.read())
    if trained_on is None:
        sys.exit(f"error: {log}: no 'training ... (N train / M test images, K classes)' line")
    meta = _checkpoint_meta(workdir)
    data = {"train": int(trained_on[1]), "test": int(trained_on[2]), "classes": meta["class_names"]}
    return {"curves": curves, "data": data}


def _checkpoint_meta(workdir: str) -> dict:
    """The latest checkpoint's metadata (its class names), read with the library that wrote it."""
    import orbax.checkpoint as ocp

    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        meta = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return checkpoints.manager.restore(checkpoints.latest_step(), args=meta)["meta"]
    finally:
        checkpoints.close()


def read_reference(path: str) -> dict:
    """Per-epoch curves of a reference run from its JSON lines, and the data it says it trained on."""
    curves, data = {c: [] for c in CURVES}, None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "data" in r:
                data = r["data"]
                continue
            for k in LOSSES:
                curves[f"train_{k}"].append(r[k])
            for k in HEADS:
                curves[f"test_{k}"].append(r["test"][k])
    return {"curves": curves, "data": data}


def band(runs: list[dict], curve: str) -> dict[str, list[float]]:
    """Mean, min and max over the seeds of one curve, epoch by epoch."""
    per_epoch = list(zip(*(r["curves"][curve] for r in runs)))
    return {
        "mean": [statistics.mean(v) for v in per_epoch],
        "min": [min(v) for v in per_epoch],
        "max": [max(v) for v in per_epoch],
    }


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Final combined accuracy per side; per curve the bands and the epochs where a side's mean leaves the other's."""
    final = {side: [r["curves"]["test_combined"][-1] for r in rs] for side, rs in runs.items()}
    per_side = {
        side: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "spread": max(v) - min(v), "runs": v}
        for side, v in final.items()
    }
    a, b = per_side["pmg_jax"], per_side["reference"]
    curves = {}
    for c in CURVES:
        bands = {side: band(rs, c) for side, rs in runs.items()}
        p, r = bands["pmg_jax"], bands["reference"]
        outside = [
            e + 1
            for e in range(len(p["mean"]))
            if not r["min"][e] <= p["mean"][e] <= r["max"][e] or not p["min"][e] <= r["mean"][e] <= p["max"][e]
        ]
        curves[c] = {
            **bands,
            "mean_difference": [x - y for x, y in zip(p["mean"], r["mean"])],
            "epochs_outside_other_band": outside,
        }
    return {
        "final_combined": per_side,
        "final_combined_difference": a["mean"] - b["mean"],
        "within_spread": abs(a["mean"] - b["mean"]) < max(a["spread"], b["spread"]),
        "curves": curves,
    }


def plot(summary: dict, path: str, title: str) -> None:
    """Every curve of both sides: the mean over seeds as a line, the min-max over seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(13, 10), constrained_layout=True)
    colours = {"pmg_jax": "tab:blue", "reference": "tab:orange"}
    for ax, c in zip(axes.flat, CURVES):
        for side in SIDES:
            b = summary["curves"][c][side]
            epochs = range(1, len(b["mean"]) + 1)
            ax.fill_between(epochs, b["min"], b["max"], color=colours[side], alpha=0.2, linewidth=0)
            ax.plot(epochs, b["mean"], color=colours[side], marker="o", markersize=3, label=side)
        kind, _, name = c.partition("_")
        ax.set_title(f"{name} training loss" if kind == "train" else f"{name} test accuracy (%)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of both sides")
    p.add_argument("--out", default="runs/fidelity", help="folder for the data, the runs and summary.json")
    p.add_argument("--figure", default="", help="where to write the figure (default OUT/fidelity.png)")
    p.add_argument("--tiny", action="store_true", help="one epoch of a tiny model on a few images")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: the two sides of a seed at once)")
    p.add_argument(
        "--summarize",
        action="store_true",
        help="train nothing: the summary and figure of the runs in OUT so far (cut to the epochs all have reached)",
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: at least 1")
    if len(set(args.seeds)) < len(args.seeds):
        p.error("--seeds: each seed can run once")
    args.out = os.path.abspath(args.out)
    args.figure = os.path.abspath(args.figure or os.path.join(args.out, "fidelity.png"))
    for seed in [] if args.summarize else args.seeds:
        if os.path.exists(os.path.join(args.out, "pmg_jax", f"seed{seed}")):
            p.error(f"--out {args.out}: pmg_jax/seed{seed} already exists (train.py would resume it)")
    return args


def write_summary(
    args: argparse.Namespace, argv: list[str] | None, runs: dict[str, list[dict]], extra: dict | None = None
) -> None:
    """OUT/summary.json and the figure of the seeds done so far; prints the final combined accuracies."""
    done = [r["seed"] for r in runs["pmg_jax"]]
    summary = {
        "command": "python -m bench.fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": done,
        "data": {side: [r["data"] for r in rs] for side, rs in runs.items()},
        "seconds": {side: [round(r["seconds"], 1) for r in rs] for side, rs in runs.items()},
        **summarize(runs),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "uptime": uptime(),
        **(extra or {}),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, args.figure, f"pmg_jax and the PyTorch reference on the demo, seeds {done}")
    fc = summary["final_combined"]
    print(
        json.dumps(
            {
                "summary": os.path.join(args.out, "summary.json"),
                "figure": args.figure,
                **{side: {k: fc[side][k] for k in ("mean", "min", "max")} for side in SIDES},
                "within_spread": summary["within_spread"],
            }
        ),
        flush=True,
    )


def summarize_existing(args: argparse.Namespace, argv: list[str] | None, epochs: int) -> None:
    """write_summary over the seeds in OUT that both sides have started: every curve cut to the epochs that all
    of those runs have reached, so that runs still going can be compared so far (wall times unknown: 0)."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for seed in args.seeds:
        workdir = os.path.join(args.out, "pmg_jax", f"seed{seed}")
        ref_out = os.path.join(args.out, "reference", f"seed{seed}.jsonl")
        if not (os.path.isfile(os.path.join(workdir, "metrics.jsonl")) and os.path.isfile(ref_out)):
            continue
        if not ckpt_lib.has_checkpoint(os.path.join(workdir, "checkpoints")):  # no epoch finished yet
            continue
        pair = {"pmg_jax": read_pmg(workdir, workdir + ".log"), "reference": read_reference(ref_out)}
        if all(r["curves"]["test_combined"] for r in pair.values()):
            for side in SIDES:
                runs[side].append({"seed": seed, "seconds": 0.0, **pair[side]})
    if not runs["pmg_jax"]:
        sys.exit(f"error: --out {args.out}: no seed of {args.seeds} has an evaluated epoch on both sides")
    reached = min(len(r["curves"]["test_combined"]) for rs in runs.values() for r in rs)
    for r in (r for rs in runs.values() for r in rs):
        r["curves"] = {c: v[:reached] for c, v in r["curves"].items()}
    write_summary(args, argv, runs, {"epochs": reached, "of_epochs": epochs})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = TINY if args.tiny else {}
    config = demo_config(overrides)
    check_config(config)
    if args.summarize:
        return summarize_existing(args, argv, config.num_epochs)
    for side in SIDES:
        os.makedirs(os.path.join(args.out, side), exist_ok=True)
    data = write_data(config, args.out)
    results: dict[tuple[str, int], dict] = {}
    lock = threading.Lock()

    def one_run(side: str, seed: int) -> None:
        """Train one side for one seed; the summary is rewritten over the seeds that both sides have finished."""
        if side == "pmg_jax":
            workdir = os.path.join(args.out, "pmg_jax", f"seed{seed}")
            seconds = run(pmg_command(config, overrides, data, workdir, seed), workdir + ".log")
            result = read_pmg(workdir, workdir + ".log")
        else:
            out = os.path.join(args.out, "reference", f"seed{seed}.jsonl")
            seconds = run(reference_command(config, data, out, seed), out[: -len(".jsonl")] + ".log")
            result = read_reference(out)
        final = {k: result["curves"][k][-1] for k in CURVES}
        with lock:
            results[side, seed] = {"seed": seed, "seconds": seconds, **result}
            print(json.dumps({"side": side, "seed": seed, "seconds": round(seconds, 1), "final": final}), flush=True)
            both = [s for s in args.seeds if all((side, s) in results for side in SIDES)]
            if seed in both:
                write_summary(args, argv, {side: [results[side, s] for s in both] for side in SIDES})

    # --jobs runs at a time, seed by seed (by default the two sides of a seed side by side): the reference with
    # one CPU thread, since its two-thread OpenMP slows down several times over on a busy machine, and pmg_jax
    # with XLA's own pool.
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one_run, side, seed) for seed in args.seeds for side in SIDES]
        for future in futures:
            try:
                future.result()
            except RuntimeError as e:
                for other in futures:
                    other.cancel()
                sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
