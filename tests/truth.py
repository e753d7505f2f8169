"""Parity judged against float64 truth: pmg_jax's float32 result against PyTorch computing in float64.

Comparing two float32 implementations with a fixed tolerance passes or fails with the CPU: which one rounds
worse depends on the machine's kernels (on an AMD EPYC, PyTorch's float32 convolution backward misses the
float64 result by 3e-2 where pmg_jax misses it by 4e-5; see bench/parity.py). So each parity test computes
three things: the truth (PyTorch in float64, on the same float32 weights and inputs), PyTorch's float32 result
and ours; and it asks that, for every compared array,

    max |ours - truth|  <=  FACTOR * max |torch32 - truth|  +  floor * group scale

where the group scale is the largest |truth| over all arrays compared together (all the logits, all the
momentum buffers, ...). The bound is on each array's worst element, not element by element, and the floor
is relative to the group's scale, not to each array's or element's: gradients summed over a batch and
over pixels cancel (a bias right before a max pool, a head's bias), so small entries carry absolute errors
the size of the large terms they were summed from, and an element-wise relative test would fail on
rounding alone. The floor is what float32 arithmetic of that computation may cost wherever PyTorch happens
to round better than we do; each test states its floor and why.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FACTOR = 4.0  # ours may be this many times less accurate than PyTorch float32, array by array


def _as_flat(values) -> dict[str, np.ndarray]:
    if isinstance(values, Mapping):
        return {str(k): np.asarray(v, np.float64) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return {str(i): np.asarray(v, np.float64) for i, v in enumerate(values)}
    return {"": np.asarray(values, np.float64)}


def excess(ours, torch32, truth, *, floor: float, factor: float = FACTOR) -> dict[str, float]:
    """Per array: how far ours's worst error exceeds its bound, as a fraction of the group scale (> 0: fails)."""
    ours, torch32, truth = _as_flat(ours), _as_flat(torch32), _as_flat(truth)
    assert ours.keys() == truth.keys() == torch32.keys(), sorted(ours.keys() ^ truth.keys())
    scale = max(float(np.max(np.abs(t), initial=0.0)) for t in truth.values())
    assert scale > 0, "an all-zero truth compares nothing"
    out = {}
    for k, t in truth.items():
        assert ours[k].shape == t.shape == torch32[k].shape, (k, ours[k].shape, t.shape, torch32[k].shape)
        e_ours = float(np.max(np.abs(ours[k] - t), initial=0.0))
        e_torch = float(np.max(np.abs(torch32[k] - t), initial=0.0))
        out[k] = (e_ours - factor * e_torch) / scale - floor
    return out


def assert_near_truth(ours, torch32, truth, *, floor: float, what: str, factor: float = FACTOR) -> None:
    """Fail naming the arrays whose float32 error from the float64 truth exceeds FACTOR x PyTorch float32's own
    error plus `floor` x the group scale (see the module docstring)."""
    over = {k: v for k, v in excess(ours, torch32, truth, floor=floor, factor=factor).items() if v > 0}
    if over:
        worst = sorted(over, key=over.get, reverse=True)[:5]
        ours_f, torch_f, truth_f = _as_flat(ours), _as_flat(torch32), _as_flat(truth)
        scale = max(float(np.max(np.abs(t))) for t in truth_f.values())
        lines = [
            f"{k or what}: ours off by {np.max(np.abs(ours_f[k] - truth_f[k])):.3g}, torch float32 by "
            f"{np.max(np.abs(torch_f[k] - truth_f[k])):.3g} (group scale {scale:.3g})"
            for k in worst
        ]
        raise AssertionError(
            f"{what}: {len(over)} of {len(truth_f)} arrays further from the float64 truth than {factor:g} x torch "
            f"float32's error + {floor:g} x scale:\n  " + "\n  ".join(lines)
        )
