"""Config checks that run before any work: each failure is one line naming the field."""

from __future__ import annotations

import ml_collections
from flax.traverse_util import flatten_dict

from pmg_jax import backbones, jigsaw, kernels, methods
from pmg_jax import checkpoint as ckpt_lib
from pmg_jax import config as config_lib
from pmg_jax import model as model_lib
from pmg_jax.data import decode, transforms
from pmg_jax.errors import ConfigError, check_writable
from pmg_jax.layers import GROUP_STATS


def choices() -> dict[str, tuple]:
    """config field -> the values it may take, each from the module that owns the choice (the one table
    `check_choices` refuses a config by; the backbones are read now, as one may be registered late)."""
    return {
        "method": tuple(methods.METHODS),
        "model.backbone": tuple(backbones.REGISTRY),
        "model.dtype": model_lib.DTYPES,
        "model.remat": model_lib.REMAT,
        "model.kernels": tuple(kernels.PRESETS),
        "model.bn_group_stats": GROUP_STATS,
        "schedule": tuple(model_lib.SCHEDULES),
        "bn_stats": model_lib.BN_STATS,
        "jigsaw.mode": jigsaw.MODES,
        "data.resize_backend": transforms.RESIZE_BACKENDS,
        "init.which": ckpt_lib.WHICH,
        "optim.schedule": ("auto", *config_lib.LR_SCHEDULES),
    }


def _value(config: ml_collections.ConfigDict, field: str):
    """The value of a dotted config field (a list as a tuple, so that a saved JSON config compares equal)."""
    node = config
    for part in field.split("."):
        node = node[part]
    return tuple(node) if isinstance(node, list) else node


def check_choice(field: str, value) -> None:
    """`value` is one of the choices of config field `field` (a key of `choices`)."""
    allowed = choices()[field]
    if value not in allowed:
        raise ConfigError(f"config.{field}={value!r} must be one of {allowed}")


def check_choices(config: ml_collections.ConfigDict) -> None:
    """Every field with a fixed set of values (`choices`) holds one of them."""
    for field in choices():
        check_choice(field, _value(config, field))


# What a resumed run may not change unless config.resume_changes names it: the global batch, the update, the
# schedule, the data order, and the training data ("train_images": its size). num_epochs may change (to train
# longer): the step and the data position keep their meaning, and the cosine follows the new length from there.
RESUME_FIELDS = (
    "batch_size",
    "accumulation_steps",
    "schedule",
    "seed",
    "optim.warmup_epochs",
    "dataset.name",
    "dataset.source",
    "dataset.tfds_name",
    "dataset.train_split",
    "dataset.val_fraction",
    "dataset.val_seed",
    "dataset.demo_train_size",
    "dataset.demo_seed",
    "train_images",
)


def _flat_keys(config: ml_collections.ConfigDict) -> set[str]:
    return {".".join(k) for k in flatten_dict(config.to_dict())}


def check_known_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """Refuse fields the defaults do not know (a misspelt key in a config file)."""
    unknown = sorted(_flat_keys(config) - _flat_keys(reference))
    if unknown:
        raise ConfigError(f"config: unknown field(s) {', '.join(unknown)} (pmg_jax/config.py lists the fields)")


def check_method(config: ml_collections.ConfigDict, backbone: backbones.Backbone) -> None:
    """config.method's updates run on this config: its schedule exists, its tilings cut the backbone's stage
    inputs at data.crop_size (the stage and the size named), and ghost BatchNorm is off where stages are tiled
    (its groups would mix tiles of different images)."""
    method = methods.get(config.method)
    if config.schedule not in method.schedules:
        raise ConfigError(
            f"config.schedule={config.schedule!r}: method {method.name} has the schedules {tuple(method.schedules)}"
        )
    tilings = [getattr(update, "tiles", ()) for update in method.updates(config.schedule)]
    for tiles in tilings:
        if any(tiles) and "tiles" not in backbone.options:
            raise ConfigError(f"config.method={method.name}: backbone {backbone.name} cannot tile its stages")
        problem = backbone.tiling_error(config.data.crop_size, tiles)
        if problem:
            multiple = backbone.tiling_multiple(tilings)
            raise ConfigError(
                f"config.method={method.name}, config.data.crop_size: {problem} (use a crop that is a multiple "
                f"of {multiple})"
            )
        if any(tiles) and config.model.bn_group_size:
            raise ConfigError(
                f"config.model.bn_group_size={config.model.bn_group_size}: ghost BatchNorm does not work with "
                f"method {method.name}'s tiled stages (set it to 0)"
            )


