"""Two processes with 2 CPU devices each (jax.distributed, local coordinator) train like one process with 4."""

import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "steps_worker.py")


def env_with_devices(n: int) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    port = portpicker.pick_unused_port()
    multi = str(tmp_path / "multi.npz")
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, multi, f"localhost:{port}", "2", str(i)],
            env=env_with_devices(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = str(tmp_path / "single.npz")
    done = subprocess.run(
        [sys.executable, WORKER, single], env=env_with_devices(4), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = np.load(multi), np.load(single)
    assert (int(a["devices"]), int(a["processes"])) == (4, 2)
    assert (int(b["devices"]), int(b["processes"])) == (4, 1)
    names = [k for k in a.files if k not in ("devices", "processes")]
    assert names and sorted(names) == sorted(k for k in b.files if k not in ("devices", "processes"))
    for k in names:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-9, err_msg=k)
