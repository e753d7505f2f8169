"""The training methods, declared as data: what each optimizer update feeds the network and trains, the heads
and which of them make the prediction, the maps a CAM can show, whether batches carry positive pairs, and the
default learning-rate schedule. steps, optim, state, validate, explain, predict and export read a `Method`
(by `config.method`), never the name of one.

PMG (Du et al. 2020): progressive jigsaw passes (`model.PASSES`, `model.SCHEDULES`), four heads (three blocks
and their concat), all four summed. PMG-V2 (Du et al., T-PAMI 2021): no jigsaw; update k tiles the backbone's
stages (category-consistent block convolution, `Update.tiles`) and trains head k with cross-entropy plus
alpha_k * w * MSE of the anchors' and positives' consistency features k (w = CE / MSE as a constant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax

from pmg_jax import model, pmg_v2
from pmg_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Update:
    """One PMG-V2 optimizer update: the tiling n of each backbone stage's input (n x n tiles, 0: not tiled),
    the head it trains and the weight alpha of its consistency loss."""

    head: int
    tiles: tuple[int, ...]
    alpha: float


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method. `schedules`: config.schedule -> the updates of one iteration (PMG: tuples of
    `model.Pass`; PMG-V2: `Update`s); `heads`: the names of the module's logits, in order; `prediction`:
    the indices of the heads whose logits sum to the prediction; `cam_maps`: the maps a CAM can show;
    `pairs`: whether training batches carry a positive (same class, other image) for every image;
    `lr_schedule` / `step_epochs`: the default learning-rate schedule (config.optim.schedule) and the
    epochs after which the step schedule divides the rate by 10; `module`: the Flax module class."""

    name: str
    title: str  # how messages name it (the paper's name)
    schedules: Mapping[str, tuple]
    heads: tuple[str, ...]
    prediction: tuple[int, ...]
    cam_maps: tuple[str, ...]
    pairs: bool
    lr_schedule: str
    step_epochs: tuple[int, ...]
    module: Callable[..., nn.Module]

    def updates(self, schedule: str) -> tuple:
        """The updates of one training iteration under config.schedule `schedule`."""
        return self.schedules[schedule]

    def updates_per_iteration(self, schedule: str) -> int:
        """Optimizer updates per training iteration under `schedule` (what a per-epoch lr schedule counts)."""
        return len(self.updates(schedule))

    @property
    def eval_names(self) -> tuple[str, ...]:
        """What evaluation reports, in the eval step's order: every head, then their combined prediction."""
        return (*self.heads, model.COMBINED)

    def combined(self, logits: Sequence[jax.Array]) -> jax.Array:
        """The prediction's logits: the sum of the `prediction` heads' logits."""
        return model.combined_logits([logits[i] for i in self.prediction])


PMG = Method(
    name="pmg",
    title="PMG",
    schedules=model.SCHEDULES,
    heads=model.HEADS,
    prediction=tuple(range(len(model.HEADS))),
    cam_maps=model.CAM_MAPS,
    pairs=False,
    lr_schedule="cosine",
    step_epochs=(),
    module=model.PMG,
)

# The official code's tilings of (layer1, layer2, layer3, layer4) and consistency weights, update by update.
V2_UPDATES = (
    Update(0, (8, 8, 0, 0), 0.01),
    Update(1, (4, 4, 4, 0), 0.05),
    Update(2, (2, 2, 2, 2), 0.1),
)
PMG_V2 = Method(
    name="pmg_v2",
    title="PMG-V2",
    schedules={"progressive": V2_UPDATES},
    heads=pmg_v2.HEADS,
    prediction=tuple(range(len(pmg_v2.HEADS))),
    cam_maps=(*model.BLOCKS, model.COMBINED, *model.STAGES),  # combined: the prediction's Grad-CAM (pmg_jax.cam)
    pairs=True,
    lr_schedule="step",
    step_epochs=(100,),
    module=pmg_v2.PMGV2,
)

METHODS: dict[str, Method] = {m.name: m for m in (PMG, PMG_V2)}


def get(name: str) -> Method:
    """The method `name` (config.method); ConfigError naming the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r} must be one of {tuple(METHODS)}")
    return METHODS[name]
