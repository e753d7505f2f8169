"""ConvNeXt and ResNet-D against timm on the same weights, their conversion from timm files, and drop path."""

import json
import math

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from torchvision_stand_in import import_beside_cpu_torch
from truth import assert_near_truth

from bench.parity import as_float64
from pmg_jax import backbones, convert
from pmg_jax.backbones.convnext import Block, ConvNeXt, drop_path, layer_norm

torch.set_num_threads(2)
timm = import_beside_cpu_torch("timm")

TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=4)  # timm's arguments; width 8 here


def randomize(model: torch.nn.Module, seed: int, calibrate: torch.Tensor | None = None) -> torch.nn.Module:
    """Random weights, norm affine parameters, biases and layer scales, and (with `calibrate`) BN running
    statistics measured on that batch, so every mapped tensor shapes the output and activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    names = [name for name, _ in model.named_parameters()]
    # the last BN of a ResNet's residual branches: its scale sets how much each block adds
    last_bn = ".bn3.weight" if any(n.endswith(".bn3.weight") for n in names) else ".bn2.weight"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # conv / linear weights with unit gain: GELU inputs of O(1), not timm's std 0.02
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("gamma"):  # ConvNeXt's layer scale, 1e-6 at init: blocks would be no-ops
                p.copy_(0.1 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith(last_bn):  # small, like a trained ResNet's
                p.copy_(0.05 + 0.2 * torch.rand(p.shape, generator=g))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if calibrate is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = 1.0  # the running statistics become this batch's
            model.train()(calibrate)
    return model.eval()


def stage_maps(model: torch.nn.Module, x: torch.Tensor, resnet: bool) -> list[np.ndarray]:
    """timm's four stage outputs (its `forward_intermediates`; a ResNet's index 0 is the stem), NHWC."""
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[1, 2, 3, 4] if resnet else None, intermediates_only=True)
    return [m.permute(0, 2, 3, 1).numpy() for m in maps]


def assert_maps_match_timm(got, model: torch.nn.Module, x: torch.Tensor, resnet: bool, floor: float = 1e-5) -> None:
    """Our four stage maps against timm computing in float64 on the same weights (the truth): within a few
    times timm float32's own error plus `floor` of the maps' largest magnitude (tests/truth.py). The floor is
    what float32 sums over a few thousand terms per output cost, well below what a wrong layer changes."""
    torch32 = stage_maps(model, x, resnet)
    truth = stage_maps(as_float64(model), x.double(), resnet)
    assert len(got) == len(truth) == 4
    assert_near_truth([np.asarray(g, np.float32) for g in got], torch32, truth, floor=floor, what="stage maps")


def stage_channels(model: torch.nn.Module) -> tuple[int, ...]:
    """Output channels of a timm model's four stages (a ResNet's feature_info starts with its stem)."""
    return tuple(f["num_chs"] for f in model.feature_info)[-4:]


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def under_features(module: nn.Module, size: int) -> dict:
    """Abstract variables with the backbone under 'features', as PMG holds it."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    return {c: {"features": tree} for c, tree in shapes.items()}


def features(variables: dict) -> dict:
    return {c: tree["features"] for c, tree in variables.items() if "features" in tree}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_tiny", "resnet50d"])
def test_stage_maps_equal_timm_at_224_directly_and_through_safetensors(name, tmp_path):
    """The registered backbone at its standard width and depths is timm's model of that name."""
    resnet = name.startswith("resnet")
    module = backbones.resolve(name).build(jnp.float32, name=None)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model = randomize(timm.create_model(name, pretrained=False), seed=2, calibrate=x if resnet else None)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    target = under_features(module, 224)

    direct = convert.variables_from_torch(model.state_dict(), target=target)  # head / fc dropped
    assert_maps_match_timm(forward(features(direct), nhwc(x)), model, x, resnet)

    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))  # as the Hugging Face hub ships timm weights
    loaded = convert.load_backbone(str(path), target)
    assert_maps_match_timm(forward(features(loaded), nhwc(x)), model, x, resnet)


