"""PyTorch weights -> Flax variables and checkpoints for PMG.

Names are mapped mechanically: a numeric path component joins the one before it
(`layer1.0.conv1` -> `layer1_0/conv1`, `classifier1.4` -> `classifier1_4`), which
is how the Flax modules are named. Leaves: conv weight OIHW -> kernel HWIO (a depthwise
(C, 1, k, k) -> (k, k, 1, C), Flax's grouped layout), linear weight (out, in) -> kernel
(in, out), BN and LayerNorm weight/bias -> scale/bias, conv and linear bias -> bias,
running stats -> batch_stats mean/var, ConvNeXt's layer scale `gamma` -> gamma.
Accepted spellings: the reference PMG's names, torchvision or timm ResNet (ResNet-D
included) and timm ConvNeXt names with or without `features.`, and a DataParallel
`module.` prefix. The classifiers of bare backbones (`fc`, `head`) are dropped.

Files: `.safetensors` and `.npz` are read with numpy alone; anything else is read
with torch (a state dict, a training checkpoint holding one, or a whole pickled
model such as the reference's `model.pth`, read without its source code).

    python -m pmg_jax.convert model.pth --out runs/pmg_cub --dataset cub
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pickle
import types
import warnings
import zipfile
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import config as config_lib
from pmg_jax import train_lib
from pmg_jax.data import sources
from pmg_jax.optim import make_optimizer
from pmg_jax.convnext import VARIANTS as CONVNEXT_VARIANTS
from pmg_jax.resnet import BOTTLENECK, RESNET_D, STAGE_SIZES, base_arch, stage_channels

_SKIPPED_SUFFIXES = ("num_batches_tracked",)
# Parts of bare ImageNet backbones that PMG does not use: the ResNet classifier, timm ConvNeXt's
# head (its LayerNorm and classifier) and the pre-head norm some timm ConvNeXt configurations have.
_UNUSED_PREFIXES = ("features.fc.", "features.head.", "features.norm_pre.")
# Parameters stored under their own name, unchanged: ConvNeXt's layer scale.
_PLAIN_PARAMS = ("gamma",)
_PMG_ROOTS = ("features", "conv_block", "classifier")
# Keys under which training scripts commonly nest the weights in a saved dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# A whole pickled model may import classes only from these packages; any other class
# (the reference's `model.PMG`, `Resnet.ResNet`, ...) is replaced by a stand-in.
_IMPORTABLE_ROOTS = frozenset({"torch", "collections", "builtins", "__builtin__", "numpy", "_codecs"})


class ConversionError(ValueError):
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
    """The reference-PMG spelling of a parameter name, or None for weights PMG does not use (classifiers)."""
    while name.startswith("module."):
        name = name[len("module."):]
    if not name.startswith(_PMG_ROOTS):
        name = "features." + name  # a bare ResNet (torchvision / timm)
    if name.startswith(_UNUSED_PREFIXES):
        return None
    return name


def variables_from_torch(state_dict: Mapping[str, Any], target: Mapping | None = None) -> dict:
    """{'params', 'batch_stats'} for PMG (or a bare backbone under 'features') from a PyTorch state dict.

    Values may be torch tensors or numpy arrays. With `target` (variables or their
    shapes, e.g. from `jax.eval_shape(model.init, ...)`), every key and shape is
    checked and a ConversionError lists all mismatches at once.
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for raw_name, value in state_dict.items():
        name = canonical_name(raw_name)
        if name is None or name.endswith(_SKIPPED_SUFFIXES):
            continue
        # Always a copy: torch.Tensor.numpy() shares memory with the (mutable) tensor.
        array = np.array(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
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
    want = {k: tuple(v.shape) for k, v in flatten_dict(
        {c: target[c] for c in ("params", "batch_stats") if c in target}).items()}
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
    """The named arrays in a .safetensors, .npz (no torch needed) or PyTorch file, names as stored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".npz"):
        return _read_npz(path)
    return _read_torch(path)


def _unreadable(path: str, kind: str, error: Exception) -> ConversionError:
    """One line naming the file and the reader's first sentence (truncated files give long reports)."""
    reason = (str(error).splitlines() or [""])[0].split(". ")[0]
    return ConversionError(f"{path}: cannot read it as a {kind} file (truncated or corrupt?): "
                           f"{type(error).__name__}: {reason}")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
        raise _unreadable(path, "safetensors", e) from e


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise _unreadable(path, "numpy .npz", e) from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install torch); "
                              ".safetensors and .npz files are read without it") from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # not plain tensors: a whole pickled model
            with warnings.catch_warnings():  # torch's source-code checks of the (stand-in) classes
                warnings.filterwarnings("ignore", module="torch.serialization")
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stand_in_pickle(torch))
    except (RuntimeError, EOFError, KeyError, ValueError, AttributeError, pickle.UnpicklingError) as e:
        raise _unreadable(path, "PyTorch", e) from e
    return {name: _tensor_to_numpy(t) for name, t in _find_state_dict(obj, path, torch).items()}


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _find_state_dict(obj: Any, path: str, torch: types.ModuleType) -> Mapping[str, Any]:
    """The state dict in what torch.load returned: a module, a state dict, or a checkpoint dict holding one."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj:
                return _find_state_dict(obj[key], path, torch)
    keys = f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else ""
    raise ConversionError(f"{path}: no model weights found in it (a {type(obj).__name__}{keys})")


def _stand_in_pickle(torch: types.ModuleType) -> types.ModuleType:
    """A `pickle_module` for torch.load that reads whole pickled models without their source code.

    Only torch, numpy and builtin containers are imported. Every other class becomes
    an empty nn.Module subclass of the same name; unpickling gives it the pickled
    attributes (its parameters and submodules), so `state_dict()` works without ever
    importing, say, an unrelated `model.py` that happens to be on the path. This is
    still unpickling: read only files you trust.
    """

    @functools.cache
    def stand_in(module: str, name: str) -> type:
        return type(name, (torch.nn.Module,), {"__module__": module, "__qualname__": name})

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module.partition(".")[0] in _IMPORTABLE_ROOTS:
                return super().find_class(module, name)
            return stand_in(module, name)

    pickle_module = types.ModuleType("pmg_jax_stand_in_pickle")
    pickle_module.Unpickler = Unpickler
    pickle_module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return pickle_module


# ----------------------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The PMG (or bare ResNet) that a state dict holds, in config.model terms."""

    backbone: str
    width: int
    stage_sizes: tuple[int, ...]  # () when the backbone's standard block counts
    feature_size: int | None  # None: a bare ResNet, no PMG blocks
    num_classes: int | None  # None: no heads


