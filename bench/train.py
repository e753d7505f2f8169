"""Benchmark whole PMG training iterations (four passes, four updates) on synthetic data.

    python -m bench.train --size 448 --batch 16 --dtype bfloat16 --steps 5 [--bn-stats used]

The step is the one training runs: `train_lib.compile_steps` (jit over the mesh,
state donated). Prints one JSON line per measurement, the headline last.
"""

from __future__ import annotations

import argparse
import time

import jax
import ml_collections
from flax import linen as nn

from bench import common, flops
from pmg_jax import layers, parallel, resnet, train_lib


def prepare(config: ml_collections.ConfigDict) -> common.Prepared:
    """Compile the training step of `config` for one synthetic batch; `run` does one iteration."""
    size, batch = config.data.crop_size, config.batch_size
    model = train_lib.create_model(config)
    tx = common.make_tx(config)
    mesh = parallel.make_mesh()
    state = jax.device_put(train_lib.create_state(model, tx, config.seed, size), parallel.replicated(mesh))
    data = common.synthetic_batch(size, batch, config.dataset.num_classes)
    data = jax.device_put({k: data[k] for k in ("image", "label")}, parallel.batch_sharding(mesh))
    p_train, _ = train_lib.compile_steps(model, tx, config, mesh)
    start = time.perf_counter()
    compiled = p_train.lower(state, data).compile()
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
                        help="BatchNorm's channel sums: auto = layers.channel_sum (a reduction, or GEMVs on an "
                             "XLA:CPU without YNNPACK reductions); gemv or reduce forces one form, for A/B runs")
    parser.add_argument("--layers", choices=("custom", "autodiff"), default="custom",
                        help="custom = pmg_jax.layers' hand-written gradients (1x1 convolutions, BatchNorm, max "
                             "pool; written for XLA:CPU); autodiff = the plain formulations and JAX's own "
                             "gradients, for A/B runs on other platforms")
    return parser.parse_args(argv)


def force_channel_sum(form: str) -> None:
    """Make BatchNorm use one channel-sum form ('gemv' or 'reduce') in what is traced from now on."""
    if form != "auto":
        layers.channel_sum = {"gemv": layers.channel_sum_gemv, "reduce": layers.channel_sum_reduce}[form]


def _pointwise_autodiff(x: jax.Array, kernel: jax.Array, strides: int = 1) -> jax.Array:
    return layers._direct_conv(x, kernel, strides, 0)


def _max_pool_autodiff(x: jax.Array, window: int = 3, strides: int = 2, padding: int = 1) -> jax.Array:
    return nn.max_pool(x, (window, window), (strides, strides), ((padding, padding), (padding, padding)))


def _batch_norm_autodiff(x, scale, bias, epsilon: float, out_dtype):
    """layers.batch_norm_train's forward, differentiated by JAX instead of its closed-form backward."""
    return layers._bn_forward(x, scale, bias, epsilon, out_dtype)[:3]


def force_layers(kind: str) -> None:
    """'autodiff': 1x1 convolutions, train-mode BatchNorm and the max pool traced from now on are the
    plain formulations with JAX's own gradients instead of pmg_jax.layers' hand-written ones (the
    same values); 'custom' leaves them."""
    if kind == "autodiff":
        layers.pointwise_conv = _pointwise_autodiff
        layers.batch_norm_train = _batch_norm_autodiff
        resnet.max_pool = _max_pool_autodiff
    elif kind != "custom":
        raise ValueError(f"--layers must be custom or autodiff, got {kind!r}")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    args = parse(argv)
    force_channel_sum(args.channel_sum)
    force_layers(args.layers)
    common.force_winograd(args.winograd)
    prepared = prepare(common.make_config(args, bn_stats=args.bn_stats))
    model_flops = flops.train_iteration_flops(args.batch, size=args.size, **common.model_kwargs(args))
    return common.measure("train", prepared, args, model_flops, bn_stats=args.bn_stats,
                          channel_sum=args.channel_sum, winograd=args.winograd, layers=args.layers,
                          threads=common.cpu_threads())


if __name__ == "__main__":
    main()
