"""PyTorch weights in: torchvision ResNets, reference PMG state dicts and pickled models, checkpoints, errors."""

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import ROOT
from flax.traverse_util import flatten_dict
from truth import assert_near_truth

from bench import torch_reference as ref
from bench.parity import as_float64, nhwc, randomize_bn, torch_pmg
from pmg_jax import convert, loop
from pmg_jax import state as state_lib
from pmg_jax.backbones.resnet import ResNet
from pmg_jax.checkpoint import Checkpoints
from pmg_jax.cli import convert as convert_cli
from pmg_jax.model import PMG
from pmg_jax.optim import make_optimizer

torch.set_num_threads(2)

# Tiny PMG (ResNet50-style, width 8, one block per stage) for everything but the two 224 comparisons.
TINY = dict(backbone="resnet50", width=8, stage_sizes=(1, 1, 1, 1), feature_size=16, num_classes=5)
TINY_ARCH = convert.Architecture("resnet50", 8, (1, 1, 1, 1), 16, 5, "pmg")

# Stand-ins for the reference code's files, so that torch.save pickles `model.PMG`, `Resnet.ResNet`, ...
REFERENCE_SOURCES = {
    "model.py": """
from bench import torch_reference as ref


class BasicConv(ref.BasicConv):
    pass


class PMG(ref.PMG):
    def __init__(self, *args):
        super().__init__(*args)
        for m in self.modules():
            if type(m) is ref.BasicConv:
                m.__class__ = BasicConv
""",
    "Resnet.py": """
from bench import torch_reference as ref


class Bottleneck(ref.Bottleneck):
    pass


class ResNet(ref.ResNet):
    pass
""",
}

# Runs the converter with `import torch` failing as if torch were not installed.
WITHOUT_TORCH = """
import sys


class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ImportError(f"No module named {name!r} (blocked by the test)")


sys.meta_path.insert(0, BlockTorch())
from pmg_jax.cli import convert

src_st, src_npz, src_pth, out = sys.argv[1:]
convert.main([src_st, "--out", out + "/st"])
convert.main([src_npz, "--out", out + "/npz"])
assert "torch" not in sys.modules
convert.main([src_pth, "--out", out + "/pth"])
"""


def tiny_torch_pmg(seed: int = 1) -> ref.PMG:
    return torch_pmg(
        TINY["backbone"],
        TINY["width"],
        TINY["stage_sizes"],
        TINY["feature_size"],
        TINY["num_classes"],
        seed=seed,
        size=64,
    )


