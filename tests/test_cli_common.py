"""pmg_jax.cli.common without a trained run (the fast tier's check of it): the shared checkpoint and --max-pixels
flags, and a user's error shown as one line with status 1."""

import argparse

import pytest

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax.cli import common
from pmg_jax.data import decode
from pmg_jax.errors import PMGError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prog", exit_on_error=False)
    common.add_checkpoint_flags(p)
    common.add_max_pixels_option(p)
    return p


def test_checkpoint_flags_offer_the_checkpoints_a_run_has_and_default_to_the_latest():
    args = parser().parse_args(["--ckpt", "runs/x"])
    assert (args.ckpt, args.checkpoint, args.max_pixels) == ("runs/x", ckpt_lib.WHICH[0], None)
    for which in ckpt_lib.WHICH:
        assert parser().parse_args(["--ckpt", "r", "--checkpoint", which]).checkpoint == which
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'first'"):
        parser().parse_args(["--ckpt", "r", "--checkpoint", "first"])


@pytest.mark.parametrize("text", ["0", "many", str(decode.OPENCV_MAX_PIXELS + 1)])
def test_max_pixels_takes_a_whole_number_up_to_opencvs_limit(text):
    assert parser().parse_args(["--ckpt", "r", "--max-pixels", "1000"]).max_pixels == 1000
    with pytest.raises(argparse.ArgumentError, match="max-pixels"):
        parser().parse_args(["--ckpt", "r", "--max-pixels", text])


def test_a_users_error_is_one_line_with_status_one(capsys):
    def fails() -> int:
        raise PMGError("cannot write runs/x: pass --out DIR")

    assert common.status("prog", lambda: 0) == 0
    assert common.status("prog", fails) == 1
    assert capsys.readouterr().err == "prog: error: cannot write runs/x: pass --out DIR\n"
    with pytest.raises(SystemExit, match="^error: bad$"), common.exit_on_error(None, OSError):
        raise OSError("bad")
    with pytest.raises(KeyError), common.exit_on_error("prog"):
        raise KeyError("not a user's error")
