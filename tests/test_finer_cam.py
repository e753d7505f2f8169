"""Finer-CAM (target 'finer') against pytorch-grad-cam's FinerCAM on the same weights, and its options.

pytorch-grad-cam min-max normalises each map before resizing it and again after; cam.py divides by
the maximum before resizing. A positive affine change of the low-resolution map commutes with
bilinear resizing and vanishes in a min-max normalisation, so its maps are our maps min-max
normalised: that is what is compared, to the Grad-CAM parity tolerance (test_cam.MAP_TOL), against
pytorch-grad-cam run on the model in float64 as the truth (tests/truth.py).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_cam import MAP_TOL, TINY, TINY_SIZE, torch_modules
from test_parity import resnet50_pair  # noqa: F401 (a fixture)
from torchvision_stand_in import import_beside_cpu_torch
from truth import assert_near_truth

from bench.parity import as_float64, flax_variables, nhwc, torch_pmg
from pmg_jax import cam, localization, methods
from pmg_jax.data import pipeline, synthetic
from pmg_jax.model import PMG


class HeadLogits(torch.nn.Module):
    """One head's logits of a torch PMG: the single output FinerCAM expects."""

    def __init__(self, model: torch.nn.Module, head: int):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.head]


def finer_cam_maps(model_t, x, names, k, alpha, target_idx=None) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's FinerCAM (base GradCAM) of each map, explained by that map's own head."""
    gc = import_beside_cpu_torch("pytorch_grad_cam")
    modules = torch_modules(model_t)
    out = {}
    for name in names:
        with gc.FinerCAM(
            HeadLogits(model_t, cam.head_of(methods.PMG, name)), [modules[name]], base_method=gc.GradCAM
        ) as finer:
            out[name] = finer(x, alpha=alpha, comparison_categories=list(range(1, k + 1)), target_idx=target_idx)
    return out


def finer_cam_truth(model_t, x, names, k, alpha, target_idx=None):
    """(pytorch-grad-cam's maps from the float32 model, from its float64 copy): what ours is judged against."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    return (
        finer_cam_maps(model_t, x, names, k, alpha, target_idx),
        finer_cam_maps(as_float64(model_t), x64, names, k, alpha, target_idx),
    )


def min_max(maps: np.ndarray) -> np.ndarray:
    """Each (H, W) map of (B, H, W) shifted to 0 and divided by its maximum."""
    m = np.asarray(maps, np.float64)
    m = m - m.min(axis=(1, 2), keepdims=True)
    return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)


@pytest.mark.slow
def test_resnet50_finer_cam_matches_pytorch_grad_cam_at_every_block(resnet50_pair):  # noqa: F811 (the fixture)
    """The full PMG at 224, k = 3 and alpha = 1 (FinerCAM's defaults)."""
    model_t, model_j, variables = resnet50_pair
    model_t.requires_grad_(False)  # only the maps' gradients are needed: torch skips the weights'
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    torch32, want = finer_cam_truth(model_t, x, cam.BLOCKS, cam.FINER_K, cam.FINER_ALPHA)
    got = cam.make_explainer(model_j, cam.CamOptions(cam.BLOCKS, "gradcam", "finer"))(variables, nhwc(x.detach())).maps
    assert_near_truth({n: min_max(got[n]) for n in want}, torch32, want, floor=MAP_TOL, what="Finer-CAM maps")
    gc = import_beside_cpu_torch("pytorch_grad_cam")
    for k, name in enumerate(cam.BLOCKS):
        with gc.GradCAM(HeadLogits(model_t, k), [torch_modules(model_t)[name]]) as plain:
            # The contrast changes the map: Grad-CAM of the predicted class alone would not pass.
            assert np.abs(plain(x, targets=None) - want[name]).max() > 100 * MAP_TOL, name


@pytest.fixture(scope="module")
def tiny_pair():
    model_t = torch_pmg(
        TINY["backbone"],
        TINY["width"],
        TINY["stage_sizes"],
        TINY["feature_size"],
        TINY["num_classes"],
        seed=8,
        size=TINY_SIZE,
    )
    model_j = PMG(**TINY)
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(4))
    return model_t, model_j, flax_variables(model_t, model_j, TINY_SIZE), x


