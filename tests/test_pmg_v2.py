"""PMG-V2 against a PyTorch PMG-V2 written from the method's description (bench/torch_reference.py): the tiles
and their order, tiled stages on both backbone families, the consistency features, eval logits, and one whole
training iteration (three tiled updates over anchors and positives) in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from truth import assert_near_truth

from bench import parity
from bench import torch_reference as ref
from pmg_jax import backbones, config, methods, parallel, state, steps, validate
from pmg_jax.backbones.convnext import Stage
from pmg_jax.errors import ConfigError
from pmg_jax.layers import split_tiles, stitch_tiles
from pmg_jax.optim import make_optimizer
from pmg_jax.pmg_v2 import PMGV2, consistency_feature
from pmg_jax.state import TrainState
from pmg_jax.steps_v2 import make_eval_step, make_train_step

torch.set_num_threads(2)
TINY = dict(num_classes=5, backbone="resnet18", feature_size=16, width=8, stage_sizes=(1, 1, 1, 1))
SIZE = 64  # every tiling divides its stage's input: 16, 16, 8, 4 pixels
TILINGS = [u.tiles for u in methods.PMG_V2.updates("progressive")]


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_the_method_table_declares_the_official_updates():
    assert [(u.tiles, u.head, u.alpha) for u in methods.PMG_V2.updates("progressive")] == list(ref.V2_UPDATES)
    assert methods.PMG_V2.heads == ("head1", "head2", "head3") and methods.PMG_V2.pairs
    assert methods.PMG.heads[-1] == "concat" and methods.PMG.lr_schedule == "cosine"
    with pytest.raises(ConfigError, match="config.method='pmg3'"):
        methods.get("pmg3")


@pytest.mark.parametrize("n", [2, 4, 8])
def test_tiles_are_the_references_split_block_and_concat_block(n):
    x = np.random.default_rng(n).normal(size=(3, 16, 16, 2)).astype(np.float32)
    tiles = np.asarray(split_tiles(jnp.asarray(x), n))
    np.testing.assert_array_equal(tiles, ref.split_block(nchw(x), n).permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(stitch_tiles(jnp.asarray(tiles), n)), x)
    np.testing.assert_array_equal(ref.concat_block(nchw(tiles), n).permute(0, 2, 3, 1).numpy(), x)


@pytest.mark.parametrize("side", [5, 14, 16, 28])
def test_consistency_features_equal_the_references(side):
    x = np.random.default_rng(side).normal(size=(4, side, side, 6))
    with jax.enable_x64(True):
        ours = np.asarray(consistency_feature(jnp.asarray(x)))
    np.testing.assert_allclose(ours, ref.consistency_feature(nchw(x)).numpy(), rtol=0, atol=1e-12)
    assert ours.min() == 0.0 and np.allclose(ours.max(axis=1), 1.0)


@functools.cache
def pair():
    """The reference PMG-V2 (float32, calibrated BatchNorm) and its Flax twin's variables."""
    torch.manual_seed(3)
    model_t = ref.PMGV2(ref.make_resnet("resnet18", 8, (1, 1, 1, 1)), 16, 5)
    parity.randomize_bn(model_t, 3, SIZE)
    return model_t, parity.flax_variables(model_t, PMGV2(**TINY), SIZE)


def as64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2 * n, SIZE, SIZE, 3))
    return x[:n], x[n:], rng.integers(0, 5, n)


@pytest.mark.parametrize("tiles", TILINGS)
def test_tiled_training_forward_equals_split_stage_concat(tiles):
    """Train-mode logits, consistency features and running statistics with the stages tiled equal the
    reference's split_block -> stage -> concat_block (float64 both sides)."""
    model_t, variables = pair()
    anchors, positives, _ = batch()
    x = np.concatenate([anchors, positives])
    model_64 = parity.as_float64(model_t).train()
    with torch.no_grad():
        truth = [t.numpy() for t in model_64(nchw(x), tiles)]
    stats_truth = parity.flat(parity.convert.variables_from_torch(model_64.state_dict(), dtype=np.float64))
    with jax.enable_x64(True):
        model = PMGV2(**TINY, dtype=jnp.float64)
        forward = lambda v, x: model.apply(v, x, train=True, tiles=tiles, consistency=True, mutable=["batch_stats"])
        (logits, feats), updated = jax.jit(forward)(as64(variables), jnp.asarray(x))  # one program, not op by op
    for got, want in zip([*logits, *feats], truth, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-11)
    stats = parity.flat({"batch_stats": updated["batch_stats"]})
    for k, v in stats.items():
        np.testing.assert_allclose(v, stats_truth[k], rtol=1e-12, atol=1e-12, err_msg=k)


