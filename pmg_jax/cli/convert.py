"""Convert one PyTorch/safetensors/npz PMG or PMG-V2 file into a run directory that explain, predict and export restore.

  python -m pmg_jax.convert model.pth --out runs/pmg_cub --dataset cub

The architecture (method, backbone, width, feature size, classes) is read from the weights (the method from its
keys: PMG-V2's blocks have conv biases and it has no concat head); --method says it instead; --backbone,
--feature-size and --num-classes are checks against it. Files are read by content and never run code (docs/convert.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pmg_jax import config as config_lib
from pmg_jax import convert, methods
from pmg_jax.cli import common
from pmg_jax.errors import check_writable

PROG = "pmg_jax.convert"  # how its messages start (run as python -m pmg_jax.convert)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="model.pth (state dict or whole pickled model), .safetensors or .npz")
    p.add_argument("--out", required=True, help="new run directory to write (e.g. runs/pmg_cub)")
    p.add_argument(
        "--dataset",
        help=f"dataset preset for the config and class names: {', '.join(config_lib.DATASETS)} (default: none)",
    )
    p.add_argument("--data-dir", help="where the dataset lives, to read its class names")
    p.add_argument("--num-classes", type=int, help="expected classes (default: read from the heads)")
    p.add_argument("--backbone", help="expected backbone, e.g. resnet50 (default: read from the weights)")
    p.add_argument("--feature-size", type=int, help="expected block feature size (default: from the weights)")
    p.add_argument("--method", choices=tuple(methods.METHODS), help="the weights' method (default: from their keys)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command; a refusal (or a file that cannot be read or written) exits with one line and status 1."""
    args = parse_args(argv)
    with common.exit_on_error(PROG, OSError):
        check_writable(args.out, "pass --out DIR")
        done = convert.convert_to_run(
            args.src,
            args.out,
            dataset=args.dataset,
            num_classes=args.num_classes,
            backbone=args.backbone,
            feature_size=args.feature_size,
            data_dir=args.data_dir,
            method=args.method,
        )
    a = done.architecture
    print(
        f"converted {args.src}: {methods.get(a.method).title} {a.backbone} (width {a.width}, "
        f"feature size {a.feature_size}, {a.num_classes} classes) -> {done.checkpoint_dir}"
    )
    print(f"class names: {done.class_names_origin}")
    print(f"use it with: python explain.py --ckpt {args.out}")
