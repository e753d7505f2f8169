"""Analytic FLOP count of PMG and of its training iteration, and the peak FLOP/s of accelerators.

Counts only convolutions and linear layers (2 FLOPs per multiply-accumulate); BN,
activations and pooling are a rounding error next to them. Model-FLOPs convention
for MFU: a training pass counts 3x the forward (forward, input gradient, weight
gradient), and an iteration has four passes over the whole network, as the reference
runs them, even though autodiff skips the backward of the parts that do not feed a
pass's loss. MFU computed this way can be compared across implementations.
"""

from __future__ import annotations

from pmg_jax.optim import UPDATES_PER_ITERATION
from pmg_jax.resnet import BOTTLENECK, STAGE_SIZES

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


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _conv(size: int, cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0) -> tuple[int, int]:
    """(MACs, output side) of one square conv on a size x size map."""
    out = _out(size, kernel, stride, pad)
    return out * out * cin * cout * kernel * kernel, out


def _residual_block(size: int, cin: int, planes: int, stride: int, bottleneck: bool) -> tuple[int, int, int]:
    """(MACs, output side, output channels) of a torchvision Bottleneck or BasicBlock."""
    cout = planes * (4 if bottleneck else 1)
    if bottleneck:
        m1, _ = _conv(size, cin, planes, 1)
        m2, out = _conv(size, planes, planes, 3, stride, 1)
        m3, _ = _conv(out, planes, cout, 1)
        macs = m1 + m2 + m3
    else:
        m1, out = _conv(size, cin, planes, 3, stride, 1)
        m2, _ = _conv(out, planes, planes, 3, 1, 1)
        macs = m1 + m2
    if stride != 1 or cin != cout:
        macs += _conv(size, cin, cout, 1, stride)[0]
    return macs, out, cout


def forward_macs(size: int, num_classes: int, backbone: str = "resnet50", width: int = 64,
                 feature_size: int = 512, stage_sizes: tuple[int, ...] | None = None) -> int:
    """Multiply-accumulates of one PMG forward on one size x size image (all four heads)."""
    bottleneck = BOTTLENECK[backbone]
    macs, side = _conv(size, 3, width, 7, 2, 3)
    side = _out(side, 3, 2, 1)  # max pool
    channels, stages = width, []
    for i, blocks in enumerate(stage_sizes or STAGE_SIZES[backbone]):
        for j in range(blocks):
            m, side, channels = _residual_block(side, channels, width * 2**i, 2 if i > 0 and j == 0 else 1, bottleneck)
            macs += m
        stages.append((side, channels))
    hidden = 2 * feature_size
    for side, channels in stages[1:]:
        macs += _conv(side, channels, feature_size, 1)[0] + _conv(side, feature_size, hidden, 3, 1, 1)[0]
        macs += hidden * feature_size + feature_size * num_classes
    macs += 3 * hidden * feature_size + feature_size * num_classes
    return macs


def eval_flops(batch: int, **model) -> int:
    """FLOPs of one evaluation forward over a batch; `model` as for `forward_macs`."""
    return 2 * forward_macs(**model) * batch


def train_iteration_flops(batch: int, **model) -> int:
    """Model FLOPs of one PMG iteration: four passes of forward + backward (3x forward) over a batch."""
    return 3 * UPDATES_PER_ITERATION * eval_flops(batch, **model)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one chip for the compute dtype, or None when not tabled (CPUs)."""
    for kind, peak_dtype, peak in PEAK_FLOPS:
        if kind in device_kind and peak_dtype == dtype:
            return peak
    return None
