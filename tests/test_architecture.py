"""The layering a notebook user relies on: inference modules load without the training loop, its steps or the
optimizer (import-linter checks the imports as written; this checks what importing actually loads)."""

import subprocess
import sys

import pytest
from conftest import ROOT

TRAINING = ("pmg_jax.loop", "pmg_jax.steps", "pmg_jax.optim")


@pytest.mark.parametrize(
    "module",
    [
        "pmg_jax.state",
        "pmg_jax.explain",
        "pmg_jax.predict",
        "pmg_jax.export",
        "pmg_jax.cli.explain",
        "pmg_jax.explain_history",
    ],
)
def test_importing_an_inference_module_loads_no_training_code(module):
    code = f"import sys, {module}; print(' '.join(m for m in {TRAINING!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [], f"importing {module} loaded {done.stdout.strip()}"
