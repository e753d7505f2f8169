"""Benchmark whole training iterations of a method (PMG: four passes, four updates or one if joint; PMG-V2:
three tiled updates of anchors and positives) on synthetic data.

    python -m bench.train --size 448 --batch 16 --dtype bfloat16 --steps 5 [--bn-stats used]
    python -m bench.train --size 224 --batch 8 --remat none,blocks,stages   # alternate the variants
    python -m bench.train --size 224 --batch 8 --method pmg,pmg_v2          # the two methods side by side
    python -m bench.train --size 448 --batch 16 --dtype bfloat16 --profile /tmp/trace

The step is the one training runs: `steps.compile_steps` (jit over the mesh,
state donated). Prints one JSON line per measurement, the headline last. Several
values of --remat, --schedule or --method compile every combination and time one iteration
of each in turn per round (like bench/compare.py), so that other load hits them
alike; each variant's ratio to the first is printed, with the per-round spread.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import ml_collections

from bench import common, flops
from pmg_jax import kernels, methods, parallel
from pmg_jax import model as model_lib
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
    data = {k: data[k] for k in ("image", "label")}
    if methods.get(config.method).pairs:  # each example's positive: another image of the batch (timing only)
        data["positive"] = data["image"][::-1].copy()
    data = jax.device_put(data, parallel.batch_sharding(mesh))
    train_step, _ = steps_lib.compile_steps(model, tx, config, mesh, kernel_choice)
    start = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start

    def run() -> None:
        nonlocal state
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))

    return common.Prepared(
        run, compile_s, xla_flops=common.xla_flops(compiled), compiled_memory=common.compiled_memory(compiled)
    )


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = text.split(",")
        for v in values:
            if v not in allowed:
                raise argparse.ArgumentTypeError(f"{v!r} is not one of {', '.join(allowed)}")
        return values

    return parse


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.add_winograd_arg(
        common.add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    )
    parser.add_argument("--bn-stats", choices=("all", "used"), default="all", help="config.bn_stats")
    parser.add_argument(
        "--channel-sum",
        choices=("auto", "gemv", "reduce"),
        default="auto",
        help="BatchNorm's channel sums: auto = kernels.channel_sum (a reduction, or GEMVs on an "
        "XLA:CPU without YNNPACK reductions); gemv or reduce forces one form, for A/B runs",
    )
    parser.add_argument(
        "--layers",
        choices=("custom", "autodiff"),
        default="custom",
        help="custom = pmg_jax.kernels' hand-written gradients (1x1 convolutions, BatchNorm, max "
        "pool; written for XLA:CPU); autodiff = the plain formulations and JAX's own "
        "gradients, for A/B runs on other platforms",
    )
    parser.add_argument(
        "--remat",
        type=_choices(model_lib.REMAT),
        default=["none"],
        help="config.model.remat; several, comma-separated, alternate in one process",
    )
    parser.add_argument(
        "--schedule",
        type=_choices(tuple(model_lib.SCHEDULES)),
        default=["progressive"],
        help="config.schedule; several, comma-separated, alternate in one process",
    )
    parser.add_argument(
        "--method",
        type=_choices(tuple(methods.METHODS)),
        default=["pmg"],
        help="config.method; several, comma-separated, alternate in one process (a method's own schedules only)",
    )
    parser.add_argument("--accumulation-steps", type=int, default=1, help="config.accumulation_steps")
    parser.add_argument(
        "--profile",
        default="",
        help="after timing, trace --profile-steps iterations with jax.profiler into this folder "
        "(summarise it with python -m bench.profile_summary FOLDER); one variant only",
    )
    parser.add_argument("--profile-steps", type=int, default=2, help="iterations traced with --profile")
    args = parser.parse_args(argv)
    if args.profile and len(args.remat) * len(args.schedule) * len(args.method) > 1:
        parser.error("--profile traces one variant: give one --remat, one --schedule and one --method")
    for m in args.method:
        other = [s for s in args.schedule if s not in methods.get(m).schedules]
        if other:
            parser.error(f"--schedule {','.join(other)}: method {m} has only {', '.join(methods.get(m).schedules)}")
    return args


def kernel_choice(args: argparse.Namespace) -> kernels.Kernels:
    """The kernels the A/B flags ask for (pmg_jax.kernels; the defaults are 'auto')."""
    return kernels.Kernels(
        winograd=args.winograd,
        channel_sum=args.channel_sum,
        gradients="custom" if args.layers == "custom" else "autodiff",
    )


def variant_config(args: argparse.Namespace, remat: str, schedule: str, method: str) -> ml_collections.ConfigDict:
    """The benchmark's config with one remat setting, schedule and method."""
    config = common.make_config(
        args, bn_stats=args.bn_stats, schedule=schedule, accumulation_steps=args.accumulation_steps, method=method
    )
    config.model.remat = remat
    return config


