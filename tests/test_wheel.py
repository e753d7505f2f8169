"""The library works installed as a wheel, away from the repository: convert a PyTorch PMG, restore it, explain it.

The wheel is built from this checkout and installed (without its dependencies, which the fresh virtual
environment sees from this one) into a new virtual environment; every command then runs from a
directory outside the repository, so nothing can come from the checkout by accident.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import bench.torch_reference as ref

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme")]


def run(args: list[str], cwd: str, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_converts_restores_and_explains_outside_the_repository(tmp_path):
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), ROOT],
        str(tmp_path),
        env,
    )
    wheel = glob.glob(str(dist / "pmg_jax-*.whl"))
    assert len(wheel) == 1
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], str(tmp_path), env)
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "--no-deps", wheel[0]], str(work), env)
    where = run([python, "-c", "import pmg_jax; print(pmg_jax.__file__)"], str(work), env).strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout's

    # a PMG in the reference's PyTorch format, for the demo's 8 classes
    model = ref.PMG(ref.make_resnet("resnet50", 8, (1, 1, 1, 1)), feature_size=16, num_classes=8)
    torch.save(model.state_dict(), work / "model.pth")
    out = run([python, "-m", "pmg_jax.convert", "model.pth", "--out", "run", "--dataset", "demo"], str(work), env)
    assert "class names: the demo class list" in out
    restored = run(
        [
            python,
            "-c",
            "from pmg_jax import state; r = state.restore('run'); "
            "print(r.step, len(r.class_names), r.config.data.crop_size)",
        ],
        str(work),
        env,
    )
    assert restored.split() == ["0", "8", "96"]
    out = run([str(venv / "bin" / "pmg-explain"), "--ckpt", "run", "--block", "3", "--num-images", "4"], str(work), env)
    assert "no --images: explaining 4 examples" in out
    assert len(glob.glob(str(work / "run" / "explain" / "conv_block3_test_*.jpg"))) == 4
