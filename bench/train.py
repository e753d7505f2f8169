"""Benchmark whole PMG training iterations (four passes, four updates) on synthetic data.

    python -m bench.train --size 448 --batch 16 --dtype bfloat16 --steps 5 [--bn-stats used]

The step is the one training runs: `steps.compile_steps` (jit over the mesh,
state donated). Prints one JSON line per measurement, the headline last.
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
    """Compile the training step of `config` (with `kernel_choice`, default config.model.kernels) for one
    synthetic batch; `run` does one iteration."""
    size, batch = config.data.crop_size, config.batch_size
    model = state_lib.create_model(config)
    tx = common.make_tx(config)
    mesh = parallel.make_mesh()
    state = jax.device_put(state_lib.create_state(model, tx, config.seed, size), parallel.replicated(mesh))
    data = common.synthetic_batch(size, batch, config.dataset.num_classes)
    data = jax.device_put({k: data[k] for k in ("image", "label")}, parallel.batch_sharding(mesh))
    train_step, _ = steps_lib.compile_steps(model, tx, config, mesh, kernel_choice)
    start = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start

    def run() -> None:
        nonlocal state
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))

    return common.Prepared(run, compile_s, xla_flops=common.xla_flops(compiled))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.add_winograd_arg(common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    parser.add_argument("--bn-stats", choices=("all", "used"), default="all", help="config.bn_stats")
    parser.add_argument("--channel-sum", choices=("auto", "gemv", "reduce"), default="auto",
                        help="BatchNorm's channel sums: auto = kernels.channel_sum (a reduction, or GEMVs on an "
                             "XLA:CPU without YNNPACK reductions); gemv or reduce forces one form, for A/B runs")
    parser.add_argument("--layers", choices=("custom", "autodiff"), default="custom",
                        help="custom = pmg_jax.kernels' hand-written gradients (1x1 convolutions, BatchNorm, max "
                             "pool; written for XLA:CPU); autodiff = the plain formulations and JAX's own "
                             "gradients, for A/B runs on other platforms")
    return parser.parse_args(argv)


def kernel_choice(args: argparse.Namespace) -> kernels.Kernels:
    """The kernels the A/B flags ask for (pmg_jax.kernels; the defaults are 'auto')."""
    return kernels.Kernels(winograd=args.winograd, channel_sum=args.channel_sum,
                           gradients="custom" if args.layers == "custom" else "autodiff")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    args = parse(argv)
    prepared = prepare(common.make_config(args, bn_stats=args.bn_stats), kernel_choice(args))
    model_flops = flops.train_iteration_flops(args.batch, size=args.size, **common.model_kwargs(args))
    return common.measure("train", prepared, args, model_flops, bn_stats=args.bn_stats,
                          channel_sum=args.channel_sum, winograd=args.winograd, layers=args.layers,
                          threads=common.cpu_threads())


if __name__ == "__main__":
    main()
