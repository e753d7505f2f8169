"""Grad-CAM maps against PyTorch autograd on the same weights, and against the seed's formulas.

The truth is PyTorch (and the seed's numpy post-processing) computing in float64 on the same float32 weights
and inputs; ours must be within a few times PyTorch float32's own error from it plus a floor (tests/truth.py).
Floors, as a fraction of each group's largest value: activations (O(1-10)) and gradients (O(0.1-1)) 1e-5,
what float32 sums over 2048 channels cost; maps, in [0, 1], 1e-4 at every pixel.
"""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_fast
from truth import assert_near_truth

from bench.parity import as_float64, flax_variables, nhwc, torch_pmg
from pmg_jax import cam, methods
from pmg_jax.data import synthetic
from pmg_jax.errors import PMGError
from pmg_jax.model import PMG

PMG_MAPS = methods.PMG.cam_maps  # every map of a PMG

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
ACT_FLOOR, GRAD_FLOOR, MAP_TOL = 1e-5, 1e-5, 1e-4
TINY = dict(backbone="resnet50", width=8, stage_sizes=(1, 1, 1, 1), feature_size=16, num_classes=5)
TINY_SIZE = 64


# ---- an independent computation: PyTorch autograd through forward hooks, CAM formulas in torch ----


def torch_modules(model) -> dict:
    """The torch modules whose outputs are the maps of PMG_MAPS (concat aside)."""
    return {
        **{f"block{k}": getattr(model, f"conv_block{k}") for k in (1, 2, 3)},
        **{f"layer{k}": getattr(model.features, f"layer{k}") for k in (2, 3, 4)},
    }


def torch_score(z: torch.Tensor, target: str, classes=None) -> torch.Tensor:
    if target == "seed":
        return 0.5 * (z**2).sum()
    idx = z.argmax(1) if target == "predicted" else torch.as_tensor(classes)
    return z.gather(1, idx[:, None]).sum()


def torch_capture(model, x: torch.Tensor, requests, target="predicted", classes=None):
    """Activations (NHWC numpy) and d(head score)/d(map) for (map, head) requests, by torch autograd."""
    acts, handles = {}, []
    for name, module in torch_modules(model).items():
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o)))
    model.eval()
    logits = model(x)
    for h in handles:
        h.remove()
    grads = {
        (name, head): torch.autograd.grad(torch_score(logits[head], target, classes), acts[name], retain_graph=True)[0]
        for name, head in requests
    }
    return acts, grads


