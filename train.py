"""Train PMG: python train.py --config configs/cub.py [--workdir runs/cub] [--config.batch_size=32 ...]"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from pmg_jax import parallel, train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cub.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory for checkpoints and metrics (default: runs/<config name>).")


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    parallel.maybe_initialize_distributed()
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0])
    train_lib.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    flags.mark_flags_as_required(["config"])
    app.run(main)
