"""XLA compiler options that pmg_jax's own jitted programs are compiled with, per platform.

- cpu: XLA:CPU's default YNNPACK convolutions run the training steps slower than its Eigen
  ones, the weight gradients several times so (bench/RESULTS.md); an empty YNN fusion list
  selects Eigen.
- gpu: XLA's Triton GEMM fusion is switched off. With jax/jaxlib 0.11.2 on an H200 it
  aborted the process while compiling the Grad-CAM pass at 448 px in bfloat16 ("Check failed:
  subdim_size_accumulator == dim_size (3136 vs. 112)" in triton_tiling_propagation.cc); with
  the fusion off that pass compiled and ran, and a bfloat16 training step ran at the same
  speed as with it on (264 vs 267 img/s, bench/RESULTS.md). GEMMs then go to cuBLAS.

An option that the installed XLA does not know is dropped (checked once per platform by
compiling an empty program), so a newer or older jaxlib never fails on it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "gpu": {"xla_gpu_enable_triton_gemm": False},
}


@functools.cache
def for_platform(platform: str | None = None) -> dict[str, Any] | None:
    """The compiler options for `platform` ('cpu', 'gpu', ...; default: JAX's default backend)
    that this XLA accepts, or None where there are none."""
    platform = platform or jax.default_backend()
    wanted = OPTIONS.get(platform)
    if not wanted:
        return None
    if platform != jax.default_backend():
        return dict(wanted)  # cannot be probed here; XLA checks them when it compiles
    accepted = {}
    for name, value in wanted.items():
        try:
            jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
        except jax.errors.JaxRuntimeError:  # this XLA has no such option: nothing to switch
            continue
        accepted[name] = value
    return accepted or None


def jit(fn: Callable, *, platform: str | None = None, **kwargs: Any) -> Callable:
    """`jax.jit(fn, **kwargs)` compiled with `for_platform(platform)`'s options."""
    return jax.jit(fn, compiler_options=for_platform(platform), **kwargs)