SINGLE_HEAD_MAPS = tuple(n for n in methods.PMG.cam_maps if n != "concat")


@pytest.mark.parametrize(
    "k,alpha,target_idx",
    [pytest.param(2, 0.5, None, marks=pytest.mark.slow), (3, 1.0, 3)],  # each compiles its own
)
def test_k_alpha_and_a_given_class_match_pytorch_grad_cam_at_every_map(tiny_pair, k, alpha, target_idx):
    """Blocks and backbone stages, explaining the prediction or a given class (whose nearest need not be larger)."""
    model_t, model_j, variables, x = tiny_pair
    torch32, want = finer_cam_truth(model_t, x, SINGLE_HEAD_MAPS, k, alpha, target_idx)
    classes = None if target_idx is None else np.full(3, target_idx, np.int32)
    options = cam.CamOptions(SINGLE_HEAD_MAPS, "gradcam", "finer", finer_k=k, finer_alpha=alpha)
    explainer = cam.make_explainer(model_j, options)
    out = explainer(variables, nhwc(x), classes)
    assert_near_truth({n: min_max(out.maps[n]) for n in want}, torch32, want, floor=MAP_TOL, what="Finer-CAM maps")
    main = np.stack([np.argmax(z, -1) for z in out.logits], -1) if classes is None else np.full((3, 5), target_idx)
    np.testing.assert_array_equal(out.targets, main)


def test_similar_classes_are_the_nearest_logits_in_order():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 9)).astype(np.float32)
    main = np.array([0, 3, 8, 2, 2, 5], np.int32)
    got = np.asarray(cam.similar_classes(jnp.asarray(logits), jnp.asarray(main), 4))
    for i in range(6):
        distance = {c: abs(float(logits[i, c]) - float(logits[i, main[i]])) for c in range(9) if c != main[i]}
        assert got[i].tolist() == sorted(distance, key=distance.get)[:4]
    assert cam.similar_classes(jnp.asarray(logits), jnp.asarray(main), 20).shape == (6, 8)


def test_finer_score_is_the_softmax_weighted_contrast():
    logits = np.array([[2.0, 1.5, -1.0, 1.0]], np.float32)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    similar = [1, 3]  # nearest to class 0's 2.0: 1.5, then 1.0
    alpha = 0.7
    want = sum(p[j] * (2.0 - alpha * logits[0, j]) for j in similar) / (p[1] + p[3])
    got = cam.target_score(jnp.asarray(logits), cam.CamOptions(target="finer", finer_k=2, finer_alpha=alpha))
    np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-6)


def test_finer_needs_a_gradient_method_and_sane_options():
    model = PMG(**TINY)
    with pytest.raises(ValueError, match="eigencam has no target"):
        cam.make_explainer(model, cam.CamOptions(methods="eigencam", target="finer"))
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="finer_k"):
            cam.make_explainer(model, cam.CamOptions(target="finer", finer_k=k))
    cam.make_explainer(model, cam.CamOptions(target="finer", finer_k=np.int64(2)))  # a numpy integer is a count too
    with pytest.raises(ValueError, match="finer_alpha"):
        cam.make_explainer(model, cam.CamOptions(target="finer", finer_alpha=float("nan")))


def test_localization_evaluate_passes_the_finer_options_on(tiny_pair, monkeypatch):
    _, model_j, variables, _ = tiny_pair
    made, real = [], cam.make_explainer
    monkeypatch.setattr(cam, "make_explainer", lambda model, options: made.append(options) or real(model, options))
    source = synthetic.DemoSource(synthetic.DemoSpec(num_classes=TINY["num_classes"], image_size=72), "test", 2)
    spec = pipeline.TransformSpec(72, TINY_SIZE)
    _, batches = pipeline.eval_batches(source, spec, pipeline.Layout(2), with_box=True)
    asked = cam.CamOptions(("block3",), target="finer", finer_k=2, finer_alpha=0.5)
    report = localization.evaluate(model_j, variables, batches, spec, options=asked, auc_steps=0)
    assert made == [asked] and (made[0].finer_k, made[0].finer_alpha) == (2, 0.5) and report["count"] == 2
