"""Benchmark PMG evaluation (eval-mode forward, the four heads and their sum) on synthetic data.

    python -m bench.eval --size 448 --batch 64 --dtype bfloat16 --steps 5

The step is the one evaluation runs (`train_lib.compile_steps`). Prints one JSON
line per measurement, the headline last.
"""

from __future__ import annotations

import argparse
import time

import jax
import ml_collections

from bench import common, flops
from pmg_jax import parallel, train_lib


def prepare(config: ml_collections.ConfigDict) -> common.Prepared:
    """Compile the eval step of `config` for one synthetic batch; `run` evaluates it once."""
    size, batch = config.data.crop_size, config.eval_batch_size
    model = train_lib.create_model(config)
    mesh = parallel.make_mesh()
    variables = train_lib.init_variables(model, jax.random.PRNGKey(config.seed), size)
    state = jax.device_put(train_lib.TrainState(step=0, params=variables["params"], batch_stats=variables["batch_stats"],
                                                opt_state=None, rng=None), parallel.replicated(mesh))
    data = jax.device_put(common.synthetic_batch(size, batch, config.dataset.num_classes), parallel.batch_sharding(mesh))
    _, p_eval = train_lib.compile_steps(model, None, config, mesh)
    start = time.perf_counter()
    compiled = p_eval.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    return common.Prepared(lambda: jax.block_until_ready(compiled(state, data)), compile_s,
                           xla_flops=common.xla_flops(compiled))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    parser = common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = common.add_winograd_arg(parser).parse_args(argv)
    common.force_winograd(args.winograd)
    prepared = prepare(common.make_config(args))
    model_flops = flops.eval_flops(args.batch, size=args.size, **common.model_kwargs(args))
    return common.measure("eval", prepared, args, model_flops, winograd=args.winograd, threads=common.cpu_threads())


if __name__ == "__main__":
    main()