@pytest.mark.slow  # three ConvNeXt compilations; the ResNet tilings are checked in the fast tier
@pytest.mark.parametrize("tiles", TILINGS)
def test_convnext_runs_each_tiled_stage_on_its_tiles(tiles):
    """ConvNeXt's tiled stages: each stage's input (the stem's output, then the stitched stage before) cut into
    tiles, the stage's own module run on them, its output stitched back."""
    arch = backbones.resolve("convnext_tiny", 8, (1, 1, 1, 1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
    plain = arch.build(jnp.float32, name="features")
    variables = plain.init(jax.random.PRNGKey(0), x, train=True)
    # layer scales of 1 (not timm's 1e-6), so that the blocks' 7x7 convolutions, which see the tiles' edges, count
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "gamma" else v, variables
    )
    _, inter = plain.apply(variables, x, train=True, capture_intermediates=True)
    got = arch.build(jnp.float32, name="features", tiles=tiles).apply(variables, x, train=True)
    y = inter["intermediates"]["stem_1"]["__call__"][0]
    for i, (n, stage_out) in enumerate(zip(tiles, got, strict=True)):
        stage = Stage(8 * 2**i, (0.0,), downsample=i > 0)
        y = stitch_tiles(stage.apply({"params": variables["params"][f"stages_{i}"]}, split_tiles(y, n), True), n)
        np.testing.assert_allclose(np.asarray(stage_out), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(got[1]), np.asarray(plain.apply(variables, x, train=True)[1]))


def test_eval_logits_are_within_float32_error_and_never_tiled():
    model_t, variables = pair()
    x = np.random.default_rng(5).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    model_t.eval()
    with torch.no_grad():
        torch32 = [t.numpy() for t in model_t(nchw(x))[:3]]
        truth = [t.numpy() for t in parity.as_float64(model_t).eval()(nchw(x).double())[:3]]
    model = PMGV2(**TINY)
    evaluate = jax.jit(lambda v, x, tiles: model.apply(v, x, train=False, tiles=tiles), static_argnums=2)
    ours = evaluate(variables, jnp.asarray(x), ())
    assert_near_truth(ours, torch32, truth, floor=2e-5, what="PMG-V2 eval logits")
    np.testing.assert_array_equal(np.asarray(evaluate(variables, jnp.asarray(x), (2, 2, 2, 2))[0]), ours[0])
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"], (), None)
    labels = np.argmax(truth[0] + truth[1] + truth[2], -1)
    counts = make_eval_step(model)(state, {"image": jnp.asarray(x), "label": labels, "mask": np.ones(4)})
    assert counts.tolist()[3:] == [4, 4]  # the sum of the three heads predicts those labels, 4 images


def jax_iteration(variables, updates=methods.V2_UPDATES, weight_decay=5e-4):
    """One PMG-V2 iteration by pmg_jax's step in float64 (the reference's learning rates)."""
    anchors, positives, labels = batch()
    with jax.enable_x64(True):
        tx = make_optimizer(
            lr_new=0.002, lr_backbone=0.0002, num_epochs=10, steps_per_epoch=100, weight_decay=weight_decay
        )
        params = as64(variables["params"])
        state = TrainState(
            jnp.zeros((), jnp.int32), params, as64(variables["batch_stats"]), tx.init(params), jax.random.PRNGKey(0)
        )
        step = jax.jit(make_train_step(PMGV2(**TINY, dtype=jnp.float64), tx, updates))
        state, metrics = step(state, {"image": anchors, "positive": positives, "label": jnp.asarray(labels)})
        assert int(metrics["nonfinite_pass"]) == 0 and set(metrics) >= {"loss1", "loss2", "loss3", "mse3"}
        return parity.flat({"params": state.params, "batch_stats": state.batch_stats})


@functools.cache
def torch_iteration():
    """The reference iteration in float64: parameters and running statistics in Flax names."""
    model_t, _ = pair()
    model = parity.as_float64(model_t)
    opt = ref.make_optimizer(model)
    ref.set_lr(opt, 0, 10)
    anchors, positives, labels = batch()
    ref.train_iteration_v2(model, opt, nchw(anchors), nchw(positives), torch.from_numpy(labels))
    return parity.flat(parity.convert.variables_from_torch(model.state_dict(), dtype=np.float64))


def iteration_error(ours: dict, truth: dict) -> float:
    """The largest difference over all parameters and statistics, relative to the largest value."""
    assert ours.keys() == truth.keys()
    scale = max(np.abs(v).max() for v in truth.values())
    return max(np.abs(ours[k] - truth[k]).max() for k in truth) / scale


# float64 both sides: what is left is rounding, amplified by BatchNorm over 2B = 4 examples to ~5e-10 of the largest
# value (the classifiers' running variances); a wrong tiling or a dropped consistency term moves it by 1e-4 and more.
ITERATION_TOLERANCE = 1e-8


@pytest.mark.slow  # a whole float64 iteration beside PyTorch: the parity tier
def test_one_float64_iteration_equals_the_references():
    _, variables = pair()
    ours, truth = jax_iteration(variables), torch_iteration()
    assert iteration_error(ours, truth) < ITERATION_TOLERANCE
    before = parity.flat(variables)
    assert all(not np.array_equal(before[k], ours[k]) for k in before if k.startswith("params"))


BREAKS = {
    "tilings swapped": (
        methods.Update(0, (4, 4, 4, 0), 0.01),
        methods.Update(1, (8, 8, 0, 0), 0.05),
        methods.Update(2, (2, 2, 2, 2), 0.1),
    ),
    "no consistency loss": tuple(methods.Update(u.head, u.tiles, 0.0) for u in methods.V2_UPDATES),
}


@pytest.mark.parametrize(
    "updates",
    [pytest.param(BREAKS[name], marks=pytest.mark.slow) for name in ("tilings swapped", "no consistency loss")],
    ids=list(BREAKS),
)
def test_the_iteration_check_fails_for_a_broken_step(updates):
    _, variables = pair()
    assert iteration_error(jax_iteration(variables, updates), torch_iteration()) > 100 * ITERATION_TOLERANCE


@pytest.mark.slow  # compiling the mesh-sharded steps costs ~45 s here
def test_compile_steps_trains_the_configs_method_on_uint8_anchors_and_positives():
    """config.method picks PMG-V2's steps; positives are normalised like the anchors (identical ones give
    identical consistency features, where raw uint8 positives would not)."""
    c = config.for_dataset("demo")
    c.method, c.data.crop_size, c.dataset.num_classes = "pmg_v2", SIZE, TINY["num_classes"]
    c.model.update(backbone="resnet18", width=8, stage_sizes=(1, 1, 1, 1), feature_size=16, kernels="xla")
    model = state.create_model(c)
    assert isinstance(model, PMGV2) and model.width == 8
    tx = make_optimizer(lr_new=0.005, lr_backbone=0.0005, num_epochs=2, steps_per_epoch=10)
    params, stats = pair()[1]["params"], pair()[1]["batch_stats"]
    before = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), jax.random.PRNGKey(0))
    train_step, eval_step = steps.compile_steps(model, tx, c, parallel.make_mesh())
    images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), np.uint8)
    after, metrics = train_step(before, {"image": images, "positive": images.copy(), "label": np.array([0, 1])})
    assert int(metrics["nonfinite_pass"]) == 0 and int(after.step) == 1
    assert all(float(metrics[f"mse{k}"]) < 1e-12 for k in (1, 2, 3))
    counts = eval_step(after, {"image": images, "label": np.array([0, 1]), "mask": np.ones(2)})
    assert counts.shape == (len(methods.PMG_V2.eval_names) + 1,) and int(counts[-1]) == 2


