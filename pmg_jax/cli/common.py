"""What the command lines share: restoring the checkpoint a user pointed at, and saying which it was."""

from __future__ import annotations

import os
import sys

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import state as state_lib


def restore(path: str, which: str, prog: str) -> state_lib.Restored:
    """The checkpoint at `path` (a run, a folder of runs, a run's checkpoints/ or one step), announced in one
    line; when a folder of runs was given, says which run it picked, and warns when that run is unfinished."""
    restored = state_lib.restore(path, which)
    picked = os.path.abspath(path) not in (restored.run, os.path.join(restored.run, "checkpoints")) and \
        os.path.dirname(os.path.abspath(path)) != os.path.join(restored.run, "checkpoints")
    if picked:
        print(f"{path} is a folder of runs: using the one with the newest checkpoint, {restored.run}")
    print(f"using {restored.describe()}")
    if not restored.finished:
        print(f"{prog}: warning: {restored.run} is unfinished (stopped at epoch {restored.meta.get('epoch')} of "
              f"{restored.config.num_epochs}); its maps may not be what the trained model shows", file=sys.stderr)
    if which == "latest" and ckpt_lib.Checkpoints(os.path.join(restored.run, "checkpoints"),
                                                  read_only=True).best_step() not in (None, restored.step):
        print("(the latest checkpoint; --checkpoint best takes the one with the best combined accuracy)")
    return restored
