"""Config checks that run before any work: each failure is one line naming the field."""

from __future__ import annotations

import os

import ml_collections
from flax.traverse_util import flatten_dict

from pmg_jax import backbones, jigsaw, kernels
from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import config as config_lib
from pmg_jax import model as model_lib
from pmg_jax.data import transforms
from pmg_jax.errors import ConfigError
from pmg_jax.layers import GROUP_STATS

DTYPES = ("float32", "bfloat16", "float64")
BN_STATS = ("all", "used")


def _flat_keys(config: ml_collections.ConfigDict) -> set[str]:
    return {".".join(k) for k in flatten_dict(config.to_dict())}


def check_known_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """Refuse fields the defaults do not know (a misspelt key in a config file)."""
    unknown = sorted(_flat_keys(config) - _flat_keys(reference))
    if unknown:
        raise ConfigError(f"config: unknown field(s) {', '.join(unknown)} (pmg_jax/config.py lists the fields)")


def check(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raise ConfigError for the first value that cannot work, before any data or model is built."""
    check_known_keys(config, config_lib.get_config())
    d, m = config.data, config.model
    if d.crop_size > d.resize_size + 2 * d.pad:
        raise ConfigError(
            f"config.data.crop_size={d.crop_size} is larger than data.resize_size={d.resize_size} "
            f"plus 2 x data.pad={d.pad}"
        )
    if m.backbone not in backbones.REGISTRY:
        raise ConfigError(f"config.model.backbone={m.backbone!r} must be one of {tuple(backbones.REGISTRY)}")
    backbone = backbones.get(m.backbone)
    if d.crop_size % backbone.stride:
        raise ConfigError(
            f"config.data.crop_size={d.crop_size} must be divisible by {backbone.stride} (the stride of {m.backbone})"
        )
    for n in config.jigsaw.granularities:
        if n < 1 or d.crop_size % n:
            raise ConfigError(
                f"config.jigsaw.granularities: crop {d.crop_size} cannot be cut into a {n}x{n} grid "
                f"(data.crop_size must be divisible by {n})"
            )
    if len(config.jigsaw.granularities) != 3:
        raise ConfigError(
            f"config.jigsaw.granularities must have 3 entries (one per head), got {tuple(config.jigsaw.granularities)}"
        )
    if config.jigsaw.mode not in jigsaw.MODES:
        raise ConfigError(f"config.jigsaw.mode={config.jigsaw.mode!r} must be one of {jigsaw.MODES}")
    if m.stage_sizes and (len(m.stage_sizes) != backbone.num_stages or min(m.stage_sizes) < 1):
        raise ConfigError(
            f"config.model.stage_sizes={tuple(m.stage_sizes)} must be {backbone.num_stages} positive block counts or ()"
        )
    if m.width < 0:
        raise ConfigError(f"config.model.width={m.width} must be positive, or 0 for the backbone's standard width")
    if not 0 <= m.drop_path_rate < 1:
        raise ConfigError(f"config.model.drop_path_rate={m.drop_path_rate} must be in [0, 1)")
    if m.drop_path_rate and "drop_path_rate" not in backbone.options:
        takers = ", ".join(b.name for b in backbones.REGISTRY.values() if "drop_path_rate" in b.options) or "none"
        raise ConfigError(
            f"config.model.drop_path_rate={m.drop_path_rate}: backbone {backbone.name} has no "
            f"stochastic depth (backbones with it: {takers})"
        )
    if m.kernels not in kernels.PRESETS:
        raise ConfigError(f"config.model.kernels={m.kernels!r} must be one of {tuple(kernels.PRESETS)}")
    if d.resize_backend not in transforms.RESIZE_BACKENDS:
        raise ConfigError(
            f"config.data.resize_backend={d.resize_backend!r} must be one of {transforms.RESIZE_BACKENDS}"
        )
    if not 0.0 <= config.dataset.val_fraction < 1.0:
        raise ConfigError(f"config.dataset.val_fraction={config.dataset.val_fraction} must be in [0, 1)")
    if config.init.which not in ckpt_lib.WHICH:
        raise ConfigError(f"config.init.which={config.init.which!r} must be one of {ckpt_lib.WHICH}")
    if m.dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype={m.dtype!r} must be one of {DTYPES}")
    if config.bn_stats not in BN_STATS:
        raise ConfigError(f"config.bn_stats={config.bn_stats!r} must be one of {BN_STATS}")
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value < 1 or value % num_devices:
            raise ConfigError(f"config.{field}={value} must be a positive multiple of the {num_devices} devices")
        if value % num_processes:
            raise ConfigError(f"config.{field}={value} must be divisible by the {num_processes} processes")
    check_accelerator_options(config, backbone, num_devices)
    for field in ("num_epochs", "eval_every_epochs", "log_every_steps", "dataset.num_classes", "checkpoint.keep"):
        node = config
        for part in field.split("."):
            node = node[part]
        if node < 1:
            raise ConfigError(f"config.{field}={node} must be at least 1")
    if config.checkpoint.every_steps < 0:
        raise ConfigError(f"config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 0")
    if config.log_cams < 0:
        raise ConfigError(f"config.log_cams={config.log_cams} must be >= 0 (0: no CAMs logged)")
    for field in ("lr_new", "lr_backbone", "weight_decay", "warmup_epochs"):
        if config.optim[field] < 0:
            raise ConfigError(f"config.optim.{field}={config.optim[field]} must be >= 0")


def check_accelerator_options(
    config: ml_collections.ConfigDict, backbone: backbones.Backbone, num_devices: int
) -> None:
    """The schedule, gradient accumulation, rematerialisation and ghost BatchNorm fields."""
    m, k = config.model, config.accumulation_steps
    if config.schedule not in model_lib.SCHEDULES:
        raise ConfigError(f"config.schedule={config.schedule!r} must be one of {tuple(model_lib.SCHEDULES)}")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"config.accumulation_steps={k!r} must be a positive integer")
    if config.batch_size % (k * num_devices):
        raise ConfigError(
            f"config.accumulation_steps={k}: config.batch_size={config.batch_size} must be divisible "
            f"by accumulation_steps x the {num_devices} devices = {k * num_devices}"
        )
    if m.remat not in model_lib.REMAT:
        raise ConfigError(f"config.model.remat={m.remat!r} must be one of {model_lib.REMAT}")
    if m.remat == "stages" and "remat" not in backbone.options:
        raise ConfigError(
            f"config.model.remat='stages': backbone {backbone.name} does not declare the 'remat' "
            f"build option (use 'blocks')"
        )
    if not isinstance(m.bn_group_size, int) or m.bn_group_size < 0:
        raise ConfigError(
            f"config.model.bn_group_size={m.bn_group_size!r} must be 0 (whole batch) or a positive integer"
        )
    if m.bn_group_size and (config.batch_size // k) % m.bn_group_size:
        raise ConfigError(
            f"config.model.bn_group_size={m.bn_group_size} must divide the {config.batch_size // k} "
            f"images each forward normalises (batch_size / accumulation_steps)"
        )
    if m.bn_group_size and "bn_group_size" not in backbone.options:
        raise ConfigError(
            f"config.model.bn_group_size={m.bn_group_size}: backbone {backbone.name} does not declare "
            f"the 'bn_group_size' build option"
        )
    if m.bn_group_stats not in GROUP_STATS:
        raise ConfigError(f"config.model.bn_group_stats={m.bn_group_stats!r} must be one of {GROUP_STATS}")


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """A checkpoint's model must be the configured one (architecture and class count; a width or block
    counts left at 0 / () are the backbone's standard ones)."""
    for field in ("backbone", "feature_size"):
        if saved["model"][field] != config.model[field]:
            raise ConfigError(
                f"{where}: checkpoint has model.{field}={saved['model'][field]!r} but the config says "
                f"{config.model[field]!r}"
            )
    have = backbones.resolve(saved["model"]["backbone"], saved["model"]["width"], saved["model"]["stage_sizes"])
    want = backbones.resolve(config.model.backbone, config.model.width, config.model.stage_sizes)
    for field in ("width", "stage_sizes"):
        if getattr(have, field) != getattr(want, field):
            raise ConfigError(
                f"{where}: checkpoint has model.{field}={getattr(have, field)!r} but the config says "
                f"{getattr(want, field)!r}"
            )
    if saved["dataset"]["num_classes"] != config.dataset.num_classes:
        raise ConfigError(
            f"{where}: checkpoint has {saved['dataset']['num_classes']} classes but "
            f"config.dataset.num_classes={config.dataset.num_classes}"
        )


def check_workdir(workdir: str) -> None:
    """The workdir must be a directory, or creatable as one, and writable (checked without creating it)."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"workdir {workdir}: it is a file, not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"workdir {workdir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir}: {parent} is not writable")
