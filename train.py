"""Train PMG: python train.py --config configs/cub.py [--workdir runs/cub] [--config.batch_size=32 ...]

Evaluate a checkpoint instead: --config.eval_only=True [--config.init.checkpoint=RUN_OR_CKPT].
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cub.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory for checkpoints and metrics (default: runs/<config name>).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from pmg_jax import convert, parallel, train_lib, validate
    from pmg_jax.data import slots

    path = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.isfile(path):
        sys.exit(f"error: --config {path}: no such config file (see configs/)")
    config = FLAGS.config
    name = os.path.splitext(os.path.basename(path))[0]
    workdir = FLAGS.workdir or os.path.join("runs", name)
    try:
        parallel.maybe_initialize_distributed()
        train_lib.train_and_evaluate(config, workdir)
    except (validate.ConfigError, FloatingPointError, FileNotFoundError, convert.ConversionError,
            slots.SharedMemoryTooSmall) as e:
        sys.exit(f"error: {e}")  # one line, exit status 1 (config errors come before any work)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad or misspelt --config.* override reported in one line."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e).encode().decode("unicode_escape").replace("'", "")
        sys.exit("error: " + " ".join(line.strip() for line in text.splitlines() if line.strip()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
