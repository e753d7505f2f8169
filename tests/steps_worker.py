"""Run a few real training iterations on whatever devices/processes this process sees; save the state (process 0).

Used by the multi-host test: `python tests/steps_worker.py OUT.npz [coordinator num_processes process_id]`, or
`python tests/steps_worker.py OUT.npz --one-device-too` to train the same iterations a second time on the first
device alone (one process, one compilation of each layout) and save that state too, its names prefixed `one/`.
Float64, so that only the order of reductions can differ between layouts.
"""

import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)


def main(out: str, coordinator: str | None = None, num_processes: int = 1, process_id: int = 0, one_too=False) -> None:
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    from conftest import tiny_demo_config

    from pmg_jax import parallel
    from pmg_jax import state as state_lib
    from pmg_jax import steps as steps_lib
    from pmg_jax.data import pipeline, sources
    from pmg_jax.optim import make_optimizer

    config = tiny_demo_config(batch_size=16, **{"model.dtype": "float64", "data.crop_size": 64, "data.resize_size": 72})
    model = state_lib.create_model(config)
    tx = make_optimizer(lr_new=0.002, lr_backbone=0.0002, num_epochs=2, steps_per_epoch=10)  # reference rates
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype.kind == "f" else np.asarray(a), t)
    init = f64(jax.device_get(state_lib.create_state(model, tx, 0, config.data.crop_size)))
    layout = pipeline.host_layout(config.batch_size)
    _, batches = pipeline.train_batches(
        sources.make_source(config, "train"), state_lib.transform_spec(config), layout, seed=0, num_epochs=1
    )
    local = [next(batches) for _ in range(3)]
    assert all(len(b["label"]) == layout.local_batch for b in local)  # each process loads only its share

    def train(devices):
        mesh = parallel.make_mesh(devices)
        state = jax.device_put(init, parallel.replicated(mesh))
        step, _ = steps_lib.compile_steps(model, tx, config, mesh)
        for batch in local:
            state, _ = step(state, pipeline.to_global(batch, parallel.batch_sharding(mesh)))
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state)})
        leaves = jax.tree_util.tree_leaves_with_path(
            {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
        )
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.device_get(leaves)}, specs

    saved, specs = train(None)
    start = jax.tree_util.tree_leaves_with_path({"params": init.params})
    saved.update({f"init/{jax.tree_util.keystr(k)}": v for k, v in start})
    if one_too:
        one, _ = train(jax.devices()[:1])
        saved.update({f"one/{k}": v for k, v in one.items()})
    if jax.process_index() == 0:
        np.savez(out, devices=jax.device_count(), processes=jax.process_count(), specs=np.array(specs), **saved)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[1:] == ["--one-device-too"]:
        main(args[0], one_too=True)
    else:
        main(args[0], *([args[1], int(args[2]), int(args[3])] if len(args) > 1 else []))
