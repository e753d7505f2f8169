"""Config checks that run before any work: each failure is one line naming the field."""

from __future__ import annotations

import ml_collections
from flax.traverse_util import flatten_dict

from pmg_jax import config as config_lib
from pmg_jax import jigsaw
from pmg_jax.resnet import STAGE_SIZES

DTYPES = ("float32", "bfloat16", "float64")
BN_STATS = ("all", "used")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


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
        raise ConfigError(f"config.data.crop_size={d.crop_size} is larger than data.resize_size={d.resize_size} "
                          f"plus 2 x data.pad={d.pad}")
    if d.crop_size % 32:
        raise ConfigError(f"config.data.crop_size={d.crop_size} must be divisible by 32 (the backbone's stride)")
    for n in config.jigsaw.granularities:
        if n < 1 or d.crop_size % n:
            raise ConfigError(f"config.jigsaw.granularities: crop {d.crop_size} cannot be cut into a {n}x{n} grid "
                              f"(data.crop_size must be divisible by {n})")
    if len(config.jigsaw.granularities) != 3:
        raise ConfigError(f"config.jigsaw.granularities must have 3 entries (one per head), got "
                          f"{tuple(config.jigsaw.granularities)}")
    if config.jigsaw.mode not in jigsaw.MODES:
        raise ConfigError(f"config.jigsaw.mode={config.jigsaw.mode!r} must be one of {jigsaw.MODES}")
    if m.backbone not in STAGE_SIZES:
        raise ConfigError(f"config.model.backbone={m.backbone!r} must be one of {tuple(STAGE_SIZES)}")
    if m.stage_sizes and (len(m.stage_sizes) != 4 or min(m.stage_sizes) < 1):
        raise ConfigError(f"config.model.stage_sizes={tuple(m.stage_sizes)} must be 4 positive block counts or ()")
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
    for field in ("num_epochs", "eval_every_epochs", "log_every_steps", "dataset.num_classes", "checkpoint.keep"):
        node = config
        for part in field.split("."):
            node = node[part]
        if node < 1:
            raise ConfigError(f"config.{field}={node} must be at least 1")
    if config.checkpoint.every_steps < 0:
        raise ConfigError(f"config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 0")
    for field in ("lr_new", "lr_backbone", "weight_decay"):
        if config.optim[field] < 0:
            raise ConfigError(f"config.optim.{field}={config.optim[field]} must be >= 0")


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """A checkpoint's model must be the configured one (architecture and class count)."""
    for field in ("backbone", "width", "feature_size"):
        if saved["model"][field] != config.model[field]:
            raise ConfigError(f"{where}: checkpoint has model.{field}={saved['model'][field]!r} but the config says "
                              f"{config.model[field]!r}")
    if tuple(saved["model"]["stage_sizes"] or ()) != tuple(config.model.stage_sizes or ()):
        raise ConfigError(f"{where}: checkpoint has model.stage_sizes={tuple(saved['model']['stage_sizes'])} but the "
                          f"config says {tuple(config.model.stage_sizes)}")
    if saved["dataset"]["num_classes"] != config.dataset.num_classes:
        raise ConfigError(f"{where}: checkpoint has {saved['dataset']['num_classes']} classes but "
                          f"config.dataset.num_classes={config.dataset.num_classes}")
