"""One image's block maps over a run's epochs, in one strip figure (from the CAMs a run logs with config.log_cams).

  python -m pmg_jax.explain_history --run runs/demo --image 0            # writes runs/demo/cams/history_0.png

--run is a run directory or a folder of runs (the one with the newest checkpoint). --image picks one of the
images the run logged (0 to log_cams - 1: test images spread over the split). Rows are the maps (blocks 1-3 and
the concat map), columns the evaluations in order; each tile is titled with its head's top class then.
"""

from __future__ import annotations

import argparse
import os

from pmg_jax import cam_log, explain_history, viz
from pmg_jax.cli import common

PROG = "pmg_jax.explain_history"


def main(argv: list[str] | None = None) -> None:
    """Run the command; a run without logged CAMs (or an output that cannot be written) exits with one line."""
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory, or a folder of runs (the newest is used)")
    p.add_argument("--image", type=int, default=0, help="which logged image (0 to log_cams - 1)")
    p.add_argument("--out", default="", help="PNG to write (default <run>/cams/history_<image>.png)")
    args = p.parse_args(argv)
    with common.exit_on_error(None, OSError):
        run = explain_history.find_run(args.run)
        history = explain_history.read_history(run)
        figure = explain_history.strip(history, args.image)
        out = args.out or os.path.join(run, cam_log.FOLDER, f"history_{args.image}.png")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        viz.write_image(out, figure)
    print(f"wrote {out}: {len(history)} evaluations of {run}")
