"""A PMG-V2 run downstream of training: explain.py (its blocks, and the prediction's map), predict, export and
convert, the method read from the run's config."""

import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_demo_config
from PIL import Image

from pmg_jax import cam, convert, export, methods, viz
from pmg_jax import state as state_lib
from pmg_jax.cli import explain as explain_cli
from pmg_jax.cli import export as export_cli
from pmg_jax.cli import predict as predict_cli
from pmg_jax.data import synthetic, transforms

pytestmark = pytest.mark.xdist_group("pmg_v2_apps")  # one worker: the fixture's run and compilations are shared

TINY_V2 = {
    "method": "pmg_v2",
    "model.width": 8,
    "model.feature_size": 16,
    "data.crop_size": 32,
    "data.resize_size": 40,
    "dataset.demo_image_size": 48,
    "dataset.demo_test_size": 12,
    "eval_batch_size": 4,
}


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory):
    """(run directory, restored run) of a tiny PMG-V2 with random weights for the demo's 8 classes."""
    config = tiny_demo_config(**TINY_V2)
    model = state_lib.create_model(config)
    # The library's own initial weights: a test needs their predictions (a head whose class differs from the sum's).
    variables = state_lib.init_variables(model, jax.random.PRNGKey(5), config.data.crop_size)
    out = str(tmp_path_factory.mktemp("runs") / "v2")
    convert.write_checkpoint(variables, out, config, synthetic.class_names(8))
    return out, state_lib.restore(out)


@pytest.fixture(scope="module")
def bird(tmp_path_factory) -> tuple[str, np.ndarray]:
    """(path, RGB pixels) of one demo test image written as a PNG."""
    image = synthetic.make_example(synthetic.DemoSpec(8, 56), "test", 0)["image"]
    path = str(tmp_path_factory.mktemp("images") / "bird.png")
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path, image


def by_hand(restored, x: np.ndarray, score) -> tuple[dict, dict]:
    """(activations, gradients) of the block maps for `score(logits) -> scalar`, with jax.grad through the
    model's perturbation points (no pmg_jax.cam)."""
    model, variables = restored.model, restored.variables
    shapes = jax.eval_shape(lambda: model.apply(variables, x, mutable=["perturbations"])[1]["perturbations"])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def f(perturbations):
        logits, sown = model.apply({**variables, "perturbations": perturbations}, x, mutable=["intermediates"])
        return score(logits), sown["intermediates"]

    grads, sown = jax.jit(jax.grad(f, has_aux=True))(zeros)
    return {k: v[0] for k, v in sown.items()}, grads


def gradcam_raw(a, g) -> jax.Array:
    """Grad-CAM before ReLU: the channels weighted by the spatial mean of their gradient."""
    return jnp.sum(jnp.mean(g, axis=(1, 2), keepdims=True) * a, axis=-1)


def finish(m, size: int) -> np.ndarray:
    """ReLU, divided by the maximum (per image)."""
    m = np.maximum(np.asarray(m), 0)
    return m / np.max(m, axis=(1, 2), keepdims=True)


@pytest.mark.slow  # over the restored PMG-V2 run
def test_block_maps_and_the_combined_map_are_explained_by_the_method(v2_run):
    """Block 3 by head 3's prediction; 'combined' (PMG-V2's summed map) by the prediction, the sum of the three
    heads, back-propagated into every block, the upsampled raw maps summed."""
    _, restored = v2_run
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3)))
    options = cam.CamOptions(("block3", "combined"))
    out = cam.make_explainer(restored.model, options)(restored.variables, x)
    logits = restored.model.apply(restored.variables, x)
    assert len(out.logits) == 4 and len(logits) == 3  # head1..3, then their sum
    np.testing.assert_allclose(out.logits[3], sum(logits), rtol=1e-6, atol=1e-6)
    combined = jnp.argmax(sum(logits), -1)
    np.testing.assert_array_equal(out.targets[:, 3], combined)
    assert not np.array_equal(jnp.argmax(logits[0], -1), combined)  # a head's own class would give another map

    pick = lambda z, c: jnp.sum(jnp.take_along_axis(z, c[:, None], axis=-1))
    acts, grads = by_hand(restored, x, lambda z: pick(z[2], jnp.argmax(z[2], -1)))
    want3 = finish(jax.image.resize(gradcam_raw(acts["block3"], grads["block3"]), (3, 32, 32), "bilinear"), 32)
    np.testing.assert_allclose(out.maps["block3"], want3, atol=1e-5)

    acts, grads = by_hand(restored, x, lambda z: pick(sum(z), combined))
    summed = sum(
        jax.image.resize(gradcam_raw(acts[b], grads[b]), (3, 32, 32), "bilinear")
        for b in ("block1", "block2", "block3")
    )
    np.testing.assert_allclose(out.maps["combined"], finish(summed, 32), atol=1e-5)


