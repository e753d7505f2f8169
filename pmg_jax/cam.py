"""The Grad-CAM family over PMG's own activations: a whole batch and every map in one jitted pass.

Activations are the maps the model `sow`s under 'intermediates'; their gradients come from
reverse-mode autodiff through the model's `perturb` points (zeros added to each map), so there
is no second, hand-written forward. BatchNorm runs in inference mode.

Which logit drives a map comes from the model's method (`pmg_jax.methods`, read from the run's config):
block k and layer(k+1) are explained by head k (block k feeds head k, and PMG's concat head;
layer(k+1) is block k's input); PMG's concat map is either the seed's sum of the three block maps
('seed') or the concat head's gradient through each block ('head'); the 'combined' map (PMG-V2's) is
the prediction's Grad-CAM: the summed heads' score back-propagated into each block, the three block
maps summed. Target 'finer' is Finer-CAM (Zhang et al., CVPR 2025), as pytorch-grad-cam's FinerCAM
defines it: the explained class's logit contrasted with its k nearest classes by logit (see
`finer_score`), so a map shows what tells the class apart from those it is most confused with.
Every map is ReLU'd, divided by its maximum (an all-zero map stays zero) and resized
bilinearly to the input size, so it lies in [0, 1]. What a request explains (maps, methods, target,
concat map, Finer-CAM's k and alpha) is one frozen `CamOptions`, checked once when it is made.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax import methods, xla_options
from pmg_jax import model as model_lib
from pmg_jax.data import transforms
from pmg_jax.errors import PMGError

TARGETS = ("predicted", "class", "seed", "finer")
CONCAT_MODES = ("seed", "head")
BLOCKS, STAGES, COMBINED = model_lib.BLOCKS, model_lib.STAGES, model_lib.COMBINED
# every map some method can show (each method's own: its cam_maps), in one order: the backbone stages last
MAP_NAMES = tuple(
    sorted(dict.fromkeys(name for m in methods.METHODS.values() for name in m.cam_maps), key=lambda n: n in STAGES)
)
_EPS = 1e-7
FINER_K, FINER_ALPHA = 3, 1.0  # pytorch-grad-cam's FinerCAM defaults: comparison classes 1-3, alpha 1
_FINER_EPS = 1e-9  # FinerWeightedTarget's guard on the sum of the comparison weights

Request = tuple[str, int]  # (map name, output index) whose gradient is wanted


def method_of(model: nn.Module) -> methods.Method:
    """The method whose module `model` is (state.create_model builds config.method's)."""
    for method in methods.METHODS.values():
        if type(model) is method.module:
            return method
    raise TypeError(f"{type(model).__name__} is the module of no method in pmg_jax.methods")


def output_logits(method: methods.Method, logits: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """The logits of `method.eval_names`: the heads', then their combined prediction (`method.combined`)."""
    return (*logits, method.combined(logits))


def head_of(method: methods.Method, name: str) -> int:
    """Index in method.eval_names (the heads, then their combined prediction) of what explains map `name`: block
    k and the stage map under it by head k, a map named after one of those (PMG's concat, combined) by it."""
    for group in (BLOCKS, STAGES):
        if name in group:
            return group.index(name)
    return method.eval_names.index(name)


def default_maps(method: methods.Method) -> tuple[str, ...]:
    """The maps drawn unless others are asked for: the method's maps but the backbone stages."""
    return tuple(n for n in method.cam_maps if n not in STAGES)


class Captured(NamedTuple):
    """Activations (B, h, w, C) by map name, gradients by (map name, output), and the outputs' logits."""

    acts: dict[str, jax.Array]
    grads: dict[Request, jax.Array]
    logits: tuple[jax.Array, ...]


class Explanation(NamedTuple):
    """Maps (B, H, W) float32 in [0, 1] at input resolution, the logits of the method's `eval_names` (the heads',
    then the combined prediction's) and the class each of them explains (B, outputs)."""

    maps: dict[str, jax.Array]
    logits: tuple[jax.Array, ...]
    targets: jax.Array


def prepare(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The seed's CAM input: the whole RGB image resized to size x size (no crop), then normalised."""
    return transforms.normalize(transforms.resize(image, size), mean, std)


def target_score(logits: jax.Array, options: CamOptions, classes: jax.Array | None = None) -> jax.Array:
    """Per-image score (B,) whose gradient a map explains (options.target): a class's logit, the Finer-CAM contrast,
    or the seed's 0.5 * sum_c z_c^2."""
    if options.target == "seed":
        return 0.5 * jnp.sum(jnp.square(logits), axis=-1)
    main = explained_class(logits, options.target, classes)
    if options.target == "finer":
        return finer_score(logits, main, similar_classes(logits, main, options.finer_k), options.finer_alpha)
    return jnp.take_along_axis(logits, main[:, None], axis=-1)[:, 0]


def explained_class(logits: jax.Array, target: str, classes: jax.Array | None = None) -> jax.Array:
    """The class (B,) a head's map is about: the given one for 'class' (and for 'finer' when given), else the
    head's prediction."""
    if target == "class" or (target == "finer" and classes is not None):
        return jnp.broadcast_to(jnp.asarray(classes, jnp.int32), logits.shape[:1])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def similar_classes(logits: jax.Array, main: jax.Array, k: int = FINER_K) -> jax.Array:
    """The min(k, C - 1) classes (B, k) whose logits are nearest |z_c - z_main| to the main class's, nearest first.

    FinerCAM's ranking: it sorts all classes by that distance and takes places 1..k (place 0 is
    the main class itself, at distance 0); exact ties go to the lower class id here.
    """
    k = min(k, logits.shape[-1] - 1)
    z_main = jnp.take_along_axis(logits, main[:, None], axis=-1)
    distance = jnp.abs(logits - z_main)
    distance = jnp.where(jnp.arange(logits.shape[-1]) == main[:, None], jnp.inf, distance)
    return jax.lax.top_k(-distance, k)[1]


def finer_score(logits: jax.Array, main: jax.Array, similar: jax.Array, alpha: float = FINER_ALPHA) -> jax.Array:
    """FinerWeightedTarget: sum_j p_j (z_main - alpha z_j) / (sum_j p_j + 1e-9) over the similar classes j.

    p = softmax(logits) weights each comparison and is differentiated too, as in pytorch-grad-cam.
    """
    p = jax.nn.softmax(logits, axis=-1)
    weights = jnp.take_along_axis(p, similar, axis=-1)
    z_main = jnp.take_along_axis(logits, main[:, None], axis=-1)
    z_similar = jnp.take_along_axis(logits, similar, axis=-1)
    return jnp.sum(weights * (z_main - alpha * z_similar), axis=-1) / (jnp.sum(weights, axis=-1) + _FINER_EPS)


def _variables(variables: dict) -> dict:
    """Only the collections inference needs (drops e.g. 'perturbations' from `init`)."""
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def perturbation_zeros(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """Zero perturbations shaped for this very batch (via `jax.eval_shape`, nothing is computed)."""
    shapes = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["perturbations"])[1]["perturbations"], variables, images
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def forward(model: nn.Module, variables: dict, images: jax.Array) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """Inference logits and every sown map, without gradients."""
    logits, state = model.apply(_variables(variables), images, train=False, mutable=["intermediates"])
    return logits, {name: value[0] for name, value in state["intermediates"].items()}


def _spatial_sum(x: jax.Array) -> jax.Array:
    """Sum over the two spatial axes of (B, h, w, C), kept for broadcasting."""
    return jnp.sum(x, axis=(1, 2), keepdims=True)


def _weighted(weights: jax.Array, a: jax.Array) -> jax.Array:
    """sum_c w_c A_c for per-image channel weights (B, 1, 1, C)."""
    return jnp.sum(weights * a, axis=-1)


def _gradcam(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradient."""
    return _weighted(jnp.mean(g, axis=(1, 2), keepdims=True), a)


def _gradcam_pp(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM++ (Chattopadhay et al. 2018), exponential-score closed form: alpha = g^2 / (2 g^2 + sum(A) g^3)."""
    g2 = jnp.square(g)
    denominator = 2.0 * g2 + _spatial_sum(a) * g2 * g
    alpha = jnp.where(denominator != 0, g2 / jnp.where(denominator != 0, denominator, 1.0), 0.0)
    return _weighted(_spatial_sum(alpha * nn.relu(g)), a)


def _xgradcam(a: jax.Array, g: jax.Array) -> jax.Array:
    """XGrad-CAM (Fu et al. 2020): weights sum(A * g) / sum(A) per channel."""
    return _weighted(_spatial_sum(a * g) / (_spatial_sum(a) + _EPS), a)


def _layercam(a: jax.Array, g: jax.Array) -> jax.Array:
    """LayerCAM (Jiang et al. 2021): positive gradients weight each location."""
    return jnp.sum(nn.relu(g) * a, axis=-1)


def _hirescam(a: jax.Array, g: jax.Array) -> jax.Array:
    """HiResCAM (Draelos & Carin 2020): gradient times activation, summed over channels."""
    return jnp.sum(g * a, axis=-1)


def _eigencam_one(a: jax.Array) -> jax.Array:
    """Projection of one image's centred (h*w, C) activations on their first principal direction."""
    h, w, c = a.shape
    flat = a.reshape(h * w, c)
    centred = flat - jnp.mean(flat, axis=0)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    # The SVD's sign is arbitrary: orient the map to agree with the total activation.
    sign = jnp.where(jnp.dot(projection, jnp.sum(flat, axis=-1)) < 0, -1.0, 1.0)
    return (sign * projection).reshape(h, w)


def _eigencam(a: jax.Array, g: jax.Array | None = None) -> jax.Array:
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the activations, no gradient."""
    return jax.vmap(_eigencam_one)(a)


class Method(NamedTuple):
    """A CAM method: its map from activations (and gradients, when it uses them)."""

    fn: Callable[..., jax.Array]
    uses_gradients: bool = True


_METHODS: dict[str, Method] = {
    "gradcam": Method(_gradcam),
    "gradcam++": Method(_gradcam_pp),
    "xgradcam": Method(_xgradcam),
    "layercam": Method(_layercam),
    "hirescam": Method(_hirescam),
    "eigencam": Method(_eigencam, uses_gradients=False),
}
METHODS = tuple(_METHODS)


class CamOptionsError(PMGError, ValueError):
    """CAM options that cannot work; the message is one line that starts with the field's name (`field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class CamOptions:
    """What a CAM request explains, checked once when made: the maps (kept in MAP_NAMES order; None: the model's
    method's `default_maps`; `for_method` fills them in and checks them against the method), the methods (each
    computed by its own explainer: `per_method`), the target (predicted | class | seed | finer), PMG's concat map
    (seed: the block maps' sum; head: the concat head's gradient) and Finer-CAM's k and alpha (used by target
    'finer' only). A CamOptionsError names the field that cannot work."""

    maps: Sequence[str] | None = None
    methods: Sequence[str] | str = ("gradcam",)
    target: str = "predicted"
    concat: str = "seed"
    finer_k: int = FINER_K
    finer_alpha: float = FINER_ALPHA

    def __post_init__(self) -> None:
        maps, methods = [self.maps] if isinstance(self.maps, str) else self.maps, self.methods
        methods = tuple(dict.fromkeys([methods] if isinstance(methods, str) else methods))
        if maps is not None and (not maps or any(m not in MAP_NAMES for m in maps)):
            raise CamOptionsError(
                "maps", f"maps must be a non-empty subset of {', '.join(MAP_NAMES)}; got {list(maps)}"
            )
        object.__setattr__(self, "maps", None if maps is None else tuple(n for n in MAP_NAMES if n in maps))
        object.__setattr__(self, "methods", methods)
        for field, value, allowed in (("target", self.target, TARGETS), ("concat", self.concat, CONCAT_MODES)):
            if value not in allowed:
                raise CamOptionsError(field, f"{field} must be one of {', '.join(allowed)}; got {value!r}")
        if not methods or any(m not in METHODS for m in methods):
            raise CamOptionsError("methods", f"methods must be among {', '.join(METHODS)}; got {list(methods)}")
        if self.target == "finer":
            self._check_finer()

    def _check_finer(self) -> None:
        """Finer-CAM: gradient methods only, k a positive whole number of classes, alpha finite."""
        for method in self.methods:
            if not _METHODS[method].uses_gradients:
                raise CamOptionsError(
                    "methods",
                    f"methods must be gradient methods for target 'finer': {method} has no target class to contrast "
                    f"(use one of {', '.join(m for m, v in _METHODS.items() if v.uses_gradients)})",
                )
        k = self.finer_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CamOptionsError("finer_k", f"finer_k must be a positive number of similar classes, not {k!r}")
        if not np.isfinite(self.finer_alpha):
            raise CamOptionsError("finer_alpha", f"finer_alpha must be a finite number, not {self.finer_alpha!r}")

    def for_method(self, method: methods.Method) -> CamOptions:
        """These options for a model of `method`: no maps means its default maps; a map it does not have is a
        CamOptionsError naming the method's maps."""
        if self.maps is None:
            return dataclasses.replace(self, maps=default_maps(method))
        if missing := [m for m in self.maps if m not in method.cam_maps]:
            raise CamOptionsError(
                "maps",
                f"maps {', '.join(missing)}: not a map of {method.name} (its maps: {', '.join(method.cam_maps)})",
            )
        return self

    def one_method(self) -> str:
        """The method of options that hold one (what cam.explain computes); `per_method` splits several."""
        if len(self.methods) != 1:
            raise CamOptionsError("methods", f"methods: one per explainer, not {list(self.methods)} (per_method)")
        return self.methods[0]

    def per_method(self) -> dict[str, CamOptions]:
        """These options split by method, each of one method, in order."""
        return {m: dataclasses.replace(self, methods=(m,)) for m in self.methods}


DEFAULT = CamOptions()  # the method's default maps by Grad-CAM, each head's prediction explained


def capture(
    model: nn.Module,
    variables: dict,
    images: jax.Array,
    requests: Sequence[Request],
    options: CamOptions = DEFAULT,
    classes: jax.Array | None = None,
) -> Captured:
    """One forward pass, and for each (map, output) request the gradient of that output's summed target score
    (`options`' target, and its Finer-CAM k and alpha); outputs are `method_of(model).eval_names`.

    The backward pass is the reverse-mode Jacobian of one scalar per distinct output, so gradients
    driven by different heads never mix (layer2 feeds all three heads); only the requested maps
    are differentiated, so nothing below them is back-propagated.
    """
    variables, method = _variables(variables), method_of(model)
    zeros = perturbation_zeros(model, variables, images)
    names = sorted({name for name, _ in requests})
    heads = sorted({head for _, head in requests})

    def scores(perturbed: dict[str, jax.Array]):
        """Summed target score per requested output, with the outputs' logits and sown maps as aux."""
        logits, state = model.apply(
            {**variables, "perturbations": {**zeros, **perturbed}}, images, train=False, mutable=["intermediates"]
        )
        logits = output_logits(method, logits)
        per_head = jnp.stack([jnp.sum(target_score(logits[h], options, classes)) for h in heads])
        return per_head, (logits, state["intermediates"])

    jacobian, (logits, sown) = jax.jacrev(scores, has_aux=True)({name: zeros[name] for name in names})
    acts = {name: sown[name][0] for name in names}
    grads = {(name, head): jacobian[name][heads.index(head)] for name, head in requests}
    return Captured(acts, grads, logits)


def raw_map(method: str, acts: jax.Array, grads: jax.Array | None = None) -> jax.Array:
    """A method's map (B, h, w) before ReLU and normalisation, computed in float32."""
    a = acts.astype(jnp.float32)
    g = None if grads is None else grads.astype(jnp.float32)
    return _METHODS[method].fn(a, g)


def normalize(m: jax.Array) -> jax.Array:
    """ReLU, then divide each map by its maximum; an all-zero map stays zero (no NaN)."""
    m = nn.relu(m)
    peak = jnp.max(m, axis=(1, 2), keepdims=True)
    return m / jnp.where(peak > 0, peak, 1.0)


def upsample(m: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (B, h, w) maps to (B, *size), half-pixel centres like cv2.resize."""
    return jax.image.resize(m, (m.shape[0], *size), method="bilinear")


def summed_parts(method: methods.Method, name: str, concat: str = "seed") -> tuple[Request, ...] | None:
    """The (block, output) maps that a summed map adds up (PMG's concat: each block by its own head, or with
    concat='head' by the concat head; combined: each block by the prediction), None for any other map."""
    if name == "concat":
        return tuple((b, head_of(method, "concat" if concat == "head" else b)) for b in BLOCKS)
    if name == COMBINED:
        return tuple((b, head_of(method, COMBINED)) for b in BLOCKS)
    return None


def requests_for(method: methods.Method, maps: Sequence[str], concat: str = "seed") -> tuple[Request, ...]:
    """The (map, output) gradients the given maps of a `method` model need."""
    out = set()
    for name in maps:
        out |= set(summed_parts(method, name, concat) or [(name, head_of(method, name))])
    return tuple(sorted(out))


def maps_from_capture(
    captured: Captured,
    method: str,
    maps: Sequence[str],
    size: tuple[int, int],
    concat: str = "seed",
    model_method: methods.Method = methods.PMG,
) -> dict[str, jax.Array]:
    """Final maps at `size` of CAM `method` for a `model_method` model; a summed map (concat, combined) is ReLU +
    normalise of the sum of its upsampled raw block maps."""
    raw = {
        (name, head): raw_map(method, captured.acts[name], captured.grads.get((name, head)))
        for name, head in requests_for(model_method, maps, concat)
    }
    out = {}
    for name in maps:
        parts = summed_parts(model_method, name, concat)
        if parts:
            out[name] = normalize(sum(upsample(raw[p], size) for p in parts))
        else:
            out[name] = upsample(normalize(raw[(name, head_of(model_method, name))]), size)
    return out


def explain(
    model: nn.Module,
    variables: dict,
    images: jax.Array,
    classes: jax.Array | None = None,
    options: CamOptions = DEFAULT,
) -> Explanation:
    """Maps of a batch of normalised NHWC images for `options` (of one method); `classes` (B,) are the targets
    when its target is 'class'.

    Target 'finer' contrasts each output's explained class (`classes` if given, else its prediction) with
    its options.finer_k nearest classes by that output's logits, weighted by options.finer_alpha.
    """
    model_method = method_of(model)
    options = options.for_method(model_method)
    method, maps, concat = options.one_method(), options.maps, options.concat
    if options.target == "class" and classes is None:
        raise ValueError("target='class' needs `classes` (one class id per image)")
    requests = requests_for(model_method, maps, concat)
    if not _METHODS[method].uses_gradients:
        logits, sown = forward(model, variables, images)
        captured = Captured({name: sown[name] for name, _ in requests}, {}, output_logits(model_method, logits))
    else:
        captured = capture(model, variables, images, requests, options, classes)
    out = maps_from_capture(captured, method, maps, images.shape[1:3], concat, model_method)
    targets = jnp.stack([explained_class(z, options.target, classes) for z in captured.logits], axis=-1)
    return Explanation(out, captured.logits, targets)


def make_explainer(model: nn.Module, options: CamOptions = DEFAULT) -> Callable[..., Explanation]:
    """`explain` jitted for `options` (of one method; its maps those of `model`'s method, or none for their defaults):
    fn(variables, images, classes=None) -> Explanation."""
    options.one_method()  # options of several methods, or maps the model lacks, are refused here, not when traced
    options = options.for_method(method_of(model))
    return xla_options.jit(functools.partial(explain, model, options=options))
