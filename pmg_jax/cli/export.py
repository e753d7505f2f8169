"""Export a trained run as one function of uint8 images, as StableHLO (jax.export) or ONNX, with a model card.

  python -m pmg_jax.export --ckpt runs/cub --format stablehlo --out exported/cub
  python -m pmg_jax.export --ckpt runs/cub --format onnx --out exported/cub_onnx     # needs pmg_jax[onnx]

The function takes RGB uint8 images, NHWC, already resized and centre-cropped to the crop size (the caller
resizes: DIR/model.json says how), with any batch size, and returns the softmax of the sum of the four
heads' logits ('probabilities') and the four logits. Normalisation happens inside. DIR/model.json holds the
class names, sizes, mean/std, input and outputs and the source.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pmg_jax import export
from pmg_jax.cli import common
from pmg_jax.errors import check_writable

PROG = "pmg_jax.export"  # how its messages start (run as python -m pmg_jax.export)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_checkpoint_flags(p)
    p.add_argument("--format", required=True, choices=tuple(export.FORMATS), help="stablehlo (jax.export) or onnx")
    p.add_argument("--out", required=True, help="output directory (gets the model file and model.json)")
    return p.parse_args(argv)


def _export(args: argparse.Namespace) -> int:
    """Restore, check --out, export; says what was written and what the caller must do to an image."""
    restored = common.restore(args, PROG)
    check_writable(args.out, "pass --out DIR")
    path = export.export(restored, args.format, args.out)
    data = restored.config.data
    print(
        f"exported {restored.run} step {restored.step} as {args.format} -> {path} (and model.json); the caller "
        f"resizes to {data.resize_size} and centre-crops {data.crop_size}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    common.quiet_logging()
    return common.status(PROG, lambda: _export(args))


def run() -> None:
    """The console script: exit with main's status."""
    sys.exit(main())