def test_validate_names_the_stage_a_tiling_does_not_divide():
    c = config.for_dataset("demo")
    c.method, c.model.backbone = "pmg_v2", "resnet18"
    c.data.resize_size = c.data.crop_size = 128
    validate.check(c, 1)
    c.data.resize_size = c.data.crop_size = 96
    with pytest.raises(ConfigError, match="stage 2 of resnet18 gets a 24-pixel input at image size 96.*multiple of 64"):
        validate.check(c, 1)
    c.data.resize_size = c.data.crop_size = 128
    c.model.bn_group_size = 2
    with pytest.raises(ConfigError, match="bn_group_size"):
        validate.check(c, 1)


@pytest.mark.parametrize("name", [n for n, b in sorted(backbones.REGISTRY.items()) if "tiles" in b.options])
def test_the_multiple_the_error_suggests_is_exactly_the_sizes_that_tile(name):
    backbone = backbones.REGISTRY[name]
    tilings = [u.tiles for u in methods.PMG_V2.updates("progressive")]
    multiple = backbone.tiling_multiple(tilings)
    for side in range(backbone.stride, 20 * multiple + 1, backbone.stride):
        tiles_all = not any(backbone.tiling_error(side, tiles) for tiles in tilings)
        assert tiles_all == (side % multiple == 0), side