def _canonical_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {c: tuple(v.shape) for k, v in state_dict.items() if (c := canonical_name(k)) is not None}


def infer_num_classes(state_dict: Mapping[str, Any]) -> int | None:
    """Classes of the concat head's last Linear, or None when there are no heads (a bare ResNet)."""
    shape = _canonical_shapes(state_dict).get("classifier_concat.4.weight")
    return None if shape is None else shape[0]


def infer_architecture(state_dict: Mapping[str, Any]) -> Architecture:
    """Backbone, width, block counts, feature size and classes, read from the tensor names and shapes."""
    shapes = _canonical_shapes(state_dict)
    stem = shapes.get("features.conv1.weight")
    sizes = tuple(len({k.split(".")[2] for k in shapes if k.startswith(f"features.layer{i}.")}) for i in range(1, 5))
    if stem is None or not all(sizes):
        first = ", ".join(list(state_dict)[:3])
        raise ConversionError(f"not a ResNet or PMG state dict: no conv1 and layer1-4 weights among its "
                              f"{len(state_dict)} tensors (first: {first})")
    bottleneck = "features.layer1.0.conv3.weight" in shapes
    standard = [n for n in STAGE_SIZES if BOTTLENECK[n] == bottleneck and STAGE_SIZES[n] == sizes]
    backbone = standard[0] if standard else ("resnet50" if bottleneck else "resnet18")
    block = shapes.get("conv_block1.0.conv.weight")
    return Architecture(
        backbone=backbone,
        width=stem[0],
        stage_sizes=() if standard else sizes,
        feature_size=None if block is None else block[0],
        num_classes=infer_num_classes(state_dict),
    )


# ----------------------------------------------------------------------------- backbones


class Backbone(NamedTuple):
    """A backbone as its state dict's names and shapes tell it: architecture, blocks and channels per stage."""

    arch: str  # 'convnext', or the ResNet whose stem and blocks it has: 'resnet50', 'resnet101d', 'resnet18', ...
    depths: tuple[int, ...]  # blocks in each of the four stages
    dims: tuple[int, ...]  # output channels of each stage

    @property
    def variant(self) -> str | None:
        """timm's or torchvision's name for exactly these stages ('convnext_tiny', 'resnet50d'), else None."""
        if self.arch == "convnext":
            return next((n for n, v in CONVNEXT_VARIANTS.items() if v == (self.depths, self.dims)), None)
        standard = self.depths == STAGE_SIZES[base_arch(self.arch)] and self.dims == stage_channels(self.arch)
        return self.arch if standard else None

    def describe(self) -> str:
        """E.g. 'a resnet50d backbone (blocks (3, 4, 6, 3), channels (256, 512, 1024, 2048))'."""
        return f"a {self.variant or self.arch} backbone (blocks {self.depths}, channels {self.dims})"