def check(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raise ConfigError for the first value that cannot work, before any data or model is built."""
    check_known_keys(config, config_lib.get_config())
    check_choices(config)
    d, m = config.data, config.model
    if d.crop_size > d.resize_size + 2 * d.pad:
        raise ConfigError(
            f"config.data.crop_size={d.crop_size} is larger than data.resize_size={d.resize_size} "
            f"plus 2 x data.pad={d.pad}"
        )
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
    if not isinstance(d.max_image_pixels, int) or not 1 <= d.max_image_pixels <= decode.OPENCV_MAX_PIXELS:
        raise ConfigError(
            f"config.data.max_image_pixels={d.max_image_pixels!r} must be a whole number from 1 to "
            f"{decode.OPENCV_MAX_PIXELS} (OpenCV decodes no larger image)"
        )
    if not 0.0 <= config.dataset.val_fraction < 1.0:
        raise ConfigError(f"config.dataset.val_fraction={config.dataset.val_fraction} must be in [0, 1)")
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value < 1 or value % num_devices:
            raise ConfigError(f"config.{field}={value} must be a positive multiple of the {num_devices} devices")
        if value % num_processes:
            raise ConfigError(f"config.{field}={value} must be divisible by the {num_processes} processes")
    check_accelerator_options(config, backbone, num_devices)
    check_method(config, backbone)
    for field in ("num_epochs", "eval_every_epochs", "log_every_steps", "dataset.num_classes", "checkpoint.keep"):
        if _value(config, field) < 1:
            raise ConfigError(f"config.{field}={_value(config, field)} must be at least 1")
    if config.checkpoint.every_steps < 0:
        raise ConfigError(f"config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 0")
    if config.log_cams < 0:
        raise ConfigError(f"config.log_cams={config.log_cams} must be >= 0 (0: no CAMs logged)")
    for field in ("lr_new", "lr_backbone", "weight_decay", "warmup_epochs"):
        if config.optim[field] < 0:
            raise ConfigError(f"config.optim.{field}={config.optim[field]} must be >= 0")
    check_step_schedule(config.optim)
    unknown = sorted(set(resume_changes(config)) - {*RESUME_FIELDS, "all"})
    if unknown:
        raise ConfigError(
            f"config.resume_changes: {', '.join(unknown)} is not a field a resume checks "
            f"(one of {', '.join(RESUME_FIELDS)}, or all)"
        )


def check_step_schedule(o: ml_collections.ConfigDict) -> None:
    """optim.step_epochs: increasing whole epochs >= 0; optim.step_factor: a positive factor."""
    epochs = tuple(o.step_epochs)
    if not all(isinstance(e, int) and e >= 0 for e in epochs) or list(epochs) != sorted(set(epochs)):
        raise ConfigError(f"config.optim.step_epochs={epochs} must be increasing whole epochs >= 0")
    if not o.step_factor > 0:
        raise ConfigError(f"config.optim.step_factor={o.step_factor} must be > 0")


def check_accelerator_options(
    config: ml_collections.ConfigDict, backbone: backbones.Backbone, num_devices: int
) -> None:
    """The schedule, gradient accumulation, rematerialisation and ghost BatchNorm fields."""
    m, k = config.model, config.accumulation_steps
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"config.accumulation_steps={k!r} must be a positive integer")
    if config.batch_size % (k * num_devices):
        raise ConfigError(
            f"config.accumulation_steps={k}: config.batch_size={config.batch_size} must be divisible "
            f"by accumulation_steps x the {num_devices} devices = {k * num_devices}"
        )
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


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """A checkpoint's model must be the configured one (method, architecture and class count; a width or block
    counts left at 0 / () are the backbone's standard ones; a checkpoint without a method is PMG's)."""
    if saved.get("method", "pmg") != config.method:
        raise ConfigError(
            f"{where}: checkpoint was trained with config.method={saved.get('method', 'pmg')!r} but the config says "
            f"{config.method!r}; its parameters and steps belong to that method (use another --workdir)"
        )
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


def resume_changes(config: ml_collections.ConfigDict) -> list[str]:
    """The fields config.resume_changes allows a resume to change."""
    return [name.strip() for name in str(config.resume_changes).split(",") if name.strip()]


def check_resume(
    saved: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    saved_images: int | None,
    train_images: int,
    where: str,
) -> None:
    """Refuse to resume a run with a config that changes what its step or data position means (RESUME_FIELDS),
    unless config.resume_changes names the field (or says 'all')."""
    allowed = set(resume_changes(config))
    if "all" in allowed:
        return
    changes = [
        (f"config.{f}", _value(saved, f), _value(config, f))
        for f in RESUME_FIELDS
        if f != "train_images" and _value(saved, f) != _value(config, f)
    ]
    if saved_images is not None and saved_images != train_images:
        changes.append(("train_images (the training split's size)", saved_images, train_images))
    for name, was, now in changes:
        field = name.split()[0].removeprefix("config.")
        if field not in allowed:
            raise ConfigError(
                f"{where}: {name} is {now!r} but the run was trained with {was!r}, so its step and data position "
                f"would mean something else; resume with the run's value, use another --workdir, or "
                f"--config.resume_changes={field} if you mean it"
            )


def check_workdir(workdir: str) -> None:
    """The workdir must be a directory, or creatable as one, and writable (checked without creating it)."""
    check_writable(workdir, "pass --workdir DIR")