@pytest.mark.parametrize("name", ["resnet18d", "resnet50d"])
def test_tiny_resnet_d_matches_timm_on_odd_sides(name):
    """100 -> 50 -> 25 -> 13 -> 7 -> 4: the shortcut's average pools see odd sides (ceil mode, partial windows)."""
    x = torch.randn(2, 3, 100, 100, generator=torch.Generator().manual_seed(3))
    model = randomize(timm.create_model(name, pretrained=False, **TINY_RESNET), seed=4, calibrate=x)
    found = convert.infer_architecture(model.state_dict())
    assert found == convert.Architecture(name, 8, TINY_RESNET["layers"], None, None)
    arch = backbones.resolve(found.backbone, found.width, found.stage_sizes)
    assert arch.channels == stage_channels(model)
    module = arch.build(jnp.float32, name=None)
    variables = convert.variables_from_torch(model.state_dict(), target=under_features(module, 100))
    assert_maps_match_timm(
        jax.jit(module.apply, static_argnames="train")(features(variables), nhwc(x), train=False), model, x, True
    )


@pytest.fixture(scope="module")
def tiny_convnext():
    """A tiny randomised timm ConvNeXt, its Flax twin, the converted backbone variables and a 72x72 batch."""
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(6)
    model = randomize(timm.create_model("convnext_tiny", pretrained=False, **TINY_CONVNEXT), seed=6)
    module = ConvNeXt(**TINY_CONVNEXT)
    variables = convert.variables_from_torch(model.state_dict(), target=under_features(module, 72))
    return model, module, features(variables), x


def test_tiny_convnext_matches_timm_on_a_side_not_divisible_by_32(tiny_convnext):
    """72 -> 18 -> 9 -> 4 -> 2: the 2x2/2 downsampling convs drop the odd row and column, as torch's do."""
    model, module, variables, x = tiny_convnext
    found = convert.infer_architecture(model.state_dict())
    assert found == convert.Architecture("convnext_tiny", 8, TINY_CONVNEXT["depths"], None, None)
    arch = backbones.resolve(found.backbone, found.width, found.stage_sizes)
    assert (
        (arch.stage_sizes, arch.channels)
        == (tuple(module.depths), stage_channels(model))
        == (TINY_CONVNEXT["depths"], TINY_CONVNEXT["dims"])
    )
    assert_maps_match_timm(
        jax.jit(module.apply, static_argnames="train")(variables, nhwc(x), train=False), model, x, False
    )


