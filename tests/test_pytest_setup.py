"""The test command itself: the whole suite runs on two workers, one file or -p no:xdist runs in-process."""

import os
import subprocess
import sys

from conftest import ROOT
from pytest import mark as pytest_mark

ONE_TEST = "test_jigsaw.py::test_n2_reaches_exactly_the_six_four_cycles"


def pytest(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest_mark.slow  # collects the whole suite in a subprocess
def test_the_whole_suite_runs_on_two_workers():
    """Its fast tier, which takes the same path as the whole suite (no paths given: pytest's testpaths), the
    marker aside: the two cost the same to collect, so one is run."""
    done = pytest("-k", "test_n2_reaches_exactly_the_six_four_cycles", "-p", "no:cacheprovider", "-m", "not slow")
    assert done.returncode == 0, done.stdout[-2000:]
    assert "created: 2/2 workers" in done.stdout and "1 passed" in done.stdout


@pytest_mark.slow  # two pytest runs in fresh processes
def test_a_single_file_runs_in_process_and_keeps_the_users_flags():
    for extra in ((), ("-p", "no:xdist")):
        done = pytest(f"tests/{ONE_TEST}", "-q", *extra)
        assert done.returncode == 0, done.stdout[-2000:]
        assert "workers" not in done.stdout and "1 passed" in done.stdout.splitlines()[-1]


@pytest_mark.slow
def test_the_whole_suite_keeps_each_xdist_group_on_one_worker(tmp_path):
    """This conftest over a small suite: the four modules of one group run on one worker (each would otherwise
    make its own copy of a shared run), the ungrouped tests wherever."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    with open(os.path.join(ROOT, "tests", "conftest.py")) as f:
        (tmp_path / "tests" / "conftest.py").write_text(f.read())
    record = (
        "import os\n\ndef where(name):\n"
        "    with open(os.path.join(os.path.dirname(__file__), 'log'), 'a') as f:\n"
        "        f.write(f\"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n\")\n"
    )
    for m in "abcd":
        (tmp_path / "tests" / f"test_{m}.py").write_text(
            f"{record}import pytest\npytestmark = pytest.mark.xdist_group('shared')\n\n"
            + "".join(f"def test_{k}():\n    where('{m}{k}')\n\n" for k in range(3))
        )
    for m in "efghij":
        (tmp_path / "tests" / f"test_{m}.py").write_text(f"{record}\ndef test_x():\n    where('{m}')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "created: 2/2 workers" in done.stdout, done.stdout[-2000:]
    workers = dict(line.split() for line in (tmp_path / "tests" / "log").read_text().splitlines())
    assert len(workers) == 18
    assert len({w for name, w in workers.items() if name[0] in "abcd"}) == 1, workers
