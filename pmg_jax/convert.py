"""PyTorch weights -> Flax variables for PMG.

Names are mapped mechanically: a numeric path component joins the one before it
(`layer1.0.conv1` -> `layer1_0/conv1`, `classifier1.4` -> `classifier1_4`), which
is how the Flax modules are named. Leaves: conv weight OIHW -> kernel HWIO, linear
weight (out, in) -> kernel (in, out), BN weight/bias -> scale/bias, running stats
-> batch_stats mean/var. Accepted spellings: the reference PMG's names, torchvision
or timm ResNet names with or without `features.`, and a DataParallel `module.` prefix.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

_SKIPPED_SUFFIXES = ("num_batches_tracked",)
_PMG_ROOTS = ("features", "conv_block", "classifier")


class ConversionError(ValueError):
    """The weights do not fit the model; the message lists what is missing, unexpected or misshapen."""


def _module_path(torch_path: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for part in torch_path:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def canonical_name(name: str) -> str | None:
    """The reference-PMG spelling of a parameter name, or None for weights PMG does not use (ResNet fc)."""
    while name.startswith("module."):
        name = name[len("module."):]
    if not name.startswith(_PMG_ROOTS):
        name = "features." + name  # a bare ResNet (torchvision / timm)
    if name.startswith("features.fc."):
        return None
    return name


def variables_from_torch(state_dict: Mapping[str, Any], target: Mapping | None = None) -> dict:
    """{'params', 'batch_stats'} for PMG (or a bare ResNet under 'features') from a PyTorch state dict.

    Values may be torch tensors or numpy arrays. With `target` (variables or their
    shapes, e.g. from `jax.eval_shape(model.init, ...)`), every key and shape is
    checked and a ConversionError lists all mismatches at once.
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for raw_name, value in state_dict.items():
        name = canonical_name(raw_name)
        if name is None or name.endswith(_SKIPPED_SUFFIXES):
            continue
        # Always a copy: torch.Tensor.numpy() shares memory with the (mutable) tensor.
        array = np.array(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        *module, leaf = name.split(".")
        path = _module_path(module)
        if leaf == "weight" and array.ndim == 4:
            flat[("params", *path, "kernel")] = array.transpose(2, 3, 1, 0)
        elif leaf == "weight" and array.ndim == 2:
            flat[("params", *path, "kernel")] = array.T
        elif leaf == "weight":
            flat[("params", *path, "scale")] = array
        elif leaf == "bias":
            flat[("params", *path, "bias")] = array
        elif leaf == "running_mean":
            flat[("batch_stats", *path, "mean")] = array
        elif leaf == "running_var":
            flat[("batch_stats", *path, "var")] = array
        else:
            raise ConversionError(f"unexpected parameter {raw_name!r}")
    if target is not None:
        check_against(flat, target)
    return unflatten_dict(flat)


def check_against(flat: Mapping[tuple[str, ...], np.ndarray], target: Mapping) -> None:
    """Raise ConversionError naming missing, unexpected and wrongly shaped variables."""
    want = {k: tuple(v.shape) for k, v in flatten_dict(
        {c: target[c] for c in ("params", "batch_stats") if c in target}).items()}
    have = {k: tuple(v.shape) for k, v in flat.items()}
    name = lambda k: "/".join(k)
    missing = sorted(name(k) for k in want.keys() - have.keys())
    unexpected = sorted(name(k) for k in have.keys() - want.keys())
    misshapen = sorted(f"{name(k)} {have[k]} != {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k])
    if missing or unexpected or misshapen:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:8])}{more}")
        raise ConversionError("weights do not match the model: " + "; ".join(parts))
