"""FLOP count of PMG and of its training iteration, for any registered backbone, and the peak FLOP/s of accelerators.

Counts only convolutions and linear layers (2 FLOPs per multiply-accumulate), read from the model's
jaxpr; BN, activations and pooling are a rounding error next to them. Model-FLOPs convention
for MFU: a training pass counts 3x the forward (forward, input gradient, weight
gradient), and an iteration has four passes over the whole network, as the reference
runs them, even though autodiff skips the backward of the parts that do not feed a
pass's loss. MFU computed this way can be compared across implementations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from pmg_jax import kernels
from pmg_jax.model import PASSES, PMG

# Dense peak FLOP/s per chip by (device-kind substring, compute dtype). float32 on these
# GPUs runs convolutions and matmuls on TF32 tensor cores (the default of both JAX and
# cuDNN convolutions), so its peak is the TF32 one. First match wins: PCIe before H100.
PEAK_FLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", "bfloat16", 756e12),
    ("H100 PCIe", "float32", 378e12),
    ("H100", "bfloat16", 989e12),
    ("H100", "float32", 495e12),
    ("H200", "bfloat16", 989e12),
    ("H200", "float32", 495e12),
    ("A100", "bfloat16", 312e12),
    ("A100", "float32", 156e12),
)


def jaxpr_macs(jaxpr: jcore.Jaxpr) -> int:
    """Multiply-accumulates of every convolution and dot in a jaxpr, nested ones included."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "conv_general_dilated":
            lhs_spec, rhs_spec, _ = eqn.params["dimension_numbers"]
            kernel = eqn.invars[1].aval.shape
            in_per_group = kernel[rhs_spec[1]]  # the kernel's input-feature dimension (C / groups)
            total += math.prod(out) * in_per_group * math.prod(kernel[d] for d in rhs_spec[2:])
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            total += math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += jaxpr_macs(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += jaxpr_macs(sub)
    return total


@functools.cache
def forward_macs(
    size: int,
    num_classes: int,
    backbone: str = "resnet50",
    width: int = 0,
    feature_size: int = 512,
    stage_sizes: tuple[int, ...] | None = None,
) -> int:
    """Multiply-accumulates of one PMG forward on one size x size image (all four heads), read from the
    model's own jaxpr traced with plain XLA kernels, so every convolution counts as a direct one whatever
    computes it (Winograd's would count fewer multiplies, and twice: one form per platform)."""
    net = PMG(
        num_classes=num_classes,
        backbone=backbone,
        width=width,
        feature_size=feature_size,
        stage_sizes=tuple(stage_sizes) if stage_sizes else None,
    )
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with kernels.use("xla"):
        variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False))
        jaxpr = jax.make_jaxpr(lambda v, x: net.apply(v, x, train=False))(variables, x)
    return jaxpr_macs(jaxpr.jaxpr)


def eval_flops(batch: int, **model) -> int:
    """FLOPs of one evaluation forward over a batch; `model` as for `forward_macs`."""
    return 2 * forward_macs(**model) * batch


def train_iteration_flops(batch: int, **model) -> int:
    """Model FLOPs of one PMG iteration: every pass's forward + backward (3x forward) over a batch (either
    schedule: 'joint' runs the same four inputs as one batch)."""
    return 3 * len(PASSES) * eval_flops(batch, **model)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one chip for the compute dtype, or None when not tabled (CPUs)."""
    for kind, peak_dtype, peak in PEAK_FLOPS:
        if kind in device_kind and peak_dtype == dtype:
            return peak
    return None