@pytest.mark.parametrize(
    "name", ["convnext_tiny", "convnext_small", "convnext_base", "resnet50d", "resnet101d", "resnet18d", "resnet50"]
)
def test_infer_architecture_names_timm_variants(name):
    model = timm.create_model(name, pretrained=False, device="meta")  # shapes only, no memory
    resnet = name.startswith("resnet")
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)] if resnet else [s.blocks for s in model.stages]
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from DataParallel

    found = convert.infer_architecture(prefixed)

    assert (found.backbone, found.stage_sizes, found.feature_size, found.num_classes) == (name, (), None, None)
    arch = backbones.resolve(found.backbone, found.width, found.stage_sizes)
    assert found.width == backbones.get(name).width
    assert arch.stage_sizes == tuple(len(s) for s in stages) and arch.channels == stage_channels(model)


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("convnext_atto", {}, "1x1-convolution MLPs (timm's conv_mlp=True"),
        (
            "convnext_tiny",
            {"dims": (8, 16, 24, 32)},
            "a ConvNeXt with channels (8, 16, 24, 32): only those that double",
        ),
        ("resnet50c", {}, "a deep stem but a strided-conv shortcut"),
        ("resnet26t", {}, "deep stem has (24, 32, 64) channels: only ResNet-D's (width/2, width/2, width)"),
    ],
)
def test_infer_architecture_refuses_unsupported_timm_variants(name, kwargs, expected):
    model = timm.create_model(name, pretrained=False, device="meta", **kwargs)
    with pytest.raises(convert.ConversionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        convert.infer_architecture(model.state_dict())


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny timm ConvNeXt and ResNet-D as .safetensors, a truncated copy and a file that holds no backbone."""
    d = tmp_path_factory.mktemp("backbones")
    for name, kwargs in (("convnext_tiny", TINY_CONVNEXT), ("resnet50d", TINY_RESNET)):
        model = timm.create_model(name, pretrained=False, **kwargs)
        safetensors.torch.save_file(model.state_dict(), str(d / f"{name}.safetensors"))
    data = (d / "convnext_tiny.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    safetensors.torch.save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(d / "vgg.safetensors"))
    return d


@pytest.mark.parametrize(
    "file,expected",
    [
        (
            "truncated.safetensors",
            r"truncated\.safetensors: cannot read it as a safetensors file \(truncated or corrupt",
        ),
        ("vgg.safetensors", r"vgg\.safetensors: not a state dict of a known backbone or PMG"),
        (
            "resnet50d.safetensors",
            r"^weights do not match the model: missing \d+: params/features/stages_0/.*; unexpected "
            r"\d+: batch_stats/features/bn1/mean, .* \(.*resnet50d\.safetensors holds a resnet50d "
            r"backbone \(blocks \(1, 1, 1, 1\), channels \(32, 64, 128, 256\)\)\)$",
        ),
    ],
)
def test_load_backbone_refuses_bad_files_in_one_line(tiny_files, file, expected):
    target = under_features(ConvNeXt(**TINY_CONVNEXT), 64)
    with pytest.raises(convert.ConversionError, match=expected) as error:
        convert.load_backbone(str(tiny_files / file), target)
    assert "\n" not in str(error.value)


def test_load_backbone_keeps_the_rest_and_needs_no_batch_stats_for_convnext(tiny_files):
    """A ConvNeXt has no BatchNorm: its PMG's batch_stats (the blocks' and heads') are left as they are."""
    target = under_features(ConvNeXt(**TINY_CONVNEXT), 64)
    heads = {"classifier1_0": {"mean": np.full(4, 7.0), "var": np.ones(4)}}
    target["params"]["classifier1_4"] = {"kernel": np.full((3, 2), 5.0)}
    target["batch_stats"] = heads

    loaded = convert.load_backbone(str(tiny_files / "convnext_tiny.safetensors"), target)

    assert loaded["batch_stats"] is heads
    np.testing.assert_array_equal(loaded["params"]["classifier1_4"]["kernel"], np.full((3, 2), 5.0))
    want = safetensors.torch.load_file(str(tiny_files / "convnext_tiny.safetensors"))
    np.testing.assert_array_equal(
        loaded["params"]["features"]["stages_2"]["blocks_0"]["gamma"], want["stages.2.blocks.0.gamma"].numpy()
    )
    np.testing.assert_array_equal(
        loaded["params"]["features"]["stages_2"]["blocks_0"]["conv_dw"]["kernel"],
        want["stages.2.blocks.0.conv_dw.weight"].numpy().transpose(2, 3, 1, 0),
    )


def test_bfloat16_compute_keeps_float32_parameters_and_stays_near_timm(tiny_convnext):
    model, _, variables, x = tiny_convnext
    module = ConvNeXt(**TINY_CONVNEXT, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), nhwc(x), train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

    maps = jax.jit(module.apply, static_argnames="train")(variables, nhwc(x), train=False)

    assert all(m.dtype == jnp.bfloat16 for m in maps)
    assert_maps_match_timm([m.astype(jnp.float32) for m in maps], model, x, False, floor=3e-2)  # bfloat16 rounding


def test_bfloat16_layer_norm_statistics_are_float32():
    """Pixels of mean 50 and std 1: bfloat16 sums of them lose the mean (bfloat16 spacing at 64 is 0.5)."""
    x = (50 + jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 256))).astype(jnp.bfloat16)
    norm = layer_norm(jnp.bfloat16)
    variables = {"params": {"scale": jnp.ones(256), "bias": jnp.zeros(256)}}
    xf = np.asarray(x, np.float64)
    want = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-6)
    got = jax.jit(norm.apply)(variables, x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.05)  # bfloat16 output rounding


def test_convnext_needs_four_stages():
    with pytest.raises(ValueError, match=r"ConvNeXt needs 4 depths and 4 dims, got \(1, 1, 1\) and \(8, 16, 32\)"):
        jax.eval_shape(
            lambda: ConvNeXt((1, 1, 1), (8, 16, 32)).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
        )


def test_layer_scale_starts_at_its_init_value():
    block = Block(layer_scale_init=1e-6)
    variables = jax.jit(lambda key: block.init(key, jnp.zeros((1, 8, 8, 4)), train=False))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(variables["params"]["gamma"], np.full(4, 1e-6, np.float32))
    no_scale = jax.eval_shape(
        lambda: Block(layer_scale_init=None).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), train=False)
    )
    assert "gamma" not in no_scale["params"]


