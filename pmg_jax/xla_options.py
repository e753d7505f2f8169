"""XLA compiler options that pmg_jax's own jitted programs are compiled with, per platform.

- cpu: YNNPACK off (Eigen convolutions and dots): XLA:CPU's default YNNPACK convolutions run
  PMG's steps slower than its Eigen ones, the weight gradients several times so. The
  training step also turns YNNPACK's reductions on: BatchNorm's statistics of an
  (8, 56, 56, 256) map took 1.6 ms as plain sums with them against 6.4 ms as GEMVs and
  60 ms as sums without, and the 224/8 training step ran 6% faster with half the compile
  time. Not for the other programs: in the evaluation step YNNPACK's reduction fusions took
  in the granularity blocks' 3x3 convolutions ahead of the heads' max pooling, which made
  it 12% slower (bench/RESULTS.md). Where this XLA lacks that fusion type, the training
  step gets YNNPACK off too and BatchNorm sums with GEMVs (`layers.channel_sum`).
  The training step also keeps its optimisation barriers: XLA:CPU's cse_barrier_expander pass
  drops them early, after which common-subexpression elimination merges the backward's
  recomputation (config.model.remat) back into the forward, so remat saved no memory there
  (a step without remat has no barriers, so nothing else changes).
- gpu: XLA's Triton GEMM fusion is switched off. With jax/jaxlib 0.11.2 on an H200 it
  aborted the process while compiling the Grad-CAM pass at 448 px in bfloat16 ("Check failed:
  subdim_size_accumulator == dim_size (3136 vs. 112)" in triton_tiling_propagation.cc); with
  the fusion off that pass compiled and ran, and a bfloat16 training step ran at the same
  speed as with it on (264 vs 267 img/s, bench/RESULTS.md). GEMMs then go to cuBLAS.

Each option lists the values to try, best first; the first one that this XLA accepts is used
(checked once per platform by compiling an empty program), and an option none of whose
values it accepts is left out, so a newer or older jaxlib never fails on them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

YNN = "xla_cpu_experimental_ynn_fusion_type"
YNN_REDUCE = "LIBRARY_FUSION_TYPE_REDUCE"
DISABLED_PASSES = "xla_disable_hlo_passes"
PROGRAMS = ("train", "other")

# per platform: option -> values to try, best first; TRAIN entries replace them for the training step
OPTIONS: dict[str, dict[str, tuple[Any, ...]]] = {
    "cpu": {YNN: ("",)},
    "gpu": {"xla_gpu_enable_triton_gemm": (False,)},
}
TRAIN: dict[str, dict[str, tuple[Any, ...]]] = {
    "cpu": {YNN: (YNN_REDUCE, ""), DISABLED_PASSES: ("cse_barrier_expander",)},
}


def _accepted(name: str, value: Any) -> bool:
    try:
        jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
    except jax.errors.JaxRuntimeError:  # this XLA has no such option or value
        return False
    return True


@functools.cache
def for_platform(platform: str | None = None, program: str = "other") -> dict[str, Any] | None:
    """The compiler options for `program` ('train': the training step; 'other') on `platform`
    ('cpu', 'gpu', ...; default: JAX's default backend) that this XLA accepts, or None."""
    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}")
    platform = platform or jax.default_backend()
    wanted = {**OPTIONS.get(platform, {}), **(TRAIN.get(platform, {}) if program == "train" else {})}
    if not wanted:
        return None
    if platform != jax.default_backend():  # cannot be probed here; XLA checks them when it compiles
        return {name: values[0] for name, values in wanted.items()}
    chosen = {}
    for name, values in wanted.items():
        value = next((v for v in values if _accepted(name, v)), None)
        if value is not None:
            chosen[name] = value
    return chosen or None


def fast_reductions(platform: str) -> bool:
    """Whether a plain reduction over the leading axes of an activation is fast in the training
    step compiled with `for_platform(platform, 'train')`: everywhere but on an XLA:CPU without
    YNNPACK reductions."""
    return platform != "cpu" or (for_platform("cpu", "train") or {}).get(YNN) == YNN_REDUCE


def jit(fn: Callable, *, platform: str | None = None, program: str = "other", **kwargs: Any) -> Callable:
    """`jax.jit(fn, **kwargs)` compiled with `for_platform(platform, program)`'s options."""
    return jax.jit(fn, compiler_options=for_platform(platform, program), **kwargs)
