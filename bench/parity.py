"""How far PMG's float32 results are from the same computation in float64, for pmg_jax and for PyTorch.

The parity tests judge pmg_jax against PyTorch run in float64 (the truth), not against PyTorch's float32 run:
a float32 result carries the rounding of the machine's kernels, and on some CPUs PyTorch's float32
convolution backward is the less accurate side (on an AMD EPYC, the first convolution's momentum after one
iteration of a small ResNet18 PMG is off by 3e-2 in torch float32 and by 4e-5 in pmg_jax). This module
builds the shared cases (a torch PMG with calibrated BatchNorm, the same weights as Flax variables) and
measures each float32 side's error from the float64 truth:

    python -m bench.parity            # the table in bench/RESULTS.md: both backbones, both kernel choices
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import random
import subprocess
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.traverse_util import flatten_dict

from bench import torch_reference as ref
from pmg_jax import convert, kernels
from pmg_jax.model import PMG
from pmg_jax.optim import make_optimizer
from pmg_jax.state import TrainState
from pmg_jax.steps import make_train_step

Flat = dict[str, np.ndarray]  # "params/features/conv1/kernel" -> array, one group of compared values


def randomize_bn(model: torch.nn.Module, seed: int, size: int) -> None:
    """Non-trivial BN affine params, and running statistics calibrated on random batches.

    Calibrating (instead of drawing random running stats) keeps activations at a
    realistic scale, like a trained network's, so logits are O(1-10).
    """
    g = torch.Generator().manual_seed(seed)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    bns = [m for _, m in named]
    last_in_branch = "bn3" if isinstance(model.features.layer1[0], ref.Bottleneck) else "bn2"
    with torch.no_grad():
        for name, m in named:
            c = m.num_features
            # Like a trained ResNet: small scales at the end of each residual branch, else O(1).
            low, high = (0.1, 0.4) if name.endswith(last_in_branch) else (0.5, 1.5)
            m.weight.copy_(low + (high - low) * torch.rand(c, generator=g))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.reset_running_stats()
            m.momentum, m.saved_momentum = None, m.momentum  # cumulative average while calibrating
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, size, size, generator=g))
        for m in bns:
            m.momentum = m.saved_momentum
            del m.saved_momentum
            m.num_batches_tracked.zero_()


def torch_pmg(backbone, width, stage_sizes, feature_size, num_classes, seed, size) -> ref.PMG:
    """The reference PMG (float32) with seeded weights and calibrated BatchNorm."""
    torch.manual_seed(seed)
    model = ref.PMG(ref.make_resnet(backbone, width, stage_sizes), feature_size, num_classes)
    randomize_bn(model, seed, size)
    return model


def flax_variables(model_t: torch.nn.Module, model_j: PMG, size: int) -> dict:
    """The torch model's weights as float32 Flax variables of `model_j`, every name and shape checked."""
    target = jax.eval_shape(lambda: model_j.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    return convert.variables_from_torch(model_t.state_dict(), target=target)


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    """An NCHW torch batch as an NHWC float32 JAX array."""
    return jnp.asarray(x.detach().float().permute(0, 2, 3, 1).numpy())


def as_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a torch model: the same values (float32 is exact in float64), computed in float64."""
    return copy.deepcopy(model).double()


def flat(tree: Mapping, prefix: str = "") -> Flat:
    """A nested mapping of arrays as {"a/b/c": float64 array}."""
    return {prefix + "/".join(k): np.asarray(v, np.float64) for k, v in flatten_dict(dict(tree)).items()}


# ------------------------------------------------------------------ errors against the truth


@dataclasses.dataclass(frozen=True)
class Error:
    """One array's largest absolute error from the truth, and the truth's largest magnitude (its scale)."""

    error: float
    scale: float


def errors(got: Flat, truth: Flat) -> dict[str, Error]:
    """Per array: max |got - truth| and max |truth|. The two must name the same arrays of the same shapes."""
    if got.keys() != truth.keys():
        raise ValueError(f"different arrays: {sorted(got.keys() ^ truth.keys())[:8]}")
    out = {}
    for k, t in truth.items():
        g = np.asarray(got[k], np.float64)
        if g.shape != t.shape:
            raise ValueError(f"{k}: shape {g.shape} != {t.shape}")
        out[k] = Error(float(np.max(np.abs(g - t), initial=0.0)), float(np.max(np.abs(t), initial=0.0)))
    return out


# ------------------------------------------------------------------ one training iteration


@dataclasses.dataclass
class IterationCase:
    """One reference iteration's inputs: the float32 torch model, its Flax twin and variables, a batch, the
    jigsaw permutations."""

    model_t: ref.PMG
    model_j: PMG
    variables: dict
    x: torch.Tensor
    y: torch.Tensor
    perms: dict[int, list[int]]


def iteration_case(
    backbone: str, stage_sizes: Sequence[int], size=64, batch=4, classes=5, width=8, feature_size=16, seed=3
) -> IterationCase:
    """A small PMG (float32 torch and Flax, same weights) and a batch: the whole iteration's code at small cost."""
    model_t = torch_pmg(backbone, width, stage_sizes, feature_size, classes, seed=seed, size=size)
    model_j = PMG(
        num_classes=classes, backbone=backbone, feature_size=feature_size, width=width, stage_sizes=tuple(stage_sizes)
    )
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, classes, batch))
    perms = {n: ref.sample_cycle(n, random.Random(n)) for n in (8, 4, 2)}
    return IterationCase(model_t, model_j, flax_variables(model_t, model_j, size), x, y, perms)


