"""Data parallelism, across devices and across hosts: two processes with 2 CPU devices each (jax.distributed,
local coordinator), one process with 4 and one device alone train alike on the same global batches."""

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


def test_one_process_makes_a_data_mesh_over_its_devices_and_needs_no_coordinator(monkeypatch):
    """The mesh and shardings every run uses (the fast tier's look at pmg_jax.parallel; the test below trains)."""
    import jax

    from pmg_jax import parallel

    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count()} and "1 process(es)" in parallel.describe(mesh)
    assert parallel.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not parallel.maybe_initialize_distributed()  # nothing asks for several processes


@pytest.mark.slow
def test_two_processes_four_devices_and_one_device_train_alike(tmp_path):
    """Float64, so that only the order of reductions can differ; then the match must be tight.

    (In float32 the runs drift apart within a few iterations of a from-scratch tiny net: max-pool argmax flips
    amplify 1e-7 rounding differences. Float64 removes that noise, so any real difference - BatchNorm statistics
    or gradients not reduced over the global batch, a process training on another's share - would show far above
    the tolerance.)"""
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
        [sys.executable, WORKER, single, "--one-device-too"],
        env=env_with_devices(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = np.load(multi), np.load(single)
    assert (int(a["devices"]), int(a["processes"])) == (4, 2)
    assert (int(b["devices"]), int(b["processes"])) == (4, 1)
    assert list(a["specs"]) == list(b["specs"]) == ["P()"]  # the state stays replicated
    trained = [k for k in b.files if k.startswith(("['params']", "['batch_stats']", "['opt_state']"))]
    assert sorted(trained) == sorted(k for k in a.files if k.startswith("[")) and any("opt_state" in k for k in trained)
    assert sorted(f"one/{k}" for k in trained) == sorted(k for k in b.files if k.startswith("one/"))
    assert {str(b[k].dtype) for k in trained if "params" in k} == {"float64"}
    moved = max(float(np.abs(b[k] - b[f"init/{k}"]).max()) for k in trained if k.startswith("['params']"))
    assert moved > 1e-3  # the iterations really trained
    for k in trained:
        tight = 1e-9 if k.startswith("['params']") else 1e-8  # the parameters as tight as before
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tight, err_msg=f"two processes vs four devices: {k}")
        np.testing.assert_allclose(b[f"one/{k}"], b[k], rtol=0, atol=1e-8, err_msg=f"one device vs four: {k}")
