"""Parity with a PyTorch PMG written from the reference behaviour (bench/torch_reference.py).

Same weights (converted with pmg_jax.convert) must give the same logits, BN statistics, and after one
whole training iteration the same parameters and momentum buffers. "The same" is judged against PyTorch
computing in float64 (the truth): pmg_jax's float32 result must be within a few times PyTorch float32's own
error from it, plus a small floor relative to the values' scale (tests/truth.py says why, and
bench/parity.py measures both errors).
"""

import functools

import jax
import numpy as np
import pytest
import torch
from truth import assert_near_truth, excess

from bench import parity
from bench import torch_reference as ref
from bench.parity import flax_variables, nhwc, torch_pmg
from pmg_jax import convert
from pmg_jax.model import PMG

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def resnet50_pair():
    model_t = torch_pmg("resnet50", 64, None, 512, 200, seed=0, size=224)
    model_j = PMG(num_classes=200)
    return model_t, model_j, flax_variables(model_t, model_j, 224)


def _train_forward(model: torch.nn.Module, x: torch.Tensor):
    """Train-mode logits and the running statistics after that one forward, in Flax names (float64)."""
    model.train()
    with torch.no_grad():
        logits = [t.double().numpy() for t in model(x)]
    return logits, parity.flat(convert.variables_from_torch(model.state_dict(), dtype=np.float64)["batch_stats"])


# Logits are O(1-10) sums over 2048-channel features: float32 accumulation costs ~1e-6 of their scale, and
# a wrong layer moves them by far more. The floor holds ours where PyTorch float32 happens to round better.
LOGIT_FLOOR = 2e-5
# A running statistic after one forward: a mean and unbiased variance over 4 x 7 x 7 pixels and momentum 0.1.
STATS_FLOOR = 1e-5


@pytest.mark.slow
def test_resnet50_logits_eval_and_train_mode(resnet50_pair):
    model_t, model_j, variables = resnet50_pair
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model_64 = parity.as_float64(model_t)

    truth = [t.numpy() for t in ref.evaluate_logits(model_64, x.double())]
    torch32 = [t.numpy() for t in ref.evaluate_logits(model_t, x)]
    ours = jax.jit(lambda v, x: model_j.apply(v, x, train=False))(variables, nhwc(x))
    assert all(np.shape(o) == (4, 200) for o in ours)
    assert_near_truth(ours, torch32, truth, floor=LOGIT_FLOOR, what="eval-mode logits")

    truth, stats_truth = _train_forward(model_64, x.double())
    torch32, stats_torch32 = _train_forward(model_t, x)
    ours, updated = jax.jit(lambda v, x: model_j.apply(v, x, train=True, mutable=["batch_stats"]))(variables, nhwc(x))
    assert_near_truth(ours, torch32, truth, floor=LOGIT_FLOOR, what="train-mode logits")
    # Running statistics after one train-mode forward: unbiased variance, PyTorch momenta.
    stats_ours = parity.flat(updated["batch_stats"])
    assert stats_ours.keys() == stats_truth.keys()
    assert_near_truth(stats_ours, stats_torch32, stats_truth, floor=STATS_FLOOR, what="running statistics")


# Floors of the iteration's groups, as a fraction of the group's largest value (see tests/truth.py). Parameters
# and statistics move by lr x momentum and by 0.1 x a batch statistic from exact float32 starting values:
# float32 costs ~1e-7 of their scale. The momentum buffers are gradients summed over the batch and pixels of
# four passes, with cancellation in the small ones: ours are within 2e-5 of the largest gradient on the CPUs
# measured. A dropped weight decay or two swapped passes moves them by 1e-4 to 1 of that (test below).
ITERATION_FLOORS = {"params": 2e-6, "batch_stats": 2e-6, "momentum": 1e-4}
ITERATION_CASES = {"resnet50": ("resnet50", (1, 2, 1, 1)), "resnet18": ("resnet18", (1, 1, 1, 1))}


@functools.cache
def reference_iteration(name: str):
    """(case, truth, torch float32) of one reference iteration of a small PMG: every code path of the full one."""
    case = parity.iteration_case(*ITERATION_CASES[name])
    return case, parity.torch_iteration(case, torch.float64), parity.torch_iteration(case, torch.float32)


@pytest.mark.slow  # whole iterations beside PyTorch in float64: the parity tier
@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_one_training_iteration_matches_pytorch(name):
    case, truth, torch32 = reference_iteration(name)
    ours = parity.jax_iteration(case)
    for group, floor in ITERATION_FLOORS.items():
        assert ours[group].keys() == truth[group].keys(), group
        assert_near_truth(ours[group], torch32[group], truth[group], floor=floor, what=f"{name} {group}")
    # The iteration really moved every parameter (weight decay + momentum reach all of them).
    before = parity.flat(case.variables["params"])
    assert all(not np.array_equal(before[k], ours["params"][k]) for k in before)


BREAKS = {
    "no weight decay": dict(weight_decay=0.0),
    "passes swapped": dict(granularities=(4, 8, 2)),
    "momentum 0.8": dict(momentum=0.8),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(BREAKS.values()), ids=list(BREAKS))
def test_the_iteration_check_fails_for_a_broken_step(change):
    """The tolerances are tight enough to see a dropped weight decay, two swapped passes or a wrong momentum, on
    the case where PyTorch float32 is furthest from the truth (on an AMD EPYC, its first convolution's momentum
    by 3e-2)."""
    case, truth, torch32 = reference_iteration("resnet18")
    broken = parity.jax_iteration(case, **change)
    worst = max(
        max(excess(broken[g], torch32[g], truth[g], floor=floor).values()) for g, floor in ITERATION_FLOORS.items()
    )
    assert worst > 0, f"a step with {change} passes the parity check"
