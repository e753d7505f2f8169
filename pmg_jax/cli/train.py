"""Train PMG: python train.py --config configs/cub.py [--workdir runs/cub] [--config.batch_size=32 ...]

Evaluate a checkpoint instead: --config.eval_only=True [--config.init.checkpoint=RUN_OR_CKPT].
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pmg_jax import runguard

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cub.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory for checkpoints and metrics (default: runs/<config name>).")
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
INTERRUPTS = runguard.Interrupts()  # installed by main before anything slow, so that Ctrl-C is handled at once


def usage() -> str:
    """--help: the command, its two flags, and where every config field is documented (with the defaults)."""
    from flax.traverse_util import flatten_dict

    from pmg_jax import config as config_lib

    fields = flatten_dict(config_lib.get_config().to_dict())
    width = max(len(".".join(k)) for k in fields)
    lines = [
        __doc__.strip(),
        "",
        "flags:",
        "  --config FILE          an experiment config (configs/*.py; FILE:ARG passes ARG to its get_config)",
        "  --workdir DIR          where checkpoints and metrics go (default: runs/<config file name>)",
        "  --config.FIELD=VALUE   override any config field (repeatable)",
        "",
        "config fields and their defaults (pmg_jax/config.py documents each one):",
    ]
    lines += [f"  {'.'.join(k):<{width}}  {v!r}" for k, v in fields.items()]
    return "\n".join(lines)


def unknown_override(argv: list[str]) -> str | None:
    """The first --config.A.B=V of `argv` naming a field the config does not have, said with its section's
    fields (pmg_jax/config.py's fields: every config file sets those and no others); None if there is none."""
    from pmg_jax import config as config_lib

    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        node, path = config_lib.get_config(), arg[len("--config.") :].split("=", 1)[0].split(".")
        for depth, key in enumerate(path):
            section = ".".join(path[:depth]) or "the config"
            if not hasattr(node, "keys"):
                return f"--config.{'.'.join(path)}: {section} is a value, not a section with field {key!r}"
            if key not in node:
                return f"--config.{'.'.join(path)}: {section} has no field {key!r}; its fields: {', '.join(node)}"
            node = node[key]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad or misspelt --config.* override reported in one line (an unknown field with
    the fields of its section, and absl's nearest match when it has one)."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e).encode().decode("unicode_escape").replace("'", "")
        said = " ".join(line.strip() for line in text.splitlines() if line.strip())
        unknown = unknown_override(argv)
        if unknown is not None:
            hint = said[said.find("Did you mean") :] if "Did you mean" in said else ""
            said = f"{unknown}{' (' + hint + ')' if hint else ''}"
        sys.exit("error: " + said)


def _main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from pmg_jax import loop, parallel
    from pmg_jax.cli import common

    path = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.isfile(path):
        sys.exit(f"error: --config {path}: no such config file (see configs/)")
    name = os.path.splitext(os.path.basename(path))[0]
    workdir = FLAGS.workdir or os.path.join("runs", name)
    with common.exit_on_error(None):  # one line, exit status 1 (refusals come before anything is written)
        parallel.maybe_initialize_distributed()
        loop.train_and_evaluate(FLAGS.config, workdir, INTERRUPTS)


def main(argv: list[str] | None = None) -> None:
    """Run train.py with `argv` (default sys.argv); exits with the status."""
    argv = sys.argv if argv is None else argv
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(usage())
        sys.exit(0)
    flags.mark_flags_as_required(["config"])
    with INTERRUPTS:
        app.run(_main, argv=argv, flags_parser=parse_flags)
