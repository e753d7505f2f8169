"""Fitting PMG on accelerators: rematerialisation, gradient accumulation, ghost BatchNorm, the joint schedule,
their config checks and the profile summariser; each against an independent computation."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from bench import profile_summary
from pmg_jax import backbones, validate, xla_options
from pmg_jax import config as config_lib
from pmg_jax import jigsaw as jigsaw_lib
from pmg_jax import model as model_lib
from pmg_jax.errors import ConfigError
from pmg_jax.layers import BatchNorm
from pmg_jax.model import PMG
from pmg_jax.optim import make_optimizer
from pmg_jax.state import TrainState, abstract_variables, init_variables
from pmg_jax.steps import make_train_step

TINY = {"num_classes": 3, "backbone": "resnet18", "width": 4, "feature_size": 8, "stage_sizes": (1, 1, 1, 1)}
SIZE, BATCH, LR = 32, 4, 0.05
PERMS = {n: jigsaw_lib.sample_cycle(jax.random.PRNGKey(n), n) for n in (8, 4, 2)}


def _batch(dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)), dtype),
        "label": jnp.asarray(rng.integers(0, TINY["num_classes"], BATCH), jnp.int32),
    }


def _variables(model: PMG, seed: int, dtype=jnp.float32) -> dict:
    """The model's initial variables (jitted: eager initialisation is slow), in `dtype`."""
    variables = jax.jit(lambda key: init_variables(model, key, SIZE))(jax.random.PRNGKey(seed))
    return jax.tree.map(lambda v: v.astype(dtype), variables)


def _state(model: PMG, tx, dtype=jnp.float32) -> TrainState:
    variables = _variables(model, 1, dtype)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(2),
    )


def _view(images: jax.Array, p: model_lib.Pass) -> jax.Array:
    """A pass's input, as the reference builds it."""
    if p.jigsaw is None:
        return images
    n = (8, 4, 2)[p.jigsaw]
    return jigsaw_lib.shuffle_blocks(images, n, PERMS[n])


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _assert_trees_close(want, got, rtol, atol, label):
    flat_w, flat_g = flatten_dict(want), flatten_dict(got)
    assert flat_w.keys() == flat_g.keys(), label
    for k in flat_w:
        np.testing.assert_allclose(
            np.asarray(flat_g[k]), np.asarray(flat_w[k]), rtol=rtol, atol=atol, err_msg=f"{label} {'/'.join(k)}"
        )


# --- rematerialisation -------------------------------------------------------------------------------------


def _checkpoint_regions(model: PMG, variables: dict, train: bool) -> int:
    """How many jax.checkpoint regions the forward holds."""
    x = jnp.zeros((2, SIZE, SIZE, 3))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=train, mutable=["batch_stats"]))(variables).jaxpr

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name.startswith(("checkpoint", "remat"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += count(sub)
        return total

    return count(jaxpr)


@pytest.mark.parametrize("remat,regions", [("none", 0), ("blocks", 3 + 4), ("stages", 3 + 4 + 1 + 4)])
def test_remat_wraps_the_declared_regions_in_training_only(remat, regions):
    """blocks: the 3 granularity blocks and 4 heads; stages: also the stem and the 4 backbone stages."""
    model = PMG(**TINY, remat=remat)
    variables = abstract_variables(model, SIZE)
    assert _checkpoint_regions(model, variables, train=True) == regions
    assert _checkpoint_regions(model, variables, train=False) == 0


@pytest.fixture(scope="module")
def remat_iterations():
    """One float32 iteration (reference optimizer) of the tiny model per remat setting, from the same state. The
    joint schedule: its one forward and backward hold the same remat regions and compile in a quarter of the time."""
    tx = make_optimizer(lr_new=0.01, lr_backbone=0.01, num_epochs=2, steps_per_epoch=10, schedule="joint")
    results = {}
    for remat in model_lib.REMAT:
        model = PMG(**TINY, remat=remat)
        state = _state(model, tx)
        step = make_train_step(model, tx, permutations=PERMS, schedule="joint")
        results[remat] = (state, jax.jit(step)(state, _batch())[0])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["blocks", "stages"])
def test_remat_gives_the_same_iteration(remat_iterations, remat):
    """Same parameters, statistics and momentum after one iteration. Not bit for bit in float32: the backward
    reads BatchNorm statistics and activations recomputed by separately compiled (differently fused) code,
    which round differently by an ulp or so, and the heads' BatchNorms over few images amplify that; after an
    iteration parameters and momentum differ by up to a few 1e-6, so each is compared to within 1e-4 of its
    largest magnitude (the parameters' moves, which exceed 1e-3, to within 1e-3 of the largest move)."""
    before, plain = remat_iterations["none"]
    _, rematted = remat_iterations[remat]
    moves = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), plain.params, before.params)
    largest = max(float(np.abs(m).max()) for m in jax.tree.leaves(moves))
    assert largest > 1e-3
    jax.tree.map(
        lambda m, b, r: np.testing.assert_allclose(np.asarray(r) - np.asarray(b), m, atol=1e-3 * largest),
        moves,
        before.params,
        rematted.params,
    )
    _assert_trees_close(plain.batch_stats, rematted.batch_stats, 1e-5, 1e-6, "batch_stats")
    trace = plain.opt_state[1].trace
    scale = max(float(np.abs(t).max()) for t in jax.tree.leaves(trace))
    _assert_trees_close(trace, rematted.opt_state[1].trace, 0, 1e-4 * scale, "momentum")