def tiny_flax_pmg() -> PMG:
    return PMG(**TINY)


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def reference_outputs(forward, model_t: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """(PyTorch float32's outputs, the float64 truth) of `forward(model, x)` on the same weights and input."""
    with torch.no_grad():
        return forward(model_t, x), forward(as_float64(model_t), x.double())


def assert_all_close(got, reference: tuple[list, list], floor: float = 2e-5) -> None:
    """Ours within 4x PyTorch float32's error from the float64 truth plus `floor` of the outputs' largest
    magnitude (tests/truth.py): logits and stage maps are O(1-10) sums where float32 costs ~1e-6 of that."""
    torch32, truth = reference
    assert len(got) == len(truth)
    assert_near_truth([np.asarray(g) for g in got], torch32, truth, floor=floor, what="outputs")


def logits(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    return [t.numpy() for t in ref.evaluate_logits(model, x)]


@pytest.fixture(scope="module")
def reference_resnet50_pmg():
    """A full-size reference PMG (ResNet50, 200 classes) with realistic BN statistics, and a 224 batch."""
    model = torch_pmg("resnet50", 64, None, 512, 200, seed=0, size=224)
    model.eval()
    return model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """Files of a tiny PMG and a tiny bare ResNet, good and broken."""
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_torch_pmg()
    torch.save(model.state_dict(), d / "pmg.pth")
    torch.save(model.features.state_dict(), d / "resnet.pth")
    safetensors.numpy.save_file(numpy_state_dict(model), d / "pmg.safetensors")
    np.savez(d / "pmg.npz", **numpy_state_dict(model))
    for name in ("pmg.pth", "pmg.safetensors"):
        data = (d / name).read_bytes()
        (d / f"truncated_{name}").write_bytes(data[: len(data) // 2])
    np.savez(
        d / "vgg.npz",
        **{
            "features.0.weight": np.zeros((64, 3, 3, 3), np.float32),
            "classifier.6.weight": np.zeros((1000, 4096), np.float32),
        },
    )
    return d, model


@pytest.mark.slow
def test_torchvision_resnet50_backbone_matches_torch(reference_resnet50_pmg, tmp_path):
    model_t, x = reference_resnet50_pmg
    path = tmp_path / "resnet50.pth"
    torch.save(model_t.features.state_dict(), path)  # torchvision names, fc included
    target = state_lib.abstract_variables(PMG(num_classes=200), 224)

    variables = convert.load_backbone(str(path), target)

    assert isinstance(variables["params"]["classifier_concat_4"]["kernel"], jax.ShapeDtypeStruct)  # left as it was
    backbone = {c: variables[c]["features"] for c in ("params", "batch_stats")}
    got = jax.jit(lambda v, x: ResNet("resnet50").apply(v, x, train=False))(backbone, nhwc(x))
    stage_maps = lambda model, x: [t.permute(0, 2, 3, 1).numpy() for t in model.features(x)]
    assert_all_close(got, reference_outputs(stage_maps, model_t, x))


@pytest.mark.slow
def test_reference_pmg_state_dict_becomes_a_restorable_run(reference_resnet50_pmg, tmp_path, capsys):
    model_t, x = reference_resnet50_pmg
    src = tmp_path / "model.pth"
    torch.save({f"module.{k}": v for k, v in model_t.state_dict().items()}, src)  # as saved from DataParallel

    convert_cli.main([str(src), "--out", str(tmp_path / "run"), "--dataset", "cub"])

    printed = capsys.readouterr().out
    assert "PMG resnet50 (width 64, feature size 512, 200 classes)" in printed
    assert "class names: generic class_0..class_199 (cub:" in printed  # no CUB class list here
    checkpoints = Checkpoints(str(tmp_path / "run" / "checkpoints"), read_only=True)
    config = checkpoints.config()
    assert config.dataset.name == "cub" and config.dataset.num_classes == 200
    state, meta = checkpoints.restore()
    assert meta["class_names"][199] == "class_199" and meta["converted_from"] == str(src)
    model_j = state_lib.create_model(config)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    got = jax.jit(lambda v, x: model_j.apply(v, x, train=False))(variables, nhwc(x))
    assert_all_close(got, reference_outputs(logits, model_t, x))

    # train.py can resume (fine-tune) from it: a TrainState at step 0 with a fresh optimizer state.
    tx = make_optimizer(lr_new=0.002, lr_backbone=0.0002, num_epochs=config.num_epochs, steps_per_epoch=10)
    abstract = jax.eval_shape(lambda: state_lib.create_state(model_j, tx, config.seed, config.data.crop_size))
    resumed, _ = checkpoints.restore(abstract)
    assert int(resumed.step) == 0
    assert not any(np.any(np.asarray(t)) for t in jax.tree.leaves(resumed.opt_state[1].trace))


def test_whole_pickled_reference_model_loads_without_its_source(tmp_path):
    source_dir = tmp_path / "reference_code"
    source_dir.mkdir()
    for name, text in REFERENCE_SOURCES.items():
        (source_dir / name).write_text(text)
    sys.path.insert(0, str(source_dir))
    try:
        model_py, resnet_py = importlib.import_module("model"), importlib.import_module("Resnet")
        torch.manual_seed(2)
        net = model_py.PMG(
            resnet_py.ResNet(resnet_py.Bottleneck, TINY["stage_sizes"], TINY["width"]),
            TINY["feature_size"],
            TINY["num_classes"],
        )
        randomize_bn(net, seed=2, size=64)
        assert {type(m).__module__ + "." + type(m).__name__ for m in net.modules()} >= {
            "model.PMG",
            "model.BasicConv",
            "Resnet.ResNet",
            "Resnet.Bottleneck",
        }
        torch.save(net, tmp_path / "model.pth")  # what the reference code does
        torch.save(net, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # as PyTorch < 1.6 did
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        want = reference_outputs(logits, net, x)
    finally:
        sys.path.remove(str(source_dir))
        for name in ("model", "Resnet"):
            sys.modules.pop(name)
    with pytest.raises(ImportError):
        importlib.import_module("model")

    state_dict = convert.load_state_dict(str(tmp_path / "model.pth"))
    legacy = convert.load_state_dict(str(tmp_path / "legacy.pth"))

    assert "model" not in sys.modules and "Resnet" not in sys.modules
    assert legacy.keys() == state_dict.keys() and all(np.array_equal(legacy[k], state_dict[k]) for k in legacy)
    assert convert.infer_architecture(state_dict) == TINY_ARCH
    model_j = tiny_flax_pmg()
    variables = convert.variables_from_torch(state_dict, target=state_lib.abstract_variables(model_j, 64))
    assert_all_close(jax.jit(lambda v, x: model_j.apply(v, x, train=False))(variables, nhwc(x)), want)


def test_safetensors_and_npz_convert_without_torch(tiny_files, tmp_path):
    d, model_t = tiny_files
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_TORCH,
            str(d / "pmg.safetensors"),
            str(d / "pmg.npz"),
            str(d / "pmg.pth"),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.stdout.count("converted ") == 2, result.stderr
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("pmg_jax.convert: error: ") and "needs torch" in error, result.stderr
    want = convert.variables_from_torch(model_t.state_dict())
    for run in ("st", "npz"):
        state, _ = Checkpoints(str(tmp_path / run / "checkpoints"), read_only=True).restore()
        for c in ("params", "batch_stats"):
            jax.tree.map(np.testing.assert_array_equal, state[c], want[c])


@pytest.mark.parametrize(
    "file,flags,expected",
    [
        ("missing.pth", [], "no such file"),
        ("truncated_pmg.pth", [], "cannot read it as a PyTorch file (truncated or corrupt?)"),
        ("truncated_pmg.safetensors", [], "cannot read it as a safetensors file (truncated or corrupt?)"),
        ("vgg.npz", [], "not a state dict of a known backbone or PMG"),
        (
            "pmg.pth",
            ["--backbone", "resnet18"],
            "weights do not match the model: unexpected 25: batch_stats/features/layer1_0/bn3/mean",
        ),
        ("pmg.pth", ["--num-classes", "7"], "7 classes were asked for but the weights' heads have 5"),
        ("pmg.pth", ["--dataset", "cub"], "the weights' heads have 5 classes but the cub preset has 200"),
        ("resnet.pth", [], "bare resnet50 backbone, not a PMG model: use it to initialise training instead"),
    ],
)
def test_bad_inputs_give_one_line_and_a_nonzero_exit(tiny_files, tmp_path, file, flags, expected):
    d, _ = tiny_files
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main([str(d / file), "--out", str(tmp_path / "run"), *flags])
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message, message  # a string code exits with status 1
    assert message.startswith("pmg_jax.convert: error: ") and expected in message, message
    assert not (tmp_path / "run" / "checkpoints" / "0").exists()


def test_load_backbone_of_another_architecture_lists_the_mismatch(tiny_files):
    d, _ = tiny_files
    target = state_lib.abstract_variables(PMG(**{**TINY, "backbone": "resnet18"}), 64)
    with pytest.raises(
        convert.ConversionError,
        match=r"^weights do not match the model: unexpected \d+: "
        r"batch_stats/features/layer1_0/bn3/mean, .*; wrong shape",
    ):
        convert.load_backbone(str(d / "resnet.pth"), target)


@pytest.mark.parametrize("prefix", ["", "features.", "module.features."])
def test_infer_architecture_reads_torchvision_timm_and_reference_names(prefix):
    resnet = ref.make_resnet("resnet101", width=8)
    assert convert.infer_architecture({prefix + k: v for k, v in resnet.state_dict().items()}) == convert.Architecture(
        "resnet101", 8, (), None, None
    )


@pytest.mark.slow
def test_converted_checkpoint_runs_through_evaluation_and_explain(tmp_path, capsys):
    """A reference-format PMG for the demo's 8 classes: convert, evaluate with train.py's eval_only, explain."""
    import cv2
    from conftest import tiny_demo_config

    import explain
    from pmg_jax.data import synthetic

    model_t = torch_pmg("resnet50", 8, (1, 1, 1, 1), 16, 8, seed=2, size=64)
    src = str(tmp_path / "model.pth")
    torch.save(model_t.state_dict(), src)
    out = str(tmp_path / "converted")
    convert_cli.main([src, "--out", out, "--dataset", "demo"])

    config = tiny_demo_config(
        **{
            "eval_only": True,
            "init.checkpoint": out,
            "model.width": 8,
            "model.feature_size": 16,
            "dataset.demo_test_size": 12,
        }
    )
    result = loop.train_and_evaluate(config, str(tmp_path / "unused"))
    assert result["count"] == 12 and 0 <= result["combined"] <= 100
    assert f"eval of {out}" in capsys.readouterr().out

    image = synthetic.make_example(synthetic.DemoSpec(8, 112), "test", 0)["image"]
    cv2.imwrite(str(tmp_path / "bird.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert (
        explain.main(
            [
                "--ckpt",
                out,
                "--block",
                "all",
                "--images",
                str(tmp_path / "bird.png"),
                "--out",
                str(tmp_path / "explained"),
            ]
        )
        == 0
    )
    written = set(os.listdir(tmp_path / "explained"))
    assert {"conv_block1_bird.jpg", "conv_block3_bird.jpg", "conv_block_concat_bird.jpg", "index.html"} <= written
    printed = capsys.readouterr().out
    assert sum(printed.count(name) for name in synthetic.class_names(8)) >= 4 * 5  # top-5 of each head, named


def test_training_starts_from_a_torchvision_backbone(tmp_path):
    """config.init.backbone loads the ResNet weights and BN statistics before training; heads stay fresh."""
    from conftest import random_variables, tiny_demo_config

    from pmg_jax import state as state_lib

    resnet = ref.make_resnet("resnet50", 8, (1, 1, 1, 1))
    path = str(tmp_path / "resnet.pth")
    torch.save(resnet.state_dict(), path)  # torchvision names, fc included
    config = tiny_demo_config(**{"init.backbone": path, "model.width": 8, "model.feature_size": 16})
    fresh = random_variables(state_lib.create_model(config), config.data.crop_size)
    variables = loop.initial_variables(config, lambda: fresh)
    want = convert.variables_from_torch(resnet.state_dict())
    for collection in ("params", "batch_stats"):
        got = flatten_dict(jax.device_get(variables[collection])["features"])
        expected = flatten_dict(want[collection]["features"])
        assert got.keys() == expected.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k], err_msg="/".join(k))
    np.testing.assert_array_equal(
        variables["params"]["classifier1_4"]["kernel"], fresh["params"]["classifier1_4"]["kernel"]
    )
