"""What the inference commands (explain, predict, export) and convert share: the checkpoint flags, restoring and
announcing a checkpoint, --max-pixels, quiet third-party logging, and a user's error as one line with status 1."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import state as state_lib
from pmg_jax.data import decode
from pmg_jax.errors import PMGError


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """--ckpt (a run, a folder of runs or a step directory) and --checkpoint (one of checkpoint.WHICH)."""
    p.add_argument("--ckpt", required=True, help="run dir, folder of runs (the newest), or checkpoint step dir")
    p.add_argument(
        "--checkpoint",
        choices=ckpt_lib.WHICH,
        default=ckpt_lib.WHICH[0],
        help="which checkpoint of a run (ignored for a step dir)",
    )


def add_max_pixels_option(p: argparse.ArgumentParser) -> None:
    """The --max-pixels option (predict and explain): the cap on an image's pixels, over the checkpoint's."""
    p.add_argument(
        "--max-pixels",
        type=_pixel_cap,
        help="refuse (report and skip) images with more pixels than this, read from their header before "
        f"decoding (default: the checkpoint's data.max_image_pixels, normally {decode.DEFAULT_MAX_PIXELS}; "
        f"at most {decode.OPENCV_MAX_PIXELS}, OpenCV's own limit)",
    )


def _pixel_cap(text: str) -> int:
    """A --max-pixels value: a whole number from 1 to OpenCV's limit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if not 1 <= value <= decode.OPENCV_MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and {decode.OPENCV_MAX_PIXELS}")
    return value


def apply_max_pixels(restored: state_lib.Restored, max_pixels: int | None) -> None:
    """Make --max-pixels, when given, the restored config's cap (which every decode of the command reads)."""
    if max_pixels is not None:
        restored.config.data.max_image_pixels = max_pixels


def quiet_logging() -> None:
    """Only absl's errors (orbax logs each restore through it): the commands say themselves what they did."""
    logging.getLogger("absl").setLevel(logging.ERROR)


def error_line(prog: str | None, error: BaseException) -> str:
    """How every command shows a user's error: 'PROG: error: MESSAGE' (or 'error: MESSAGE'), one line."""
    return f"{prog}: error: {error}" if prog else f"error: {error}"


def status(prog: str, body: Callable[[], int]) -> int:
    """body()'s exit status; a PMGError (checkwritable's OutputError among them) printed as one line on stderr and
    status 1 (for a `main` that returns its status)."""
    try:
        return body()
    except PMGError as e:
        print(error_line(prog, e), file=sys.stderr)
        return 1


@contextlib.contextmanager
def exit_on_error(prog: str | None, *also: type[Exception]) -> Iterator[None]:
    """A PMGError (or one of `also`) raised inside ends the process with its one line and status 1 (for a `main`
    that exits, as convert and train do)."""
    try:
        yield
    except (PMGError, *also) as e:
        raise SystemExit(error_line(prog, e)) from None


def restore_and_report(path: str, which: str, prog: str) -> state_lib.Restored:
    """`state.restore` for a command line: announces the checkpoint in one line, says which run a folder of runs
    resolved to, warns (on stderr) when that run is unfinished, and notes when a better checkpoint exists."""
    restored = state_lib.restore(path, which)
    given = os.path.abspath(path)
    if given not in (restored.run, os.path.join(restored.run, "checkpoints")) and os.path.dirname(
        given
    ) != os.path.join(restored.run, "checkpoints"):
        print(f"{path} is a folder of runs: using the one with the newest checkpoint, {restored.run}")
    print(f"using {restored.describe()}")
    ckpts = ckpt_lib.Checkpoints(os.path.join(restored.run, "checkpoints"), read_only=True)
    # the run, not the chosen checkpoint: a finished run's best checkpoint may well be of an earlier epoch
    latest = restored.meta
    if restored.step != ckpts.latest_step():
        try:
            latest = ckpts.meta()
        except ckpt_lib.CheckpointDamaged:  # restore fell back past it, and has said so
            pass
    if not state_lib.run_finished(latest, restored.config.num_epochs):
        print(
            f"{prog}: warning: {restored.run} is unfinished (stopped at epoch {latest.get('epoch')} of "
            f"{restored.config.num_epochs})",
            file=sys.stderr,
        )
    best = ckpts.best_step()
    if which == "latest" and best not in (None, restored.step):
        print(f"(the latest checkpoint; --checkpoint best takes step {best}, the best combined accuracy)")
    return restored


def restore(args: argparse.Namespace, prog: str) -> state_lib.Restored:
    """The checkpoint of --ckpt/--checkpoint, announced, with --max-pixels (where the command has it) applied."""
    restored = restore_and_report(args.ckpt, args.checkpoint, prog)
    apply_max_pixels(restored, getattr(args, "max_pixels", None))
    return restored