@pytest.mark.slow  # two whole-step compilations for their memory analysis
def test_remat_stages_saves_memory_in_the_training_steps_compilation():
    """XLA's buffer assignment for one forward and backward, compiled as the training step is: 'stages' keeps
    only stage outputs, so its temporaries shrink (on XLA:CPU only because the step keeps its optimisation
    barriers, see pmg_jax/xla_options.py; without that CSE merged the recomputation away)."""
    size, batch = 64, 8
    temps = {}
    for remat in ("none", "stages"):
        model = PMG(**{**TINY, "width": 8}, remat=remat)
        variables = abstract_variables(model, size)

        def loss(params, stats, x, y, model=model):
            logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return _ce(logits[model_lib.CONCAT], y)

        compiled = (
            xla_options.jit(jax.grad(loss), program="train")
            .lower(
                variables["params"],
                variables["batch_stats"],
                jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                jax.ShapeDtypeStruct((batch,), jnp.int32),
            )
            .compile()
        )
        temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["stages"] < 0.8 * temps["none"], temps


# --- gradient accumulation and the joint schedule (float64: the maths is exact) -----------------------------


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _sgd_iteration(accumulation_steps=1, schedule="progressive"):
    """(model, state before, state after) of one float64 iteration with plain SGD."""
    model = PMG(**TINY, dtype=jnp.float64)
    tx = optax.sgd(LR)
    state = _state(model, tx, jnp.float64)
    step = jax.jit(
        make_train_step(model, tx, permutations=PERMS, accumulation_steps=accumulation_steps, schedule=schedule)
    )
    new, metrics = step(state, _batch(jnp.float64))
    assert int(metrics["nonfinite_pass"]) == 0
    return model, state, new


@pytest.mark.slow
def test_accumulation_averages_the_micro_batch_gradients_of_each_pass(x64):
    """Each pass's update is SGD on the mean of k gradients computed one micro-batch at a time (examples i,
    i + k, ...), each with its BatchNorm normalising that micro-batch and moving the running statistics."""
    k = 2
    model, state, new = _sgd_iteration(accumulation_steps=k)
    batch = _batch(jnp.float64)

    @jax.jit
    def micro_grad(params, stats, x, y, weights):
        def loss(params):
            logits, updated = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return sum(w * _ce(z, y) for w, z in zip(weights, logits, strict=True)), updated["batch_stats"]

        return jax.grad(loss, has_aux=True)(params)

    params, stats = state.params, state.batch_stats
    for p in model_lib.PASSES:
        x = _view(batch["image"], p)
        weights = jnp.zeros(len(model_lib.HEADS)).at[p.head].set(2.0 if p.jigsaw is None else 1.0)
        grads = []
        for i in range(k):
            g, stats = micro_grad(params, stats, x[i::k], batch["label"][i::k], weights)
            grads.append(g)
        mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
        params = jax.tree.map(lambda w, g: w - LR * g, params, mean)
    _assert_trees_close(params, new.params, 1e-10, 1e-12, "params")
    _assert_trees_close(stats, new.batch_stats, 1e-10, 1e-12, "batch_stats")