def _count_blocks(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """Distinct block indices among the names `prefix<index>.*` (`prefix` includes its dot)."""
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def _convnext(shapes: Mapping[str, tuple[int, ...]]) -> Backbone:
    depths = tuple(_count_blocks(shapes, f"features.stages.{i}.blocks.") for i in range(4))
    dw = [shapes.get(f"features.stages.{i}.blocks.0.conv_dw.weight") for i in range(4)]
    if not all(depths) or None in dw:
        raise ConversionError(f"a ConvNeXt stem without 4 stages of blocks (blocks per stage {depths})")
    if len(shapes.get("features.stages.0.blocks.0.mlp.fc1.weight", (0, 0))) != 2:
        raise ConversionError("a ConvNeXt with 1x1-convolution MLPs (timm's conv_mlp=True, e.g. convnext_atto to "
                              "convnext_nano): only the Linear-MLP form (conv_mlp=False, the default) is supported")
    return Backbone("convnext", depths, tuple(w[0] for w in dw))


def _resnet(shapes: Mapping[str, tuple[int, ...]]) -> Backbone:
    depths = tuple(_count_blocks(shapes, f"features.layer{i}.") for i in range(1, 5))
    if not all(depths) or "features.bn1.weight" not in shapes:
        raise ConversionError(f"a ResNet stem without 4 stages of blocks (blocks per stage {depths})")
    deep_stem = "features.conv1.0.weight" in shapes
    avg_down = "features.layer2.0.downsample.2.weight" in shapes
    if deep_stem != avg_down:
        raise ConversionError("a timm ResNet with " + ("a deep stem but a strided-conv shortcut (resnet*c)"
                              if deep_stem else "an average-pool shortcut but a 7x7 stem") +
                              ": only torchvision's ResNet and ResNet-D (deep stem and average-pool shortcut)")
    bottleneck = "features.layer1.0.conv3.weight" in shapes
    standard = [n for n in STAGE_SIZES if BOTTLENECK[n] == bottleneck and STAGE_SIZES[n] == depths]
    arch = standard[0] if standard else ("resnet50" if bottleneck else "resnet18")
    arch = next(d for d, b in RESNET_D.items() if b == arch) if deep_stem else arch
    return Backbone(arch, depths, stage_channels(arch, shapes["features.bn1.weight"][0]))


def infer_backbone(state_dict: Mapping[str, Any]) -> Backbone:
    """The ResNet (torchvision, timm, ResNet-D) or timm ConvNeXt in a state dict (bare, or a PMG's `features`)."""
    shapes = _canonical_shapes(state_dict)
    if "features.stem.0.weight" in shapes:
        return _convnext(shapes)
    if "features.conv1.weight" in shapes or "features.conv1.0.weight" in shapes:
        return _resnet(shapes)
    first = ", ".join(list(state_dict)[:3])
    raise ConversionError(f"not a backbone state dict: no ResNet (conv1, layer1-4) or ConvNeXt (stem, stages) weights "
                          f"among its {len(state_dict)} tensors (first: {first})")


def with_backbone(state_dict: Mapping[str, Any], variables: Mapping) -> dict:
    """`variables` with params['features'] (and batch_stats['features'], where the backbone has BatchNorm)
    taken from a backbone or PMG state dict.

    Everything outside `features` (blocks, heads, classifiers) in the state dict is ignored;
    the backbone's keys and shapes must match those in `variables` exactly.
    """
    backbone = {k: v for k, v in state_dict.items() if (canonical_name(k) or "").startswith("features.")}
    collections = [c for c in ("params", "batch_stats") if "features" in variables.get(c, {})]
    loaded = variables_from_torch(backbone, target={c: {"features": variables[c]["features"]} for c in collections})
    return {c: {**variables[c], "features": loaded[c]["features"]} if c in collections else variables[c]
            for c in variables}


def load_backbone(path: str, variables: Mapping) -> dict:
    """`variables` with the backbone (weights, and BN statistics) read from a torchvision/timm ResNet, a timm
    ConvNeXt or a PMG file; an unreadable file, one with no backbone, or one that does not fit raises one line."""
    state_dict = load_state_dict(path)
    try:
        found = infer_backbone(state_dict)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    try:
        return with_backbone(state_dict, variables)
    except ConversionError as e:
        raise ConversionError(f"{e} ({path} holds {found.describe()})") from None


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint(variables: Mapping, out_dir: str, config: ml_collections.ConfigDict,
                     class_names: Sequence[str], source: str | None = None) -> str:
    """Write `variables` as step 0 of a new run in `out_dir`; returns the checkpoint directory.

    The run restores like a trained one (state, meta with class names, config), and its
    TrainState has a fresh optimizer state, so train.py can resume fine-tuning from it.
    """
    num_classes = config.dataset.num_classes
    if len(class_names) != num_classes:
        raise ConversionError(f"{len(class_names)} class names for a model with {num_classes} classes")
    model = train_lib.create_model(config)
    tx = make_optimizer(lr_new=config.optim.lr_new, lr_backbone=config.optim.lr_backbone,
                        num_epochs=config.num_epochs, steps_per_epoch=1,  # the schedule does not shape the state
                        momentum=config.optim.momentum, weight_decay=config.optim.weight_decay)
    abstract = jax.eval_shape(lambda: train_lib.init_variables(model, jax.random.PRNGKey(0), config.data.crop_size))
    check_against(flatten_dict({c: variables[c] for c in ("params", "batch_stats")}), abstract)
    params = jax.tree.map(jnp.asarray, variables["params"])
    state = train_lib.TrainState(
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
        meta = {"epoch": 0, "step": 0, "best": {"combined": -1.0, "epoch": -1}, "class_names": list(class_names),
                "data_state": {"step": 0}, "eval": None, "converted_from": source}
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


def convert_to_run(src: str, out_dir: str, *, dataset: str | None = None, num_classes: int | None = None,
                   backbone: str | None = None, feature_size: int | None = None,
                   data_dir: str | None = None) -> Converted:
    """Convert a PMG file into a run directory that explain.py and evaluation restore like a trained run.

    The architecture is read from the weights; `backbone`, `feature_size` and
    `num_classes` are checks against it. The config is the library preset of `dataset` (pmg_jax.config.for_dataset;
    the defaults without a dataset) with the model fields and class count of the weights.
    """
    state_dict = load_state_dict(src)
    arch = infer_architecture(state_dict)
    if arch.num_classes is None:
        raise ConversionError(f"{src} holds a bare {arch.backbone} backbone, not a PMG model: use it to initialise "
                              f"training instead (--config.init.backbone={src})")
    if num_classes is not None and num_classes != arch.num_classes:
        raise ConversionError(f"{num_classes} classes were asked for but the weights' heads have {arch.num_classes}")
    arch = dataclasses.replace(arch, backbone=backbone or arch.backbone, feature_size=feature_size or arch.feature_size)
    config = load_config(dataset)
    if dataset is not None and config.dataset.num_classes != arch.num_classes:
        raise ConversionError(f"the weights' heads have {arch.num_classes} classes but the {dataset} preset has "
                              f"{config.dataset.num_classes}: weights for another dataset?")
    config.dataset.num_classes = arch.num_classes
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


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert one PyTorch/safetensors/npz PMG file into a checkpoint run directory."""
    parser = argparse.ArgumentParser(prog="python -m pmg_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="model.pth (state dict or whole pickled model), .safetensors or .npz")
    parser.add_argument("--out", required=True, help="new run directory to write (e.g. runs/pmg_cub)")
    parser.add_argument("--dataset", help=f"dataset preset for the config and class names: {', '.join(config_lib.DATASETS)} (default: none)")
    parser.add_argument("--data-dir", help="where the dataset lives, to read its class names")
    parser.add_argument("--num-classes", type=int, help="expected classes (default: read from the heads)")
    parser.add_argument("--backbone", help="expected backbone, e.g. resnet50 (default: read from the weights)")
    parser.add_argument("--feature-size", type=int, help="expected block feature size (default: from the weights)")
    args = parser.parse_args(argv)
    try:
        done = convert_to_run(args.src, args.out, dataset=args.dataset, num_classes=args.num_classes,
                              backbone=args.backbone, feature_size=args.feature_size, data_dir=args.data_dir)
    except (ConversionError, OSError) as e:
        raise SystemExit(f"pmg_jax.convert: error: {e}") from None
    a = done.architecture
    print(f"converted {args.src}: PMG {a.backbone} (width {a.width}, feature size {a.feature_size}, "
          f"{a.num_classes} classes) -> {done.checkpoint_dir}")
    print(f"class names: {done.class_names_origin}")
    print(f"use it with: python explain.py --ckpt {args.out}")


if __name__ == "__main__":
    main()