def alternate(args: argparse.Namespace, variants: list[tuple[str, str, str]], tags: dict) -> dict:
    """Compile every (remat, schedule, method) variant, then time one iteration of each in turn for --steps rounds
    (after --warmup); prints each timing, each variant's ratio to the first, and returns the headline."""
    prepared = {v: prepare(variant_config(args, *v), kernel_choice(args)) for v in variants}
    methods_named = len(args.method) > 1  # the method joins the variants' names when it varies
    name = {v: f"remat={v[0]},schedule={v[1]}" + (f",method={v[2]}" if methods_named else "") for v in variants}
    for v, p in prepared.items():
        common.emit({**tags, "kind": "compile", "variant": name[v], "seconds": p.compile_s, **p.compiled_memory})
    times: dict[tuple[str, str, str], list[float]] = {v: [] for v in variants}
    for r in range(args.warmup + args.steps):
        for v, p in prepared.items():
            seconds = common.timed(p.run)
            kind = "warmup" if r < args.warmup else "step"
            common.emit(
                {
                    **tags,
                    "kind": kind,
                    "variant": name[v],
                    "round": r,
                    "seconds": seconds,
                    "images_per_s": args.batch / seconds,
                }
            )
            if kind == "step":
                times[v].append(seconds)
    first = variants[0]
    ratios = {}
    for v in variants:
        paired = [t / t0 for t, t0 in zip(times[v], times[first], strict=True)]
        median = statistics.median(times[v])
        time_ratio = median / statistics.median(times[first])
        ratios[name[v]] = time_ratio
        common.emit(
            {
                **tags,
                "kind": "ratio",
                "variant": name[v],
                "baseline": name[first],
                "step_s_median": median,
                "images_per_s": args.batch / median,
                "time_ratio": time_ratio,
                "speed_ratio": 1 / time_ratio,
                "paired_time_ratio_min": min(paired),
                "paired_time_ratio_max": max(paired),
                "rounds": args.steps,
                **prepared[v].compiled_memory,
            }
        )
    headline = {
        **tags,
        "kind": "headline",
        "baseline": name[first],
        "time_ratios": ratios,
        **common.peak_memory(),
        **common.device_info(),
    }
    common.emit(headline)
    return headline


def profile(prepared: common.Prepared, folder: str, iterations: int) -> None:
    """Trace `iterations` more iterations with jax.profiler into `folder` (with a Perfetto JSON trace)."""
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(iterations):
            prepared.run()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the headline record."""
    args = parse(argv)
    tags = {
        "bn_stats": args.bn_stats,
        "channel_sum": args.channel_sum,
        "winograd": args.winograd,
        "layers": args.layers,
        "accumulation_steps": args.accumulation_steps,
        "threads": common.cpu_threads(),
    }
    variants = list(itertools.product(args.remat, args.schedule, args.method))
    if len(variants) > 1:
        return alternate(
            args,
            variants,
            {
                "bench": "train",
                "size": args.size,
                "batch": args.batch,
                "dtype": args.dtype,
                "backbone": args.backbone,
                **tags,
            },
        )
    ((remat, schedule, method),) = variants
    prepared = prepare(variant_config(args, remat, schedule, method), kernel_choice(args))
    # the analytic count is PMG's iteration (bench/flops.py); XLA's own count is reported for every method
    model_flops = flops.train_iteration_flops(args.batch, size=args.size, **common.model_kwargs(args))
    if method != "pmg":
        model_flops = None
    headline = common.measure(
        "train", prepared, args, model_flops, remat=remat, schedule=schedule, method=method, **tags
    )
    if args.profile:
        profile(prepared, args.profile, args.profile_steps)
    return headline


if __name__ == "__main__":
    main()
