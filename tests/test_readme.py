"""The README's commands work as written, on a fresh clone, in order: its Quick start and its "Use a trained
model" section. The README cannot rot: a command added to those code blocks is run here.

Two departures, both stated here: the demo training command gets TINY_DEMO appended (the same run, made
small enough for CI), and the test command gets --collect-only (running the suite from inside itself
would recurse); install commands run in a fresh virtual environment that sees this one's packages, so
nothing is downloaded and this environment is left alone.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme")]
SECTIONS = ("Quick start", "Use a trained model")
TINY_DEMO = ["--config.num_epochs=2", "--config.dataset.demo_train_size=256", "--config.dataset.demo_test_size=64"]


def readme_commands(text: str, section: str) -> list[str]:
    """The shell commands of the ```bash blocks of one '## <section>' of the README (comments dropped)."""
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {section}' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", match.group(1), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def snapshot(dest: str) -> str:
    """A git repository holding this working tree's files (tracked and untracked, not ignored), to clone."""
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "s"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def test_readme_commands_work_on_a_fresh_clone(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    quick, use = (readme_commands(text, s) for s in SECTIONS)
    assert quick[0].startswith("git clone <this repository> ") and " && cd " in quick[0], quick[0]
    source = snapshot(str(tmp_path / "source"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    cwd = str(tmp_path)
    ran = []
    for command in quick + use:
        command = command.replace("<this repository>", source)
        if command.startswith("python train.py --config configs/demo.py"):
            command += " " + " ".join(TINY_DEMO)
        if command.startswith("python -m pytest"):  # the whole suite and its fast tier: collected, not run
            command += " --collect-only -q"
        # `cd` in a command moves the rest of the sequence, as in a shell session
        done = subprocess.run(
            f"{command} && pwd", shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        cwd = done.stdout.strip().splitlines()[-1]
        ran.append((command, done.stdout))
    repo = os.path.join(str(tmp_path), "pmg_jax")
    assert cwd == repo
    assert glob.glob(os.path.join(repo, "runs", "demo", "checkpoints", "*"))
    # `explain.py --ckpt runs/ --block 3` explained a sample of the run's own test split
    explain_out = [out for command, out in ran if shlex.split(command)[:2] == ["python", "explain.py"]]
    assert explain_out and "no --images: explaining 16 examples" in explain_out[0]
    overlays = glob.glob(os.path.join(repo, "runs", "demo", "explain", "conv_block3_test_*.jpg"))
    assert len(overlays) == 16
    collected = [out for command, out in ran if command.startswith("python -m pytest")]
    assert collected and re.search(r"(\d+) tests collected", collected[0])
