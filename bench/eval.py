"""Benchmark PMG evaluation (eval-mode forward, the four heads and their sum) on synthetic data.

    python -m bench.eval --size 448 --batch 64 --dtype bfloat16 --steps 5

The step is the one evaluation runs (`steps.compile_steps`). Prints one JSON
line per measurement, the headline last.
"""

from __future__ import annotations

import argparse
import time

import jax
import ml_collections

from bench import common, flops
from pmg_jax import kernels, parallel
from pmg_jax import state as state_lib
from pmg_jax import steps as steps_lib


def prepare(config: ml_collections.ConfigDict, kernel_choice: kernels.Kernels | None = None) -> common.Prepared:
    """Compile the eval step of `config` (with `kernel_choice`, default config.model.kernels) for one synthetic
    batch; `run` evaluates it once."""
    size, batch = config.data.crop_size, config.eval_batch_size
    model = state_lib.create_model(config)
    mesh = parallel.make_mesh()
    variables = state_lib.init_variables(model, jax.random.PRNGKey(config.seed), size)
    state = jax.device_put(
        state_lib.TrainState(
            step=0, params=variables["params"], batch_stats=variables["batch_stats"], opt_state=None, rng=None
        ),
        parallel.replicated(mesh),
    )
    data = jax.device_put(
        common.synthetic_batch(size, batch, config.dataset.num_classes), parallel.batch_sharding(mesh)
    )
    _, eval_step = steps_lib.compile_steps(model, None, config, mesh, kernel_choice)
    start = time.perf_counter()
    compiled = eval_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    return common.Prepared(
        lambda: jax.block_until_ready(compiled(state, data)), compile_s, xla_flops=common.xla_flops(compiled)
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    parser = common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = common.add_winograd_arg(parser).parse_args(argv)
    prepared = prepare(common.make_config(args), kernels.Kernels(winograd=args.winograd))
    model_flops = flops.eval_flops(args.batch, size=args.size, **common.model_kwargs(args))
    return common.measure("eval", prepared, args, model_flops, winograd=args.winograd, threads=common.cpu_threads())


if __name__ == "__main__":
    main()