@pytest.mark.slow  # two float64 compilations: the joint training step and the summed loss's gradient
def test_joint_is_one_sgd_step_on_the_summed_loss(x64):
    """One update: the gradient of CE(head1 | jigsaw 8) + CE(head2 | 4) + CE(head3 | 2) + 2 CE(concat | x),
    all four inputs through the network as one batch (BatchNorm over the 4B images, statistics moved once)."""
    model, state, new = _sgd_iteration(schedule="joint")
    batch = _batch(jnp.float64)
    x = jnp.concatenate([_view(batch["image"], p) for p in model_lib.PASSES])

    def loss(params):
        logits, updated = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        terms = [
            (2.0 if p.jigsaw is None else 1.0) * _ce(logits[p.head][j * BATCH : (j + 1) * BATCH], batch["label"])
            for j, p in enumerate(model_lib.PASSES)
        ]
        return sum(terms), updated["batch_stats"]

    grads, stats = jax.jit(jax.grad(loss, has_aux=True))(state.params)
    _assert_trees_close(jax.tree.map(lambda w, g: w - LR * g, state.params, grads), new.params, 1e-10, 1e-12, "params")
    _assert_trees_close(stats, new.batch_stats, 1e-10, 1e-12, "batch_stats")


@pytest.mark.parametrize("schedule,per_iteration", [("progressive", 4), ("joint", 1)])
def test_learning_rate_epochs_count_the_schedules_updates(schedule, per_iteration):
    """With one iteration per epoch the cosine steps down every 4 updates (progressive) or every one (joint)."""
    epochs = 4
    tx = make_optimizer(
        lr_new=1.0,
        lr_backbone=1.0,
        num_epochs=epochs,
        steps_per_epoch=1,
        momentum=0.0,
        weight_decay=0.0,
        schedule=schedule,
    )
    params = {"conv_block1_0": jnp.zeros(())}
    opt_state, lrs = tx.init(params), []
    for _ in range(8):
        updates, opt_state = tx.update({"conv_block1_0": jnp.ones(())}, opt_state, params)
        lrs.append(-float(updates["conv_block1_0"]))
    want = [0.5 * (np.cos(np.pi * ((u // per_iteration) % epochs) / epochs) + 1) for u in range(8)]
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    assert model_lib.updates_per_iteration(schedule) == per_iteration


# --- ghost BatchNorm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 5, 4, 3), (16, 6)])
@pytest.mark.parametrize("group_stats", ["mean", "first"])
def test_ghost_batchnorm_is_two_separate_batchnorms(x64, shape, group_stats):
    """A group of 8 in a batch of 16: outputs and gradients of two 8-image BatchNorms, running statistics from
    their mean (or the first's), on NHWC maps and on the heads' (B, C) features."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64) * 3 + 1
    cot = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float64)
    ghost = BatchNorm(momentum=0.1, dtype=jnp.float64, group_size=8, group_stats=group_stats)
    plain = BatchNorm(momentum=0.1, dtype=jnp.float64)
    variables = plain.init(jax.random.PRNGKey(2), x[:8], train=False)
    variables = {
        "params": jax.tree.map(lambda v: v + jnp.arange(v.shape[0]) * 0.3, variables["params"]),
        "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"]),
    }

    def run(module, params, x):
        y, updated = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return y, updated["batch_stats"]

    def value_and_vjp(module):
        """(y, running statistics, d_params, d_x) of `module` for a cotangent of y, as one compiled program."""

        def f(params, x, cot):
            (y, stats), vjp = jax.vjp(lambda p, x: run(module, p, x), params, x)
            return y, stats, *vjp((cot, jax.tree.map(jnp.zeros_like, stats)))

        return jax.jit(f)

    y, stats, d_params, d_x = value_and_vjp(ghost)(variables["params"], x, cot)
    halves = [value_and_vjp(plain)(variables["params"], x[h], cot[h]) for h in (slice(0, 8), slice(8, 16))]
    np.testing.assert_allclose(y, jnp.concatenate([halves[0][0], halves[1][0]]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_x, jnp.concatenate([halves[0][3], halves[1][3]]), rtol=1e-10, atol=1e-12)
    _assert_trees_close(jax.tree.map(jnp.add, halves[0][2], halves[1][2]), d_params, 1e-10, 1e-12, "d_params")
    want = (
        halves[0][1] if group_stats == "first" else jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
    )
    _assert_trees_close(want, stats, 1e-12, 1e-12, "running statistics")
    with pytest.raises(ValueError, match="group_size=8 does not divide the batch of 12"):
        run(ghost, variables["params"], x[:12])


@pytest.mark.slow  # compiles a whole ghost-BatchNorm PMG step
def test_ghost_batchnorm_reaches_every_batchnorm_of_pmg(x64):
    """With groups of half the batch, the first half's logits and (first-group) running statistics are those of
    the ungrouped PMG on that half alone: every BatchNorm, backbone, blocks and heads, normalised by groups."""
    images = _batch(jnp.float64)["image"]
    grouped = PMG(**TINY, dtype=jnp.float64, bn_group_size=BATCH // 2, bn_group_stats="first")
    plain = PMG(**TINY, dtype=jnp.float64)
    variables = _variables(plain, 0, jnp.float64)

    def apply(model, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    logits, updated = jax.jit(lambda x: apply(grouped, x))(images)
    want, want_updated = jax.jit(lambda x: apply(plain, x))(images[: BATCH // 2])
    for w, g in zip(want, logits, strict=True):
        np.testing.assert_allclose(g[: BATCH // 2], w, rtol=1e-9, atol=1e-9)
    _assert_trees_close(want_updated["batch_stats"], updated["batch_stats"], 1e-9, 1e-10, "batch_stats")
    other, _ = jax.jit(lambda x: apply(plain, x))(images)
    assert not np.allclose(other[0][: BATCH // 2], logits[0][: BATCH // 2], atol=1e-3)  # grouping changes them


# --- config checks -----------------------------------------------------------------------------------------


@pytest.fixture
def plain_backbone():
    """resnet18 registered again without build options, as a backbone from outside might be."""
    backbone = dataclasses.replace(backbones.get("resnet18"), name="resnet18_plain", options=())
    backbones.register(backbone)
    yield backbone
    del backbones.REGISTRY[backbone.name]


@pytest.mark.parametrize(
    "overrides,devices,field",
    [
        ({"schedule": "parallel"}, 1, "config.schedule="),
        ({"accumulation_steps": 0}, 1, "config.accumulation_steps=0"),
        ({"accumulation_steps": 3}, 1, "config.accumulation_steps=3"),
        ({"accumulation_steps": 4}, 8, "config.accumulation_steps=4"),
        ({"model.remat": "all"}, 1, "config.model.remat="),
        ({"model.remat": "stages", "model.backbone": "resnet18_plain"}, 1, "config.model.remat='stages'"),
        ({"model.bn_group_size": -8}, 1, "config.model.bn_group_size=-8"),
        ({"model.bn_group_size": 5}, 1, "config.model.bn_group_size=5"),
        ({"model.bn_group_size": 8, "accumulation_steps": 4}, 1, "config.model.bn_group_size=8"),
        ({"model.bn_group_size": 8, "model.backbone": "resnet18_plain"}, 1, "config.model.bn_group_size=8"),
        ({"model.bn_group_stats": "last"}, 1, "config.model.bn_group_stats="),
    ],
)
def test_bad_accelerator_options_are_refused_in_one_line(plain_backbone, overrides, devices, field):
    config = config_lib.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ConfigError) as error:
        validate.check(config, num_devices=devices)
    message = str(error.value)
    assert message.startswith(field) and "\n" not in message, message


def test_good_accelerator_options_pass_and_undeclared_build_options_are_refused(plain_backbone):
    config = config_lib.get_config()
    config.update({"schedule": "joint", "accumulation_steps": 2})
    config.model.update({"remat": "stages", "bn_group_size": 8, "bn_group_stats": "first"})
    validate.check(config, num_devices=1)
    config.model.update({"backbone": "resnet18_plain", "remat": "blocks", "bn_group_size": 0})
    validate.check(config, num_devices=1)  # blocks need nothing of the backbone
    with pytest.raises(ValueError, match="resnet18_plain does not take the build option remat=True"):
        backbones.resolve("resnet18_plain").build(jnp.float32, "features", remat=True)


# --- the profile summariser --------------------------------------------------------------------------------


def test_profile_summary_ranks_the_ops_of_a_cpu_trace(tmp_path):
    def sort_and_add(x, y):
        return jnp.sort(x) * 2, y + 1

    step = jax.jit(sort_and_add)
    x, y = jnp.asarray(np.random.default_rng(0).normal(size=2**18), jnp.float32), jnp.ones(8)
    jax.block_until_ready(step(x, y))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(step(x, y))
    rows = profile_summary.summarise(str(tmp_path), top=15, steps=3)
    assert rows[0]["op"].startswith("sort") and rows[0]["share"] > 0.5, rows
    assert {r["module"] for r in rows} == {"jit_sort_and_add"}
    assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
    assert 0.99 < sum(r["share"] for r in rows) <= 1.0 + 1e-9  # every op of the step is listed
    add = next(r for r in rows if "add" in r["op"])
    assert add["count"] == 3 and add["ms_per_step"] == pytest.approx(add["total_ms"] / 3)
    table = profile_summary.table(rows)
    assert table.splitlines()[2].startswith(f"| 1 | {rows[0]['op']} | jit_sort_and_add |")
    with pytest.raises(FileNotFoundError, match="no perfetto_trace"):
        profile_summary.summarise(str(tmp_path / "empty"))
