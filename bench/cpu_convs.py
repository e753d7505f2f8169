"""XLA:CPU back ends for PMG's steps: YNNPACK (XLA's default) vs Eigen convolutions (our choice) vs the reference.

    python -m bench.cpu_convs --mode train --size 224 --batch 8 --steps 2

`steps_lib.compile_steps` compiles for CPU with YNNPACK off (the eval step) or on for
reductions only (the training step), which makes XLA lower convolutions and dots with
Eigen; this times such choices against XLA's default and the PyTorch reference,
alternating one iteration of each per round. Prints one JSON line per measurement and
the ratios (reference time over ours) last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import torch

from bench import common, torch_bench
from pmg_jax import state as state_lib
from pmg_jax import steps as steps_lib
from pmg_jax.xla_options import YNN, YNN_REDUCE

BACKENDS = {
    "ynnpack": None,  # XLA's default: YNNPACK convolutions, dots and fusions
    "eigen": {YNN: ""},  # Eigen convolutions, dots and XLA's own reductions: the eval step's (xla_options)
    "eigen_ynn_reduce": {YNN: YNN_REDUCE},  # as "eigen", but YNNPACK reductions: the training step's
    # Eigen convolutions, YNNPACK dots (the 1x1 convolutions and the heads)
    "eigen_ynn_dot": {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def prepare(config, mode: str, options: dict | None) -> common.Prepared:
    """The bare train or eval step of `config` jitted with `options`, on one synthetic batch."""
    model = state_lib.create_model(config)
    tx = common.make_tx(config)
    state = state_lib.create_state(model, tx, config.seed, config.data.crop_size)
    data = jax.device_put(common.synthetic_batch(config.data.crop_size, config.batch_size, config.dataset.num_classes))
    step = steps_lib.make_train_step(model, tx) if mode == "train" else steps_lib.make_eval_step(model)
    start = time.perf_counter()
    compiled = jax.jit(step, compiler_options=options).lower(state, data).compile()
    compile_s = time.perf_counter() - start

    def run() -> None:
        nonlocal state
        out = compiled(state, data)
        if mode == "train":
            state = out[0]
        jax.block_until_ready(out)

    return common.Prepared(run, compile_s)


def main(argv: list[str] | None = None) -> dict:
    """Alternate the two back ends and the reference; returns the ratios record."""
    parser = common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument(
        "--backends",
        type=lambda t: t.split(","),
        default=["ynnpack", "eigen", "eigen_ynn_reduce"],
        help=f"comma-separated, of {', '.join(BACKENDS)}",
    )
    args = parser.parse_args(argv)
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))}")
    torch.set_num_threads(common.cpu_threads())
    config = common.make_config(args)
    runs = {name: prepare(config, args.mode, BACKENDS[name]) for name in args.backends}
    runs["reference"] = torch_bench.prepare(
        args.mode, args.size, args.batch, args.dtype, "cpu", **common.model_kwargs(args)
    )
    tags = {"bench": "cpu_convs", "mode": args.mode, "size": args.size, "batch": args.batch, "dtype": args.dtype}
    for name in args.backends:
        common.emit({**tags, "kind": "compile", "impl": name, "seconds": runs[name].compile_s})
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.warmup + args.steps):
        for name, prepared in runs.items():
            seconds = common.timed(prepared.run)
            time.sleep(1.0)
            common.emit(
                {
                    **tags,
                    "kind": "warmup" if r < args.warmup else "step",
                    "impl": name,
                    "round": r,
                    "seconds": seconds,
                    "images_per_s": args.batch / seconds,
                }
            )
            if r >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    record = {
        **tags,
        "kind": "ratio",
        "median_s": median,
        "threads": torch.get_num_threads(),
        **{f"ratio_{name}": median["reference"] / median[name] for name in args.backends},
    }
    common.emit(record)
    return record


if __name__ == "__main__":
    main()
