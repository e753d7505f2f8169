"""Data parallelism: the same global batch on a 4-device mesh and on 1 device gives the same training."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from flax.traverse_util import flatten_dict
    from conftest import tiny_demo_config
    from pmg_jax import parallel
    from pmg_jax import state as state_lib
    from pmg_jax import steps as steps_lib
    from pmg_jax.data import pipeline, sources
    from pmg_jax.optim import make_optimizer

    assert jax.device_count() == 4, jax.devices()
    config = tiny_demo_config(batch_size=16, **{"model.dtype": "float64", "data.crop_size": 64, "data.resize_size": 72})
    f64 = lambda t: jax.tree.map(
        lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a), t)
    model = state_lib.create_model(config)
    tx = make_optimizer(lr_new=0.002, lr_backbone=0.0002, num_epochs=2, steps_per_epoch=10)  # reference rates
    src = sources.make_source(config, "train")
    _, it = pipeline.train_batches(src, state_lib.transform_spec(config), pipeline.host_layout(16), seed=0,
                                   num_epochs=1)
    batches = [f64(next(it)) for _ in range(3)]
    init = f64(jax.device_get(state_lib.create_state(model, tx, 0, config.data.crop_size)))

    def run(devices):
        mesh = parallel.make_mesh(devices)
        state = jax.device_put(init, parallel.replicated(mesh))
        step, _ = steps_lib.compile_steps(model, tx, config, mesh)
        for b in batches:
            state, metrics = step(state, pipeline.to_global(b, parallel.batch_sharding(mesh)))
        shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state)}
        return jax.device_get(state), shardings

    s4, shard4 = run(jax.devices())
    s1, _ = run(jax.devices()[:1])
    diff = {}
    for name in ("params", "batch_stats", "opt_state"):
        a, b = jax.tree.leaves(getattr(s4, name)), jax.tree.leaves(getattr(s1, name))
        diff[name] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(init.params)))
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(s4.params)})
    print(json.dumps({"diff": diff, "moved": moved, "shardings": sorted(shard4), "dtypes": dtypes}))
""")


@pytest.mark.slow
def test_four_devices_match_one_device():
    """Run in float64 so that only the order of reductions can differ; then the match must be tight.

    (In float32 the two runs drift apart within a few iterations of a from-scratch tiny
    net: max-pool argmax flips amplify 1e-7 rounding differences. Float64 removes that
    noise, so any real difference - BN statistics or gradients not reduced over the
    global batch - would show far above the tolerance.)
    """
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtypes"] == ["float64"]
    assert result["moved"] > 1e-3  # the iterations really trained
    for name in ("params", "batch_stats", "opt_state"):
        assert result["diff"][name] < 1e-8, result
    assert result["shardings"] == ["P()"]  # the state stays replicated


def test_one_process_makes_a_data_mesh_over_its_devices_and_needs_no_coordinator(monkeypatch):
    """The mesh and shardings every run uses (the fast tier's look at pmg_jax.parallel; the test above trains)."""
    import jax

    from pmg_jax import parallel

    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count()} and "1 process(es)" in parallel.describe(mesh)
    assert parallel.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not parallel.maybe_initialize_distributed()  # nothing asks for several processes