def test_drop_path_rates_rise_linearly_over_the_blocks_as_timm():
    depths, rate = (2, 1, 3, 2), 0.35
    model = timm.create_model(
        "convnext_tiny", pretrained=False, device="meta", depths=depths, dims=(8, 16, 32, 64), drop_path_rate=rate
    )
    want = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    got = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Block) and context.method_name == "__call__":
            got.append(context.module.drop_path_rate)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda: ConvNeXt(depths, (8, 16, 32, 64), drop_path_rate=rate).init(
                jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False
            )
        )
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    x = jnp.ones((64, 3, 3, 2))
    y = np.asarray(drop_path(x, 0.25, jax.random.PRNGKey(0)))
    per_sample = y.reshape(64, -1)
    kept = np.float32(1 / 0.75)
    assert set(np.unique(per_sample.min(axis=1))) == set(np.unique(per_sample.max(axis=1))) == {0.0, kept}
    assert 4 <= int((per_sample[:, 0] == 0).sum()) <= 28  # about a quarter of 64 dropped


def test_train_mode_drop_path_draws_from_the_dropout_rng(tiny_convnext):
    _, module, variables, x = tiny_convnext
    x = nhwc(x)
    dropping = ConvNeXt(**TINY_CONVNEXT, drop_path_rate=0.5)
    train = jax.jit(lambda key: dropping.apply(variables, x, train=True, rngs={"dropout": key})[-1])
    apply = jax.jit(module.apply, static_argnames="train")

    a, again, b = train(jax.random.PRNGKey(2)), train(jax.random.PRNGKey(2)), train(jax.random.PRNGKey(3))

    np.testing.assert_array_equal(a, again)
    assert not np.allclose(a, b)
    eval_out = apply(variables, x, train=False)[-1]
    assert not np.allclose(a, eval_out) and not np.allclose(b, eval_out)
    np.testing.assert_array_equal(
        jax.jit(dropping.apply, static_argnames="train")(variables, x, train=False)[-1], eval_out
    )  # no drop path in eval mode
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda: dropping.apply(variables, x, train=True))  # train mode needs a 'dropout' rng
    # at rate 0, train mode draws nothing and equals eval mode
    np.testing.assert_array_equal(apply(variables, x, train=True)[-1], eval_out)


@pytest.mark.slow
def test_tiny_convnext_pmg_trains_with_stochastic_depth_and_explains(tmp_path):
    """configs/demo.py on a tiny ConvNeXt with drop_path_rate 0.2: the train step feeds the 'dropout' rng
    (without it apply() raises), the loss stays finite, and explain.py reads the checkpoint."""
    import glob

    from conftest import tiny_demo_config

    from pmg_jax import loop
    from pmg_jax.cli import explain as explain_cli

    c = tiny_demo_config(
        **{
            "model.backbone": "convnext_tiny",
            "model.width": 8,
            "model.stage_sizes": (1, 1, 1, 1),
            "model.feature_size": 16,
            "model.drop_path_rate": 0.2,
            "num_epochs": 1,
            "dataset.demo_train_size": 48,
            "dataset.demo_test_size": 16,
        }
    )
    best = loop.train_and_evaluate(c, str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [v for line in lines if line["kind"] == "train" for k, v in line.items() if k.startswith("loss")]
    assert losses and np.all(np.isfinite(losses)), lines
    assert best is not None
    out = tmp_path / "explain"
    assert explain_cli.main(["--ckpt", str(tmp_path), "--block", "3", "--num-images", "2", "--out", str(out)]) == 0
    assert len(glob.glob(str(out / "*.png"))) >= 2


@pytest.mark.parametrize("source", ["folder", "tfds"])
def test_convnext_config_is_valid_and_stochastic_depth_is_refused_on_a_resnet(source):
    from configs import cub_convnext_tiny
    from pmg_jax import validate
    from pmg_jax.errors import ConfigError

    c = cub_convnext_tiny.get_config(source)
    validate.check(c, num_devices=1, num_processes=1)
    c.model.backbone = "resnet50"
    with pytest.raises(ConfigError, match="drop_path_rate=0.1: backbone resnet50 has no stochastic depth"):
        validate.check(c, num_devices=1, num_processes=1)
