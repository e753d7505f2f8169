"""What every benchmark shares: flags, the model config they describe, timing, memory and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from bench import flops
from pmg_jax import backbones
from pmg_jax import config as default
from pmg_jax.optim import make_optimizer


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--size --batch --dtype --steps --backbone and the knobs that shrink the model for smoke runs."""
    parser.add_argument("--size", type=int, default=448, help="input side (divisible by 32)")
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--steps", type=int, default=5, help="timed iterations after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations after compilation")
    parser.add_argument(
        "--backbone",
        default="resnet50",
        choices=tuple(backbones.REGISTRY),
        help="a registered backbone (pmg_jax.backbones)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=0,
        help="base width; 0 = the backbone's standard (64 for ResNets, 96 for convnext_tiny)",
    )
    parser.add_argument("--feature-size", type=int, default=512, help="channels of the blocks' 1x1 convs")
    parser.add_argument("--stage-sizes", type=_ints, default=None, help="blocks per stage, e.g. 1,1,1,1")
    parser.add_argument("--classes", type=int, default=200, help="number of classes")
    return parser


def add_winograd_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--winograd: auto (kernels.use_winograd picks the 3x3 convolutions that run as Winograd on CPU)
    or off (every one direct), for A/B runs (a pmg_jax.kernels.Kernels field)."""
    parser.add_argument(
        "--winograd",
        choices=("auto", "off"),
        default="auto",
        help="3x3 convolutions on CPU: auto = Winograd F(4x4,3x3) where kernels.use_winograd "
        "says it pays, off = all direct (XLA's convolution)",
    )
    return parser


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(","))


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The model description shared by our model, the torch reference and the FLOP counter."""
    return {
        "num_classes": args.classes,
        "backbone": args.backbone,
        "width": args.width,
        "feature_size": args.feature_size,
        "stage_sizes": args.stage_sizes,
    }


def make_config(args: argparse.Namespace, **top_level: Any) -> ml_collections.ConfigDict:
    """The default config (pmg_jax/config.py) with the model and batch of `args` (and top-level fields: bn_stats)."""
    c = default.get_config()
    c.dataset.num_classes = args.classes
    c.data.crop_size = args.size
    c.model.backbone = args.backbone
    c.model.width = args.width
    c.model.feature_size = args.feature_size
    c.model.stage_sizes = args.stage_sizes or ()
    c.model.dtype = args.dtype
    c.batch_size = c.eval_batch_size = args.batch
    c.update(top_level)
    return c


def make_tx(config: ml_collections.ConfigDict):
    """The training optimizer of `config` (a long epoch: the learning rate stays at its first value)."""
    o = config.optim
    return make_optimizer(
        lr_new=o.lr_new,
        lr_backbone=o.lr_backbone,
        num_epochs=config.num_epochs,
        steps_per_epoch=10_000,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        schedule=config.schedule,
    )


def synthetic_batch(size: int, batch: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normalised-looking NHWC images in [-1, 1], labels and an all-ones eval mask."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, num_classes, batch).astype(np.int32),
        "mask": np.ones((batch,), np.float32),
    }


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes (it must block until its work is done)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory() -> dict[str, Any]:
    """Peak memory: the device's allocator peak where it reports one, else this process's max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "memory_source": "device peak_bytes_in_use"}
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_source": "process max RSS",
    }


def device_info() -> dict[str, Any]:
    """Platform, device kind and count, for every record."""
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count()}


def cpu_threads() -> int:
    """Cores this process may run on (XLA's CPU thread pool uses them all)."""
    return len(os.sched_getaffinity(0))


@dataclasses.dataclass
class Prepared:
    """A compiled benchmark: `run` does one iteration and blocks until it is done."""

    run: Callable[[], Any]
    compile_s: float
    memory: Callable[[], dict[str, Any]] = peak_memory
    device: dict[str, Any] = dataclasses.field(default_factory=device_info)
    xla_flops: float | None = None  # XLA's own count for the compiled step, where it gives one
    compiled_memory: dict[str, int] = dataclasses.field(default_factory=dict)  # see `compiled_memory`


def xla_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of a compiled executable by XLA's cost analysis (after dead-code elimination)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops") if cost else None


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's buffer assignment for a compiled executable: temporaries, arguments and outputs, in bytes
    (empty where the platform does not report it)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    return {
        f"xla_{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes"))
        for name in ("temp", "argument", "output", "alias")
    }


def measure(
    bench: str, prepared: Prepared, args: argparse.Namespace, flops_per_step: int | None, **fields: Any
) -> dict[str, Any]:
    """Warm up, time `args.steps` iterations one by one and print a line each, then the headline; returns it.
    `flops_per_step` is the analytic count (None where there is none: the model-FLOP fields are then None)."""
    tags = {
        "bench": bench,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "backbone": args.backbone,
        **fields,
    }
    emit({**tags, "kind": "compile", "seconds": prepared.compile_s})
    warmup_s = sum(timed(prepared.run) for _ in range(args.warmup))
    emit({**tags, "kind": "warmup", "seconds": warmup_s, "iterations": args.warmup})
    seconds = []
    for i in range(args.steps):
        seconds.append(timed(prepared.run))
        emit({**tags, "kind": "step", "step": i, "seconds": seconds[-1], "images_per_s": args.batch / seconds[-1]})
    median = statistics.median(seconds)
    achieved = None if flops_per_step is None else flops_per_step / median
    peak = flops.peak_flops(prepared.device["device_kind"], args.dtype)
    headline = {
        **tags,
        "kind": "headline",
        "images_per_s": args.batch / median,
        "step_s_median": median,
        "step_s_min": min(seconds),
        "step_s_max": max(seconds),
        "steps": args.steps,
        "compile_s": prepared.compile_s,
        "warmup_s": warmup_s,
        "model_tflops_per_step": None if flops_per_step is None else flops_per_step / 1e12,
        "xla_tflops_per_step": prepared.xla_flops / 1e12 if prepared.xla_flops else None,
        "model_tflop_per_s": None if achieved is None else achieved / 1e12,
        "mfu": achieved / peak if peak and achieved is not None else None,
        **prepared.memory(),
        **prepared.compiled_memory,
        **prepared.device,
    }
    emit(headline)
    return headline


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (one measurement) and flush it."""
    print(json.dumps(record), flush=True)
