"""PyTorch weights -> Flax variables and checkpoints for PMG and PMG-V2.

Names are mapped mechanically: a numeric path component joins the one before it
(`layer1.0.conv1` -> `layer1_0/conv1`, `classifier1.4` -> `classifier1_4`), which
is how the Flax modules are named. Leaves: conv weight OIHW -> kernel HWIO (a depthwise
(C, 1, k, k) becomes (k, k, 1, C), Flax's grouped layout), linear weight (out, in) ->
kernel (in, out), BN and LayerNorm weight/bias -> scale/bias, running stats ->
batch_stats mean/var, a layer scale `gamma` -> gamma. Accepted spellings: the reference
PMG's and the official PMG-V2's names (the same, with conv biases in PMG-V2's blocks and no
concat head), the names of any registered backbone's PyTorch state dicts (torchvision ResNets,
timm ResNet-D and ConvNeXt) with or without `features.`, and a DataParallel
`module.` prefix. What a bare backbone's registry entry ignores (its classifier) is dropped.

Files are read by pmg_jax.weightfile, by content and never running code from them: safetensors
and .npz with numpy alone; PyTorch files (a state dict, a training checkpoint holding one, or a
whole pickled model such as the reference's `model.pth`, read without its source code) with torch.
The command line is pmg_jax/cli/convert.py:

    python -m pmg_jax.convert model.pth --out runs/pmg_cub --dataset cub
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pmg_jax import backbones, methods, optim, weightfile
from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import config as config_lib
from pmg_jax import model as model_lib
from pmg_jax import state as state_lib
from pmg_jax.data import sources
from pmg_jax.errors import PMGError

_SKIPPED_SUFFIXES = ("num_batches_tracked",)
_PLAIN_PARAMS = ("gamma",)  # parameters kept under their own name, unchanged (ConvNeXt's layer scale)
_PMG_ROOTS = (model_lib.BACKBONE, "conv_block", "classifier")


class ConversionError(PMGError, ValueError):
    """The weights do not fit the model; the message lists what is missing, unexpected or misshapen."""


def _module_path(torch_path: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for part in torch_path:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def canonical_name(name: str) -> str | None:
    """The reference-PMG spelling of a parameter name, or None for weights PMG does not use (a bare
    backbone's classifier, as its registry entry declares)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    if not name.startswith(_PMG_ROOTS):
        name = f"{model_lib.BACKBONE}.{name}"  # a bare backbone (torchvision / timm)
    inner = name[len(model_lib.BACKBONE) + 1 :] if name.startswith(f"{model_lib.BACKBONE}.") else None
    if inner is not None and inner.startswith(_ignored_prefixes()):
        return None
    return name


def _ignored_prefixes() -> tuple[str, ...]:
    return tuple(p for b in backbones.REGISTRY.values() for p in b.torch_ignore)


def variables_from_torch(state_dict: Mapping[str, Any], target: Mapping | None = None, dtype=np.float32) -> dict:
    """{'params', 'batch_stats'} for PMG (or a bare backbone under model.BACKBONE) from a PyTorch state dict.

    Values may be torch tensors or numpy arrays. With `target` (variables or their
    shapes, e.g. from `jax.eval_shape(model.init, ...)`), every key and shape is
    checked and a ConversionError lists all mismatches at once. `dtype` float64 keeps
    a float64 reference's values exact (the parity tests' truth).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for raw_name, value in state_dict.items():
        name = canonical_name(raw_name)
        if name is None or name.endswith(_SKIPPED_SUFFIXES):
            continue
        # Always a copy: torch.Tensor.numpy() shares memory with the (mutable) tensor.
        array = np.array(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype)
        *module, leaf = name.split(".")
        path = _module_path(module)
        if leaf == "weight" and array.ndim == 4:
            flat[("params", *path, "kernel")] = array.transpose(2, 3, 1, 0)
        elif leaf == "weight" and array.ndim == 2:
            flat[("params", *path, "kernel")] = array.T
        elif leaf == "weight":
            flat[("params", *path, "scale")] = array
        elif leaf == "bias" or leaf in _PLAIN_PARAMS:
            flat[("params", *path, leaf)] = array
        elif leaf == "running_mean":
            flat[("batch_stats", *path, "mean")] = array
        elif leaf == "running_var":
            flat[("batch_stats", *path, "var")] = array
        else:
            raise ConversionError(f"unexpected parameter {raw_name!r}")
    if target is not None:
        check_against(flat, target)
    return unflatten_dict(flat)


def check_against(flat: Mapping[tuple[str, ...], Any], target: Mapping) -> None:
    """Raise ConversionError naming missing, unexpected and wrongly shaped variables."""
    want = {
        k: tuple(v.shape)
        for k, v in flatten_dict({c: target[c] for c in ("params", "batch_stats") if c in target}).items()
    }
    have = {k: tuple(v.shape) for k, v in flat.items()}
    name = lambda k: "/".join(k)
    missing = sorted(name(k) for k in want.keys() - have.keys())
    unexpected = sorted(name(k) for k in have.keys() - want.keys())
    misshapen = sorted(f"{name(k)} {have[k]} != {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k])
    if missing or unexpected or misshapen:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:8])}{more}")
        raise ConversionError("weights do not match the model: " + "; ".join(parts))


# ----------------------------------------------------------------------------- reading files


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The named arrays in a PyTorch, .safetensors or .npz file (names as stored), read without running anything
    in it whatever its name (pmg_jax.weightfile); .safetensors and .npz need no torch."""
    try:
        return weightfile.read(path)
    except weightfile.WeightFileError as e:
        raise ConversionError(str(e)) from None


# ----------------------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The PMG or PMG-V2 (or bare backbone) that a state dict holds, in config terms (config.method, config.model)."""

    backbone: str
    width: int
    stage_sizes: tuple[int, ...]  # () when the backbone's standard block counts
    feature_size: int | None  # None: a bare backbone, no PMG blocks
    num_classes: int | None  # None: no heads
    method: str | None = None  # config.method; None: a bare backbone

    def describe(self) -> str:
        """E.g. 'a resnet50d backbone (blocks (3, 4, 6, 3), channels (256, 512, 1024, 2048))'."""
        arch = backbones.resolve(self.backbone, self.width, self.stage_sizes)
        pmg = "" if self.feature_size is None else f"{self.method} (feature size {self.feature_size}) on "
        return f"a {pmg}{self.backbone} backbone (blocks {arch.stage_sizes}, channels {arch.channels})"


def _canonical_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {c: tuple(v.shape) for k, v in state_dict.items() if (c := canonical_name(k)) is not None}


def infer_num_classes(state_dict: Mapping[str, Any]) -> int | None:
    """Classes of the first head's last Linear (PMG's and PMG-V2's), or None when there are no heads (a bare
    ResNet)."""
    shape = _canonical_shapes(state_dict).get("classifier1.4.weight")
    return None if shape is None else shape[0]


# What tells the methods' state dicts apart, by their keys: PMG-V2's blocks' convolutions have a bias and it has
# no concat head; PMG's have neither bias and it has one.
METHOD_KEYS = {"pmg": ("classifier_concat.4.weight",), "pmg_v2": ("conv_block1.0.conv.bias", "classifier3.4.weight")}


def infer_method(state_dict: Mapping[str, Any]) -> str | None:
    """The config.method whose state dicts have the keys this one has (METHOD_KEYS), None for no heads (a bare
    backbone); ConversionError for heads of neither."""
    names = {canonical_name(k) for k in state_dict}
    found = [m for m, keys in METHOD_KEYS.items() if all(k in names for k in keys)]
    if len(found) == 1:
        return found[0]
    if found or any(n and n.startswith(("conv_block", "classifier")) for n in names):
        raise ConversionError(
            f"heads of neither PMG nor PMG-V2 (PMG has {', '.join(METHOD_KEYS['pmg'])}; PMG-V2 "
            f"{', '.join(METHOD_KEYS['pmg_v2'])}): pass --method to say which"
        )
    return None


def infer_architecture(state_dict: Mapping[str, Any], method: str | None = None) -> Architecture:
    """Backbone, width, block counts, feature size, classes and method (`method` if given, else `infer_method`),
    read from the tensor names and shapes (each registered backbone's `infer` recognises its own)."""
    shapes = _canonical_shapes(state_dict)
    prefix = f"{model_lib.BACKBONE}."
    inner = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    found = None
    try:
        for infer in dict.fromkeys(b.infer for b in backbones.REGISTRY.values() if b.infer):
            found = found or infer(inner)
    except backbones.UnsupportedWeights as e:
        raise ConversionError(str(e)) from None
    if found is None:
        first = ", ".join(list(state_dict)[:3])
        raise ConversionError(
            f"not a state dict of a known backbone or PMG (registered: "
            f"{', '.join(backbones.REGISTRY)}) among its {len(state_dict)} tensors (first: {first})"
        )
    block = shapes.get("conv_block1.0.conv.weight")
    return Architecture(
        backbone=found["name"],
        width=found["width"],
        stage_sizes=tuple(found["stage_sizes"]),
        feature_size=None if block is None else block[0],
        num_classes=infer_num_classes(state_dict),
        method=methods.get(method).name if method else infer_method(state_dict),
    )


# ----------------------------------------------------------------------------- backbones


def with_backbone(state_dict: Mapping[str, Any], variables: Mapping) -> dict:
    """`variables` with the backbone's params (and batch_stats, where it has BatchNorm) taken from a backbone
    or PMG state dict.

    Everything outside `features` (blocks, heads, classifiers) in the state dict is ignored;
    the backbone's keys and shapes must match those in `variables` exactly.
    """
    scope = model_lib.BACKBONE
    backbone = {k: v for k, v in state_dict.items() if (canonical_name(k) or "").startswith(f"{scope}.")}
    collections = [c for c in ("params", "batch_stats") if scope in variables.get(c, {})]
    loaded = variables_from_torch(backbone, target={c: {scope: variables[c][scope]} for c in collections})
    return {c: {**tree, scope: loaded[c][scope]} if c in collections else tree for c, tree in variables.items()}


def load_backbone(path: str, variables: Mapping | Callable[[], Mapping]) -> dict:
    """`variables` with the backbone (weights, and BN statistics where it has them) read from a registered
    backbone's PyTorch file (torchvision ResNet, timm ResNet-D or ConvNeXt) or a PMG file; a file that
    cannot be read, holds no known backbone or does not fit raises one line naming it. A callable `variables` is
    called once the file is read and named a backbone (a refused file costs no initialisation)."""
    state_dict = load_state_dict(path)
    try:
        found = infer_architecture(state_dict)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    if callable(variables):
        variables = variables()
    try:
        return with_backbone(state_dict, variables)
    except ConversionError as e:
        raise ConversionError(f"{e} ({path} holds {found.describe()})") from None


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint(
    variables: Mapping,
    out_dir: str,
    config: ml_collections.ConfigDict,
    class_names: Sequence[str],
    source: str | None = None,
) -> str:
    """Write `variables` as step 0 of a new run in `out_dir`; returns the checkpoint directory.

    The run restores like a trained one (state, meta with class names, config), and its
    TrainState has a fresh optimizer state, so train.py can resume fine-tuning from it.
    """
    num_classes = config.dataset.num_classes
    if len(class_names) != num_classes:
        raise ConversionError(f"{len(class_names)} class names for a model with {num_classes} classes")
    model = state_lib.create_model(config)
    tx = optim.from_config(config, steps_per_epoch=1)  # the schedule does not shape the state
    abstract = state_lib.abstract_variables(model, config.data.crop_size)
    check_against(flatten_dict({c: variables[c] for c in ("params", "batch_stats")}), abstract)
    params = jax.tree.map(jnp.asarray, variables["params"])
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(config.seed),
    )
    checkpoints = ckpt_lib.Checkpoints(os.path.join(out_dir, "checkpoints"))
    try:
        if checkpoints.latest_step() is not None:
            raise FileExistsError(f"{out_dir} already holds a run; choose a new output directory")
        meta = {
            "epoch": 0,
            "step": 0,
            "best": {"combined": -1.0, "epoch": -1},
            "class_names": list(class_names),
            "data_state": {"step": 0},
            "eval": None,
            "converted_from": source,
        }
        checkpoints.save(0, state, meta, config.to_dict())
        checkpoints.wait()
    finally:
        checkpoints.close()
    return os.path.join(checkpoints.directory, "0")