def torch_raw(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Pre-ReLU maps (B, h, w) from NCHW activations and gradients."""
    s = lambda t: t.sum((2, 3), keepdim=True)
    if method == "gradcam":
        w = g.mean((2, 3), keepdim=True)
    elif method == "gradcam++":
        denom = 2 * g**2 + s(a) * g**3
        alpha = torch.where(denom != 0, g**2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
        w = s(alpha * F.relu(g))
    elif method == "xgradcam":
        w = s(a * g) / (s(a) + 1e-7)
    elif method == "layercam":
        return (F.relu(g) * a).sum(1)
    elif method == "hirescam":
        return (g * a).sum(1)
    return (w * a).sum(1)


def torch_finish(raw: torch.Tensor, size: int) -> torch.Tensor:
    m = F.relu(raw)
    peak = m.amax((1, 2), keepdim=True)
    m = m / torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def torch_maps(model, x, maps, method, target="predicted", classes=None, concat="seed") -> dict[str, np.ndarray]:
    """The maps explain() should produce, computed in PyTorch."""
    acts, grads = torch_capture(model, x, cam.requests_for(methods.PMG, maps, concat), target, classes)
    size = x.shape[-1]
    raw = {req: torch_raw(method, acts[req[0]], g) for req, g in grads.items()}
    out = {}
    for name in maps:
        if name == "concat":
            parts = [raw[(b, 3 if concat == "head" else cam.head_of(methods.PMG, b))] for b in cam.BLOCKS]
            up = sum(
                F.interpolate(p[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0] for p in parts
            )
            m = F.relu(up)
            out[name] = m / torch.where(m.amax((1, 2), keepdim=True) > 0, m.amax((1, 2), keepdim=True), 1.0)
        else:
            out[name] = torch_finish(raw[(name, cam.head_of(methods.PMG, name))], size)
    return {k: v.detach().numpy() for k, v in out.items()}


# ---- fixtures ----


@pytest.fixture(scope="module")
def tiny_pair():
    model_t = torch_pmg(
        TINY["backbone"],
        TINY["width"],
        TINY["stage_sizes"],
        TINY["feature_size"],
        TINY["num_classes"],
        seed=5,
        size=TINY_SIZE,
    )
    model_j = PMG(**TINY)
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(2))
    return model_t, model_j, flax_variables(model_t, model_j, TINY_SIZE), x


def in_float32_and_float64(compute, model_t, x, *args, **kwargs):
    """(PyTorch float32's result, the float64 truth) of `compute(model, x, ...)` on the same weights and input."""
    return compute(model_t, x, *args, **kwargs), compute(as_float64(model_t), x.double(), *args, **kwargs)


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


# ---- tests ----


@pytest.mark.slow
def test_resnet50_gradients_and_maps_match_pytorch():
    """Full ResNet50 PMG at 224, batch 2: activations, gradients and five methods' maps at every block."""
    model_t = torch_pmg("resnet50", 64, None, 512, 200, seed=0, size=224)
    model_j = PMG(num_classes=200)
    variables = flax_variables(model_t, model_j, 224)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    requests = cam.requests_for(methods.PMG, cam.BLOCKS)

    (acts_32, grads_32), (acts_64, grads_64) = in_float32_and_float64(torch_capture, model_t, x, requests)
    captured = jax.jit(lambda v, x: cam.capture(model_j, v, x, requests))(variables, nhwc(x))
    names = [name for name, _ in requests]
    as_np = lambda d, keys: {str(k): nchw_to_nhwc(d[k]) for k in keys}
    assert_near_truth(
        {n: captured.acts[n] for n in names},
        as_np(acts_32, names),
        as_np(acts_64, names),
        floor=ACT_FLOOR,
        what="activations",
    )
    assert_near_truth(
        {str(r): captured.grads[r] for r in requests},
        as_np(grads_32, requests),
        as_np(grads_64, requests),
        floor=GRAD_FLOOR,
        what="grads",
    )
    finish = jax.jit(cam.maps_from_capture, static_argnames=("method", "maps", "size"))
    for method in GRADIENT_METHODS:
        got = finish(captured, method=method, maps=cam.BLOCKS, size=(224, 224))
        maps_of = lambda acts, grads, method=method: {
            name: torch_finish(torch_raw(method, acts[name], grads[(name, head)]), 224).detach().numpy()
            for name, head in requests
        }
        torch32, truth = maps_of(acts_32, grads_32), maps_of(acts_64, grads_64)
        for m in truth.values():
            assert m.max(axis=(1, 2)).min() > 0.5, method  # every image has a real, non-trivial map
        assert_near_truth({n: got[n] for n in truth}, torch32, truth, floor=MAP_TOL, what=f"{method} maps")


@pytest.mark.parametrize(
    "method",  # Grad-CAM in the fast tier; the other methods each compile their own explainer
    one_fast(GRADIENT_METHODS, "gradcam"),
)
def test_every_map_matches_pytorch(tiny_pair, method):
    """Blocks, backbone stages and the seed concat, each explained by its own head only."""
    model_t, model_j, variables, x = tiny_pair
    torch32, truth = in_float32_and_float64(torch_maps, model_t, x, PMG_MAPS, method)
    got = cam.make_explainer(model_j, cam.CamOptions(PMG_MAPS, method))(variables, nhwc(x))
    for name in PMG_MAPS:
        assert got.maps[name].shape == (3, TINY_SIZE, TINY_SIZE)
    assert_near_truth(dict(got.maps), torch32, truth, floor=MAP_TOL, what=f"{method} maps")


@pytest.mark.parametrize(
    "target,concat",  # one in the fast tier, each pair compiles its own explainer
    [
        ("class", "head"),
        pytest.param("seed", "seed", marks=pytest.mark.slow),
        pytest.param("seed", "head", marks=pytest.mark.slow),
    ],
)
def test_targets_and_concat_head_match_pytorch(tiny_pair, target, concat):
    model_t, model_j, variables, x = tiny_pair
    classes = np.array([4, 0, 2], np.int32)
    torch32, truth = in_float32_and_float64(torch_maps, model_t, x, PMG_MAPS, "gradcam", target, classes, concat)
    got = cam.make_explainer(model_j, cam.CamOptions(PMG_MAPS, "gradcam", target, concat))(variables, nhwc(x), classes)
    assert_near_truth(dict(got.maps), torch32, truth, floor=MAP_TOL, what=f"{target} {concat} maps")
    if target == "class":
        np.testing.assert_array_equal(got.targets, np.repeat(classes[:, None], 5, axis=1))  # 4 heads, their sum


def test_seed_target_and_concat_reproduce_the_seed(tiny_pair):
    """The seed's way on a test image: one block per backward of 0.5 * sum z^2, numpy/cv2 post-processing."""
    model_t, model_j, variables, _ = tiny_pair
    image = synthetic.make_example(synthetic.DemoSpec(num_classes=5, image_size=90), "test", 0)["image"]
    x = cam.prepare(image, TINY_SIZE, (0.5,) * 3, (0.5,) * 3)
    image = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    seed32, truth = in_float32_and_float64(seed_maps, model_t, image)
    got = cam.make_explainer(model_j, cam.CamOptions(("block1", "block2", "block3", "concat"), target="seed"))(
        variables, x[None]
    )
    assert_near_truth({n: got.maps[n][0] for n in truth}, seed32, truth, floor=MAP_TOL, what="the seed's maps")


def seed_maps(model_t, image: torch.Tensor) -> dict[str, np.ndarray]:
    """The seed's maps of one image: a forward and backward per block, numpy and cv2 after."""
    raw = {}
    for k in (1, 2, 3):  # the seed: a fresh forward and backward for each block
        acts, grads = torch_capture(model_t, image, [(f"block{k}", k - 1)], target="seed")
        a = acts[f"block{k}"][0].detach().numpy()
        g = grads[(f"block{k}", k - 1)][0].numpy()
        raw[k] = np.tensordot(g.mean(axis=(1, 2)), a, axes=1)  # sum_c w_c A_c, w_c = spatial mean of dS/dA_c
    seed = {}
    for k in (1, 2, 3):
        m = np.maximum(raw[k], 0)
        seed[f"block{k}"] = cv2.resize(m / m.max(), (TINY_SIZE, TINY_SIZE))
    total = np.maximum(sum(cv2.resize(raw[k], (TINY_SIZE, TINY_SIZE)) for k in (1, 2, 3)), 0)
    seed["concat"] = total / total.max()
    return seed


@pytest.mark.slow  # compiles its own explainer
def test_any_batch_size_gives_per_image_maps(tiny_pair):
    _, model_j, variables, x = tiny_pair
    explainer = cam.make_explainer(model_j, cam.CamOptions(PMG_MAPS))
    batch = explainer(variables, nhwc(x))
    for i in range(3):
        single = explainer(variables, nhwc(x[i : i + 1]))
        for name in PMG_MAPS:
            np.testing.assert_allclose(single.maps[name][0], batch.maps[name][i], atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "method",  # Grad-CAM++ (ratios of gradients) in the fast tier; each method compiles its own explainer
    one_fast(cam.METHODS, "gradcam++"),
)
def test_a_dead_block_gives_zero_maps_not_nan(tiny_pair, method):
    """A block whose output is all zero (ReLU of a very negative BN bias) explains nothing, without NaN."""
    _, model_j, variables, x = tiny_pair
    dead = jax.tree.map(lambda a: a, variables)
    bn = dead["params"]["conv_block3_1"]["bn"]
    bn["bias"] = jnp.full_like(bn["bias"], -1e4)
    out = cam.make_explainer(model_j, cam.CamOptions(PMG_MAPS, method))(dead, nhwc(x))
    for name, m in out.maps.items():
        assert np.all(np.isfinite(m)) and m.min() >= 0 and m.max() <= 1, (method, name)
    assert np.all(out.maps["block3"] == 0), method


@pytest.mark.slow  # compiles its own explainer
def test_eigencam_is_the_first_principal_component(tiny_pair):
    _, model_j, variables, x = tiny_pair
    _, sown = cam.forward(model_j, variables, nhwc(x))
    got = cam.make_explainer(model_j, cam.CamOptions(("block2",), "eigencam"))(variables, nhwc(x)).maps["block2"]
    for i in range(3):
        a = np.asarray(sown["block2"][i], np.float64)
        flat = a.reshape(-1, a.shape[-1])
        centred = flat - flat.mean(0)
        proj = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
        proj *= np.sign(proj @ flat.sum(1))
        m = np.maximum(proj, 0).reshape(a.shape[:2])
        want = cv2.resize((m / m.max()).astype(np.float32), (TINY_SIZE, TINY_SIZE))
        np.testing.assert_allclose(got[i], want, atol=MAP_TOL)


@pytest.mark.slow  # compiles its own explainer
def test_bfloat16_model_gives_valid_maps(tiny_pair):
    _, _, variables, x = tiny_pair
    model = PMG(**TINY, dtype=jnp.bfloat16)
    out = cam.make_explainer(model, cam.CamOptions(PMG_MAPS))(variables, nhwc(x))
    for name, m in out.maps.items():
        assert m.dtype == jnp.float32 and np.all(np.isfinite(m)) and m.min() >= 0 and m.max() <= 1, name


def test_options_are_checked():
    model = PMG(**TINY)
    for kwargs in (
        {"methods": "gradcam+"},
        {"target": "label"},
        {"concat": "sum"},
        {"maps": ("block4",)},
        {"maps": ()},
    ):
        with pytest.raises(ValueError):
            cam.CamOptions(**kwargs)
    with pytest.raises(ValueError, match="classes"):
        cam.explain(
            model, {"params": {}, "batch_stats": {}}, jnp.zeros((1, 64, 64, 3)), options=cam.CamOptions(target="class")
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("maps", ("block4",)),
        ("maps", ()),
        ("methods", ("gradcam", "gradcam+")),
        ("target", "label"),
        ("concat", "sum"),
        ("finer_k", 0),
        ("finer_alpha", float("inf")),
    ],
)
def test_bad_cam_options_are_refused_when_made_in_one_line_naming_the_field(field, value):
    """CamOptions checks every field once, when it is made: a PMGError (so each command prints one line) whose
    message starts with the field's name, which it also carries for a command line to name its flag."""
    finer = {"target": "finer"} if field.startswith("finer") else {}
    with pytest.raises(cam.CamOptionsError) as refused:
        cam.CamOptions(**finer, **{field: value})
    message = str(refused.value)
    assert isinstance(refused.value, PMGError) and refused.value.field == field
    assert message.startswith(f"{field} ") and "\n" not in message, message


def test_cam_options_are_one_value_in_model_order_split_by_method():
    """Maps in model order, methods once each, per_method splits several (an explainer takes one) and equal
    options are equal values."""
    options = cam.CamOptions(("concat", "block1", "block1"), ("layercam", "gradcam", "layercam"))
    assert options.maps == ("block1", "concat") and options.methods == ("layercam", "gradcam")
    split = options.per_method()
    assert list(split) == ["layercam", "gradcam"] and split["gradcam"] == cam.CamOptions(("block1", "concat"))
    with pytest.raises(cam.CamOptionsError, match="^methods: one per explainer"):
        cam.make_explainer(PMG(**TINY), options)


def test_default_cam_input_gives_the_maps_of_pil_resized_input(tiny_pair):
    """explain's input resize (cam.prepare, default backend) shrinks like the seed's PIL resize: on real photos the
    maps of every block correlate >= 0.999 with those of PIL-resized inputs on the same weights."""
    import skimage.data
    from PIL import Image

    _, model_j, variables, _ = tiny_pair
    photos = [np.ascontiguousarray(getattr(skimage.data, n)()[..., :3]) for n in ("astronaut", "coffee", "rocket")]
    mean = std = (0.5, 0.5, 0.5)
    ours = np.stack([cam.prepare(p, TINY_SIZE, mean, std) for p in photos])
    pil = np.stack(
        [
            (np.asarray(Image.fromarray(p).resize((TINY_SIZE,) * 2, Image.BILINEAR), np.float32) / 255 - 0.5) / 0.5
            for p in photos
        ]
    )
    explainer = cam.make_explainer(model_j, cam.CamOptions(cam.BLOCKS))
    a, b = explainer(variables, ours).maps, explainer(variables, pil).maps
    for name in cam.BLOCKS:
        for i in range(len(photos)):
            x, y = np.asarray(a[name][i]).ravel(), np.asarray(b[name][i]).ravel()
            assert y.std() > 0 and np.corrcoef(x, y)[0, 1] >= 0.999, (name, i)
