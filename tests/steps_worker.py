"""Run a few real training iterations on whatever devices/processes this process sees; save params (process 0).

Used by the multi-host test: `python tests/steps_worker.py OUT.npz [coordinator num_processes process_id]`.
Float64, so that only the order of reductions can differ between layouts.
"""

import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)


def main(out: str, coordinator: str | None = None, num_processes: int = 1, process_id: int = 0) -> None:
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    from conftest import tiny_demo_config
    from flax.traverse_util import flatten_dict

    from pmg_jax import parallel
    from pmg_jax import state as state_lib
    from pmg_jax import steps as steps_lib
    from pmg_jax.data import pipeline, sources
    from pmg_jax.optim import make_optimizer

    config = tiny_demo_config(batch_size=16, **{"model.dtype": "float64", "data.crop_size": 64, "data.resize_size": 72})
    model = state_lib.create_model(config)
    tx = make_optimizer(lr_new=0.002, lr_backbone=0.0002, num_epochs=2, steps_per_epoch=10)
    mesh = parallel.make_mesh()
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype.kind == "f" else np.asarray(a), t)
    state = jax.device_put(
        f64(jax.device_get(state_lib.create_state(model, tx, 0, config.data.crop_size))), parallel.replicated(mesh)
    )
    step, _ = steps_lib.compile_steps(model, tx, config, mesh)
    layout = pipeline.host_layout(config.batch_size)
    _, batches = pipeline.train_batches(
        sources.make_source(config, "train"), state_lib.transform_spec(config), layout, seed=0, num_epochs=1
    )
    for _ in range(3):
        batch = next(batches)
        assert len(batch["label"]) == layout.local_batch  # each process loads only its share
        state, _ = step(state, pipeline.to_global(batch, parallel.batch_sharding(mesh)))
    params = {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(state.params)).items()}
    if jax.process_index() == 0:
        np.savez(out, devices=jax.device_count(), processes=jax.process_count(), **params)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *([args[1], int(args[2]), int(args[3])] if len(args) > 1 else []))