def load_config(dataset: str | None) -> ml_collections.ConfigDict:
    """The library's preset for `dataset` (pmg_jax.config.DATASETS), or the defaults without one."""
    if dataset is None:
        return config_lib.get_config()
    try:
        return config_lib.for_dataset(dataset)
    except ValueError as e:
        raise ConversionError(f"--dataset {dataset}: {e}") from e


def class_names_for(config: ml_collections.ConfigDict) -> tuple[list[str], str]:
    """(names, where they came from): the dataset's class list if its files are found, else class_{i}."""
    n = config.dataset.num_classes
    try:
        names = list(sources.make_source(config, "test").class_names)
    except (ValueError, OSError) as e:
        return [f"class_{i}" for i in range(n)], f"generic class_0..class_{n - 1} ({config.dataset.name}: {e})"
    if len(names) != n:
        raise ConversionError(f"the {config.dataset.name} dataset has {len(names)} classes but the model has {n}")
    return names, f"the {config.dataset.name} class list"


class Converted(NamedTuple):
    """What `convert_to_run` wrote."""

    checkpoint_dir: str
    architecture: Architecture
    class_names_origin: str


def convert_to_run(
    src: str,
    out_dir: str,
    *,
    dataset: str | None = None,
    num_classes: int | None = None,
    backbone: str | None = None,
    feature_size: int | None = None,
    data_dir: str | None = None,
    method: str | None = None,
) -> Converted:
    """Convert a PMG or PMG-V2 file into a run directory that explain.py and evaluation restore like a trained run.

    The architecture and the method are read from the weights (`method`, config.method's name, says it instead);
    `backbone`, `feature_size` and `num_classes` are checks against it. The config is the library preset of
    `dataset` (pmg_jax.config.for_dataset; the defaults without a dataset) with the method, the model fields and the
    class count of the weights.
    """
    state_dict = load_state_dict(src)
    arch = infer_architecture(state_dict, method)
    if arch.num_classes is None:
        raise ConversionError(
            f"{src} holds a bare {arch.backbone} backbone, not a PMG model: use it to initialise "
            f"training instead (--config.init.backbone={src})"
        )
    if num_classes is not None and num_classes != arch.num_classes:
        raise ConversionError(f"{num_classes} classes were asked for but the weights' heads have {arch.num_classes}")
    arch = dataclasses.replace(arch, backbone=backbone or arch.backbone, feature_size=feature_size or arch.feature_size)
    config = load_config(dataset)
    if dataset is not None and config.dataset.num_classes != arch.num_classes:
        raise ConversionError(
            f"the weights' heads have {arch.num_classes} classes but the {dataset} preset has "
            f"{config.dataset.num_classes}: weights for another dataset?"
        )
    config.dataset.num_classes, config.method = arch.num_classes, arch.method
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    config.model.backbone, config.model.width = arch.backbone, arch.width
    config.model.stage_sizes, config.model.feature_size = arch.stage_sizes, arch.feature_size
    if dataset is None:
        names = [f"class_{i}" for i in range(arch.num_classes)]
        origin = f"generic class_0..class_{arch.num_classes - 1} (no dataset given)"
    else:
        names, origin = class_names_for(config)
    variables = variables_from_torch(state_dict)
    return Converted(write_checkpoint(variables, out_dir, config, names, source=os.path.abspath(src)), arch, origin)


if __name__ == "__main__":  # python -m pmg_jax.convert: the command lives in pmg_jax.cli.convert
    from pmg_jax.cli import convert as _command

    _command.main()
