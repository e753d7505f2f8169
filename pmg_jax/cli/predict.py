"""Batch prediction with a trained run: the top classes of image files, or accuracy on a split of its dataset.

  python -m pmg_jax.predict --ckpt runs/cub --images bird.jpg photos/ '*.png' [--top-k 5] [--out preds.csv]
  python -m pmg_jax.predict --ckpt runs/cub --split test [--out results/preds.jsonl]

Images get the checkpoint's own evaluation transform (resize, centre crop, normalise) and run in fixed-size
batches (the last one padded) through one jitted function, the batch sharded over every local device.
"combined" is the softmax of the run's prediction (the sum of PMG's four heads' logits, or of PMG-V2's three);
--heads adds each head's own softmax. --out's extension picks the format (.csv or .jsonl; default: a table on stdout).
Unreadable files are reported on stderr and written with an `error` field; the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
from tqdm import tqdm

from pmg_jax import predict
from pmg_jax.cli import common
from pmg_jax.data import sources
from pmg_jax.errors import OutputError, check_writable
from pmg_jax.state import Restored

PROG = "pmg_jax.predict"  # how its messages start (run as python -m pmg_jax.predict)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_checkpoint_flags(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="image files, directories and glob patterns")
    what.add_argument("--split", choices=sources.SPLITS, help="predict this split of the checkpoint's dataset")
    p.add_argument("--top-k", type=int, default=5, help="classes per image and output (default 5)")
    p.add_argument(
        "--out",
        help="preds.csv or preds.jsonl (default: a table on stdout); with --split its folder "
        "also gets the confusion matrix",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per jitted batch, a multiple of the local devices (default: the checkpoint's eval batch)",
    )
    p.add_argument("--heads", action="store_true", help="also the top classes of each head")
    common.add_max_pixels_option(p)
    args = p.parse_args(argv)
    if args.out is not None and os.path.splitext(args.out)[1].lower() not in predict.FORMATS:
        p.error(f"--out {args.out}: the extension must be .csv or .jsonl")
    if args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    return args


def _predict_images(args: argparse.Namespace, predictor: predict.Predictor, writer: predict.RowWriter) -> int:
    """Predict --images, row by row; status 1 when none could be read."""
    paths, problems = sources.collect_images(args.images)
    for problem in problems:
        print(f"skipping {problem}", file=sys.stderr)
    k = min(args.top_k, len(predictor.class_names))
    read = 0
    with tqdm(total=len(paths), unit="image", desc="predict", dynamic_ncols=True) as bar:
        for row in predict.predict_files(predictor, paths, k=k, heads=args.heads):
            if "error" in row:
                tqdm.write(f"unreadable: {row['path']}: {row['error']}", file=sys.stderr)
            read += "error" not in row
            writer.write(row)
            bar.update(1)
    if not read:
        print(f"{PROG}: none of the {len(paths)} inputs could be read as an image", file=sys.stderr)
        return 1
    print(f"predicted {read} of {len(paths)} images" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _predict_split(args: argparse.Namespace, predictor: predict.Predictor, writer: predict.RowWriter | None) -> int:
    """Predict --split: the accuracy tables and the confusion matrix; status 1 when no example could be read."""
    r = predictor.restored
    with tqdm(unit="image", desc=f"predict {args.split}", dynamic_ncols=True) as bar:
        result = predict.predict_split(
            predictor,
            args.split,
            k=min(args.top_k, len(r.class_names)),
            heads=args.heads,
            on_row=writer.write if writer else None,
            progress=bar.update,
        )
    title = f"{r.config.dataset.name} {args.split} with {r.run} step {r.step}"
    print(predict.format_accuracy(result, r.class_names, title))
    path = os.path.join(_confusion_folder(args, r), f"confusion_{args.split}.csv")
    predict.write_confusion(path, result.confusion, r.class_names)
    print(f"confusion matrix (combined) -> {path}")
    return 0 if result.counts.sum() else 1


def _confusion_folder(args: argparse.Namespace, restored: Restored) -> str:
    """Where --split writes its confusion matrix: beside --out, else in the run."""
    return os.path.dirname(os.path.abspath(args.out)) if args.out else restored.run


def check_outputs(args: argparse.Namespace, restored: Restored) -> None:
    """Every file the command will write can be written, checked before any work (one line if not)."""
    if args.out:
        check_writable(os.path.dirname(os.path.abspath(args.out)), "pass --out FILE in a folder you can write")
        if os.path.isdir(args.out):
            raise OutputError(f"cannot write {args.out}: it is a directory: pass --out FILE")
    if args.split:
        check_writable(_confusion_folder(args, restored), "pass --out FILE: the confusion matrix goes beside it")


def _predict(args: argparse.Namespace) -> int:
    """Restore, check the outputs, then predict the images or the split; returns the exit status."""
    restored = common.restore(args, PROG)
    check_outputs(args, restored)
    predictor = predict.make_predictor(restored, args.batch_size)
    print(f"batch {predictor.batch_size} over {jax.local_device_count()} device(s)", file=sys.stderr)
    outputs = predictor.outputs if args.heads else predictor.outputs[:1]
    k = min(args.top_k, len(restored.class_names))
    writer = predict.RowWriter(args.out, k, outputs, with_label=bool(args.split))
    try:
        if args.split:
            return _predict_split(args, predictor, writer if args.out else None)
        return _predict_images(args, predictor, writer)
    finally:
        writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    common.quiet_logging()
    return common.status(PROG, lambda: _predict(args))


def run() -> None:
    """The console script: exit with main's status."""
    sys.exit(main())
