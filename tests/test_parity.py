"""Parity with a PyTorch PMG written from the reference behaviour (bench/torch_reference.py).

Same weights (converted with pmg_jax.convert) must give the same logits, BN statistics,
and after one whole training iteration the same parameters and momentum buffers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from bench import torch_reference as ref
from pmg_jax import convert
from pmg_jax.model import PMG
from pmg_jax.optim import make_optimizer
from pmg_jax.state import TrainState
from pmg_jax.steps import make_train_step

torch.set_num_threads(2)


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


def torch_pmg(backbone, width, stage_sizes, feature_size, num_classes, seed, size):
    torch.manual_seed(seed)
    model = ref.PMG(ref.make_resnet(backbone, width, stage_sizes), feature_size, num_classes)
    randomize_bn(model, seed, size)
    return model


def flax_variables(model_t, model_j, size):
    target = jax.eval_shape(lambda: model_j.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    return convert.variables_from_torch(model_t.state_dict(), target=target)


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def resnet50_pair():
    model_t = torch_pmg("resnet50", 64, None, 512, 200, seed=0, size=224)
    model_j = PMG(num_classes=200)
    return model_t, model_j, flax_variables(model_t, model_j, 224)


@pytest.mark.slow
def test_resnet50_logits_eval_and_train_mode(resnet50_pair):
    model_t, model_j, variables = resnet50_pair
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    apply = jax.jit(model_j.apply, static_argnames="train", static_argnums=())

    want = [t.numpy() for t in ref.evaluate_logits(model_t, x)]
    got = apply(variables, nhwc(x), train=False)
    for w, g in zip(want, got):
        assert w.shape == g.shape == (4, 200)
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=0)

    model_t.train()
    with torch.no_grad():
        want = [t.numpy() for t in model_t(x)]
    got, updated = jax.jit(lambda v, x: model_j.apply(v, x, train=True, mutable=["batch_stats"]))(variables, nhwc(x))
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=0)
    # Running statistics after one train-mode forward: unbiased variance, PyTorch momenta.
    stats_t = convert.variables_from_torch(model_t.state_dict())["batch_stats"]
    flat_t, flat_j = flatten_dict(stats_t), flatten_dict(updated["batch_stats"])
    assert flat_t.keys() == flat_j.keys()
    for k in flat_t:
        np.testing.assert_allclose(np.asarray(flat_j[k]), flat_t[k], rtol=1e-4, atol=1e-4, err_msg="/".join(k))


@pytest.mark.parametrize("backbone,stage_sizes", [("resnet50", (1, 2, 1, 1)), ("resnet18", (1, 1, 1, 1))])
def test_one_training_iteration_matches_pytorch(backbone, stage_sizes):
    size, batch, classes, width, fs = 64, 4, 5, 8, 16
    model_t = torch_pmg(backbone, width, stage_sizes, fs, classes, seed=3, size=size)
    model_j = PMG(num_classes=classes, backbone=backbone, feature_size=fs, width=width, stage_sizes=stage_sizes)
    variables = flax_variables(model_t, model_j, size)

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, classes, batch))
    perms = {n: ref.sample_cycle(n, __import__("random").Random(n)) for n in (8, 4, 2)}

    opt_t = ref.make_optimizer(model_t)
    ref.set_lr(opt_t, 0, 10)
    ref.train_iteration(model_t, opt_t, x, y, perms=perms)

    tx = make_optimizer(lr_new=0.002, lr_backbone=0.0002, num_epochs=10, steps_per_epoch=100)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(0),
    )
    step = jax.jit(make_train_step(model_j, tx, permutations={n: jnp.asarray(p) for n, p in perms.items()}))
    state, metrics = step(state, {"image": nhwc(x), "label": jnp.asarray(y.numpy(), jnp.int32)})
    assert int(metrics["nonfinite_pass"]) == 0

    after = convert.variables_from_torch(model_t.state_dict())
    momentum = convert.variables_from_torch(
        {name: opt_t.state[p]["momentum_buffer"] for name, p in model_t.named_parameters()}
    )["params"]
    trace = state.opt_state[1].trace
    for label, want, got, tol in [
        ("params", after["params"], state.params, 2e-5),
        ("batch_stats", after["batch_stats"], state.batch_stats, 1e-4),
        ("momentum", momentum, trace, 2e-4),
    ]:
        flat_w, flat_g = flatten_dict(want), flatten_dict(got)
        assert flat_w.keys() == flat_g.keys(), label
        for k in flat_w:
            np.testing.assert_allclose(
                np.asarray(flat_g[k]), flat_w[k], atol=tol, rtol=1e-4, err_msg=f"{label} {'/'.join(k)}"
            )
    # The iteration really moved every parameter (weight decay + momentum reach all of them).
    before = flatten_dict(variables["params"])
    moved = flatten_dict(state.params)
    assert all(not np.array_equal(before[k], np.asarray(moved[k])) for k in before)