@pytest.mark.slow  # over the restored PMG-V2 run
def test_explain_cli_block_3_writes_pmg_v2_block_3(v2_run, bird, tmp_path, capsys):
    """`explain.py --block 3`: conv_block3's overlay and grid, titled with the method and head3."""
    run, restored = v2_run
    out = tmp_path / "out"
    assert explain_cli.main(["--ckpt", run, "--block", "3", "--images", bird[0], "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["conv_block3_bird.jpg", "grid_bird.png", "index.html"]
    caption = json.loads(Image.open(out / "grid_bird.png").text[viz.CAPTION_KEY])
    assert caption[0].endswith("(pmg_v2)") and [line.split(":")[0] for line in caption[1:]] == [
        *methods.PMG_V2.heads,
        "combined",
    ]
    printed = capsys.readouterr().out
    assert "(block3; gradcam" in printed and "concat" not in printed and "combined" in printed


@pytest.mark.slow  # over the restored PMG-V2 run
def test_explain_cli_default_maps_are_the_blocks_and_the_combined_map(v2_run, bird, tmp_path):
    run, _ = v2_run
    assert explain_cli.main(["--ckpt", run, "--images", bird[0], "--out", str(tmp_path)]) == 0
    overlays = sorted(f for f in os.listdir(tmp_path) if f.endswith(".jpg"))
    assert overlays == ["combined_bird.jpg", "conv_block1_bird.jpg", "conv_block2_bird.jpg", "conv_block3_bird.jpg"]


@pytest.mark.slow  # over the restored PMG-V2 run
def test_evaluate_scores_the_blocks_and_the_combined_map(v2_run, tmp_path, capsys):
    """explain.py --evaluate on the demo split's boxes and parts: every default map of PMG-V2, deletion and
    insertion of the combined map under the prediction's probabilities."""
    run, _ = v2_run
    argv = ["--ckpt", run, "--evaluate", "--max-images", "4", "--auc-steps", "2", "--batch-size", "4"]
    assert explain_cli.main([*argv, "--report-images", "1", "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "localization_test.json"))
    results = saved["results"]["gradcam"]
    assert list(results) == ["block1", "block2", "block3", "combined"] and saved["count"] == 4
    assert all(0 <= results[m]["Deletion"] <= 1 and 0 <= results[m]["Insertion"] <= 1 for m in results)
    assert list(saved["parts"]["gradcam"]["peak"]) == list(results)
    assert (tmp_path / "report.html").is_file()


@pytest.mark.slow  # over the restored PMG-V2 run
def test_a_map_the_method_lacks_is_refused_in_one_line(v2_run, bird, tmp_path, capsys):
    run, _ = v2_run
    assert explain_cli.main(["--ckpt", run, "--block", "concat", "--images", bird[0], "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "explain.py: error: --block concat: not a map of pmg_v2 "
        "(its maps: block1, block2, block3, combined, layer2, layer3, layer4)"
    ), err
    assert not os.listdir(tmp_path)
    with pytest.raises(cam.CamOptionsError, match="^maps combined: not a map of pmg "):
        cam.CamOptions(("block1", "combined")).for_method(methods.PMG)


@pytest.mark.slow  # over the restored PMG-V2 run
def test_predict_gives_the_three_heads_and_their_sum(v2_run, bird, tmp_path, capsys):
    run, restored = v2_run
    out = tmp_path / "preds.jsonl"
    assert predict_cli.main(["--ckpt", run, "--images", bird[0], "--heads", "--top-k", "8", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in open(out)]
    assert list(row) == ["path", "combined", "head1", "head2", "head3"]
    d = restored.config.data
    crop = transforms.eval_crop(bird[1], resize_size=d.resize_size, crop_size=d.crop_size)[None]
    x = (crop / 255.0 - np.asarray(d.mean)) / np.asarray(d.std)
    logits = restored.model.apply(restored.variables, x.astype(np.float32))
    for name, z in (("combined", sum(logits)), *zip(methods.PMG_V2.heads, logits)):
        probs = np.asarray(jax.nn.softmax(z[0]))
        got = {e["index"]: e["probability"] for e in row[name]}
        np.testing.assert_allclose([got[i] for i in range(8)], probs, atol=1e-5)

    assert predict_cli.main(["--ckpt", run, "--split", "test", "--heads", "--out", str(tmp_path / "s.csv")]) == 0
    table = capsys.readouterr().out
    assert "combined |    head1 |    head2 |    head3\n" in table and "concat" not in table


def reference(restored, crops: np.ndarray) -> list[np.ndarray]:
    """(probabilities, head1, head2, head3) of uint8 crops by model.apply: the softmax of the three heads' sum."""
    d = restored.config.data
    x = ((crops / 255.0 - np.asarray(d.mean)) / np.asarray(d.std)).astype(np.float32)
    logits = [np.asarray(z) for z in restored.model.apply(restored.variables, x)]
    return [np.asarray(jax.nn.softmax(sum(logits))), *logits]


@pytest.mark.slow  # over the restored PMG-V2 run
def test_stablehlo_export_equals_jax(v2_run, tmp_path):
    run, restored = v2_run
    assert export_cli.main(["--ckpt", run, "--format", "stablehlo", "--out", str(tmp_path)]) == 0
    card = json.load(open(tmp_path / "model.json"))
    assert [o["name"] for o in card["outputs"]] == ["probabilities", "head1", "head2", "head3"]
    assert card["source"]["method"] == "pmg_v2" and "3 heads" in card["outputs"][0]["meaning"]
    exported = jax.export.deserialize(open(tmp_path / "model.stablehlo", "rb").read())
    crops = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got, want = exported.call(crops), reference(restored, crops)
    assert export.max_relative_difference(got[1:], want[1:]) <= 1e-4
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


@pytest.mark.slow  # the conversion, as the PMG one in tests/test_predict_export.py
def test_onnx_export_equals_jax_under_onnxruntime(v2_run, tmp_path):
    import onnxruntime

    run, restored = v2_run
    assert export_cli.main(["--ckpt", run, "--format", "onnx", "--out", str(tmp_path)]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "head1", "head2", "head3"]
    crops = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    want = reference(restored, crops)
    for n in (3, 1):
        got = session.run(None, {"images": crops[:n]})
        assert export.max_relative_difference(got[1:], [w[:n] for w in want[1:]]) <= 1e-4
        np.testing.assert_allclose(got[0], want[0][:n], atol=1e-5)


# Stand-ins for the official PMG-V2 code's files (model.py, Resnet_CCBC.py), so that torch.save pickles its class
# names: model.PMG_V2, model.BasicConv, Resnet_CCBC.ResNet, Resnet_CCBC.Bottleneck, and the pooling modules the
# official classes hold (max1, block_wise_pool) and the ResNet's unused fc.
OFFICIAL_SOURCES = {
    "model.py": """
from torch import nn

from bench import torch_reference as ref


class BasicConv(ref.BiasedBasicConv):
    pass


class PMG_V2(ref.PMGV2):
    def __init__(self, *args):
        super().__init__(*args)
        self.max1 = nn.MaxPool2d(kernel_size=8, stride=8)
        for m in self.modules():
            if type(m) is ref.BiasedBasicConv:
                m.__class__ = BasicConv
""",
    "Resnet_CCBC.py": """
from torch import nn

from bench import torch_reference as ref


class Bottleneck(ref.Bottleneck):
    pass


class ResNet(ref.ResNet):
    def __init__(self, *args):
        super().__init__(*args)
        self.block_wise_pool = nn.AvgPool2d(kernel_size=7, stride=7, padding=0)
        self.fc = nn.Linear(8, 10)
""",
}
V2_ARCH = convert.Architecture("resnet50", 8, (1, 1, 1, 1), 16, 5, "pmg_v2")


def torch_logits(model, x) -> list[np.ndarray]:
    """The three heads' logits of a PyTorch PMG-V2 in evaluation mode."""
    import torch

    model.eval()
    with torch.no_grad():
        return [t.numpy() for t in model(x)[:3]]


def nhwc(x) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """A PyTorch PMG-V2 (calibrated BatchNorm) saved as the official code does (the whole model, zip and legacy
    formats) and as a state dict, with a batch and its logits; the official classes' sources are gone after."""
    import importlib
    import sys

    import torch

    from bench.parity import randomize_bn

    d = tmp_path_factory.mktemp("official")
    for name, text in OFFICIAL_SOURCES.items():
        (d / name).write_text(text)
    sys.path.insert(0, str(d))
    try:
        model_py, resnet_py = importlib.import_module("model"), importlib.import_module("Resnet_CCBC")
        torch.manual_seed(4)
        net = model_py.PMG_V2(resnet_py.ResNet(resnet_py.Bottleneck, (1, 1, 1, 1), 8), 16, 5)
        randomize_bn(net, seed=4, size=64)
        torch.save(net, d / "model.pth")
        torch.save(net, d / "legacy.pth", _use_new_zipfile_serialization=False)
        torch.save(net.state_dict(), d / "state_dict.pth")
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        want = torch_logits(net, x)
    finally:
        sys.path.remove(str(d))
        for name in ("model", "Resnet_CCBC"):
            sys.modules.pop(name)
    return d, nhwc(x), want


def test_official_whole_pickles_load_without_their_source(official_files):
    d, x, want = official_files
    state_dict = convert.load_state_dict(str(d / "model.pth"))
    legacy = convert.load_state_dict(str(d / "legacy.pth"))
    assert legacy.keys() == state_dict.keys() and all(np.array_equal(legacy[k], state_dict[k]) for k in legacy)
    assert "features.fc.weight" in state_dict and "conv_block1.0.conv.bias" in state_dict
    assert convert.infer_architecture(state_dict) == V2_ARCH


@pytest.mark.parametrize("name", ["model.pth", "state_dict.pth"])
def test_converted_pmg_v2_gives_the_pytorch_logits(official_files, name, tmp_path, capsys):
    from pmg_jax.cli import convert as convert_cli

    d, x, want = official_files
    convert_cli.main([str(d / name), "--out", str(tmp_path / "run")])
    assert "converted" in capsys.readouterr().out
    restored = state_lib.restore(str(tmp_path / "run"))
    assert restored.config.method == "pmg_v2" and type(restored.model).__name__ == "PMGV2"
    got = jax.jit(restored.model.apply)(restored.variables, x)
    assert export.max_relative_difference(got, want) <= 1e-4


def test_the_method_flag_is_checked_against_the_weights(official_files, tmp_path):
    """--method pmg on PMG-V2 weights lists what does not fit, in one line; heads of neither method are refused."""
    from pmg_jax.cli import convert as convert_cli

    d, _, _ = official_files
    with pytest.raises(SystemExit) as e:
        convert_cli.main([str(d / "state_dict.pth"), "--out", str(tmp_path / "run"), "--method", "pmg"])
    message = e.value.code  # a string code exits with status 1
    assert isinstance(message, str) and "\n" not in message, message
    assert "classifier_concat" in message and "conv/bias" in message, message
    state_dict = convert.load_state_dict(str(d / "state_dict.pth"))
    del state_dict["conv_block1.0.conv.bias"]
    with pytest.raises(convert.ConversionError, match="heads of neither PMG nor PMG-V2"):
        convert.infer_architecture(state_dict)
    assert convert.infer_architecture(state_dict, "pmg_v2").method == "pmg_v2"
