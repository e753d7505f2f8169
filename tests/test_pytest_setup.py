"""The test command itself: the whole suite runs on two workers, one file or -p no:xdist runs in-process."""

import os
import subprocess
import sys

from conftest import ROOT

ONE_TEST = "test_jigsaw.py::test_n2_reaches_exactly_the_six_four_cycles"


def pytest(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_whole_suite_runs_on_two_workers():
    done = pytest("-k", "test_n2_reaches_exactly_the_six_four_cycles", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout[-2000:]
    assert "created: 2/2 workers" in done.stdout and "1 passed" in done.stdout


def test_a_single_file_runs_in_process_and_keeps_the_users_flags():
    for extra in ((), ("-p", "no:xdist")):
        done = pytest(f"tests/{ONE_TEST}", "-q", *extra)
        assert done.returncode == 0, done.stdout[-2000:]
        assert "workers" not in done.stdout and "1 passed" in done.stdout.splitlines()[-1]