def torch_iteration(case: IterationCase, dtype: torch.dtype) -> dict[str, Flat]:
    """{'params', 'batch_stats', 'momentum'} after one reference iteration computed in `dtype`, in Flax names."""
    model = copy.deepcopy(case.model_t).to(dtype)
    opt = ref.make_optimizer(model)
    ref.set_lr(opt, 0, 10)
    ref.train_iteration(model, opt, case.x.to(dtype), case.y, perms=case.perms)
    after = convert.variables_from_torch(model.state_dict(), dtype=np.float64)
    momentum = {name: opt.state[p]["momentum_buffer"] for name, p in model.named_parameters()}
    return {
        "params": flat(after["params"]),
        "batch_stats": flat(after["batch_stats"]),
        "momentum": flat(convert.variables_from_torch(momentum, dtype=np.float64)["params"]),
    }


def jax_iteration(case: IterationCase, kernel_choice: str = "auto", **changes) -> dict[str, Flat]:
    """The same iteration by pmg_jax's train step (float32). `changes` go to make_optimizer or make_train_step
    (weight_decay=0.0, granularities=(4, 8, 2), ...): the tests break the step with them on purpose."""
    opt_keys = {"weight_decay", "momentum"}
    tx = make_optimizer(
        lr_new=0.002,
        lr_backbone=0.0002,
        num_epochs=10,
        steps_per_epoch=100,
        **{k: v for k, v in changes.items() if k in opt_keys},
    )
    v = case.variables
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=v["params"],
        batch_stats=v["batch_stats"],
        opt_state=tx.init(v["params"]),
        rng=jax.random.PRNGKey(0),
    )
    step_kwargs = {k: val for k, val in changes.items() if k not in opt_keys}
    permutations = {n: jnp.asarray(p) for n, p in case.perms.items()}
    step = make_train_step(case.model_j, tx, permutations=permutations, **step_kwargs)
    step = jax.jit(kernels.traced(step, kernel_choice))
    state, metrics = step(state, {"image": nhwc(case.x), "label": jnp.asarray(case.y.numpy(), jnp.int32)})
    if int(metrics["nonfinite_pass"]):
        raise FloatingPointError(f"non-finite update {int(metrics['nonfinite_pass'])}")
    return {
        "params": flat(state.params),
        "batch_stats": flat(state.batch_stats),
        "momentum": flat(state.opt_state[1].trace),
    }


# ------------------------------------------------------------------ the table


CASES = {"resnet18 (1,1,1,1)": ("resnet18", (1, 1, 1, 1)), "resnet50 (1,2,1,1)": ("resnet50", (1, 2, 1, 1))}
FIRST_CONV = "features/conv1/kernel"


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (the platform's processor string where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def measure(names: Sequence[str]) -> dict:
    """For each case: each float32 side's error from torch float64 after one iteration."""
    torch.set_num_threads(2)
    table = {}
    for name in names:
        case = iteration_case(*CASES[name])
        truth = torch_iteration(case, torch.float64)
        sides = {
            "torch float32": torch_iteration(case, torch.float32),
            "pmg_jax float32, kernels=auto": jax_iteration(case, "auto"),
            "pmg_jax float32, kernels=xla": jax_iteration(case, "xla"),
        }
        table[name] = {}
        for side, got in sides.items():
            errs = {group: errors(got[group], truth[group]) for group in truth}
            table[name][side] = {
                "conv1 momentum": errs["momentum"][FIRST_CONV].error,
                # the worst over each group's arrays, each relative to its own scale
                **{f"{g} worst relative": max(e.error / max(e.scale, 1e-30) for e in errs[g].values()) for g in errs},
            }
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    table = measure(args.cases)
    print(f"CPU: {cpu_model()}; jax {jax.__version__}, torch {torch.__version__}")
    print("one training iteration, float32 result vs torch float64:")
    columns = list(next(iter(table.values()))["torch float32"])
    for name, sides in table.items():
        print(f"\n{name}")
        print(f"  {'':32s}" + "".join(f"{c:>28s}" for c in columns))
        for side, values in sides.items():
            print(f"  {side:32s}" + "".join(f"{values[c]:28.2e}" for c in columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
