"""PMG: a registered backbone with three granularity blocks on its last three stages, three heads and a
concat head, and the structure everything else derives from (passes, heads, what feeds them, CAM maps).

Submodule names follow the reference PyTorch code (`features`, `conv_block1_0`, `classifier1_4`,
`classifier_concat_0`, ...), with `.k` written as `_k`. Every map a CAM can explain passes through a
`perturb` point and is `sow`n under 'intermediates', so Grad-CAM reads activations and their
gradients from this very module (see `pmg_jax.cam`); both are no-ops unless those collections are used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmg_jax import backbones
from pmg_jax.layers import BatchNorm, Conv, Linear

BACKBONE = "features"  # scope of the backbone's parameters (the reference's name): its learning-rate group
HEADS = ("head1", "head2", "head3", "concat")  # the model's logits, in this order
CONCAT = HEADS.index("concat")
BLOCKS = ("block1", "block2", "block3")  # granularity block k feeds head k and the concat head
STAGES = ("layer2", "layer3", "layer4")  # the backbone stage maps the blocks read, named as in ResNet
# The head whose logits explain each map a CAM can show: a block and the stage map under it by its own head;
# 'concat' is the concat head (or the seed's sum of the block maps, see pmg_jax.cam).
CAM_HEAD = {**{b: k for k, b in enumerate(BLOCKS)}, **{s: k for k, s in enumerate(STAGES)}, "concat": CONCAT}
CAM_MAPS = (*BLOCKS, "concat", *STAGES)
# PMG fields (config.model fields of the same name) that go to the backbone's build where its registry entry
# lists them in `options`, with what each is; a value other than 0 for a backbone without it is refused.
BACKBONE_OPTIONS = {"drop_path_rate": "stochastic depth"}


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass of a training iteration: the input (a jigsaw of config.jigsaw.granularities[jigsaw], or the
    original images when None) and the head whose loss it trains."""

    head: int
    jigsaw: int | None


# The progressive schedule: jigsaw 8 -> head1, 4 -> head2, 2 -> head3, the originals -> concat.
PASSES = (Pass(0, 0), Pass(1, 1), Pass(2, 2), Pass(CONCAT, None))
UPDATES_PER_ITERATION = len(PASSES)  # the reference steps the optimizer after every pass


def feeds(head: int, path: Sequence[str], backbone: backbones.Backbone) -> bool:
    """Whether the module at parameter path `path` (top-level name first) lies on the way to `head`."""
    top = path[0]
    if top == BACKBONE:
        # block k sits on stage num_stages - 3 + k; the concat head reads every block
        last = backbone.num_stages if head == CONCAT else backbone.num_stages - len(BLOCKS) + 1 + head
        return backbone.stage_of(tuple(path[1:])) <= last
    if top.startswith("conv_block"):
        return head == CONCAT or top.startswith(f"conv_block{head + 1}_")
    return top.startswith(f"classifier{head + 1}_" if head < CONCAT else "classifier_concat_")


def backbone_options(fields: Any, backbone: backbones.Backbone) -> dict[str, Any]:
    """The BACKBONE_OPTIONS values of `fields` (a PMG or config.model) that `backbone` takes; ValueError for
    one it does not take that is set (not 0)."""
    for name, what in BACKBONE_OPTIONS.items():
        if getattr(fields, name) and name not in backbone.options:
            takers = ", ".join(b.name for b in backbones.REGISTRY.values() if name in b.options) or "none"
            raise ValueError(f"{name}={getattr(fields, name)}: backbone {backbone.name} has no {what} "
                             f"(backbones with it: {takers})")
    return {name: getattr(fields, name) for name in BACKBONE_OPTIONS if name in backbone.options}


class BasicConv(nn.Module):
    """conv (no bias) -> BN (PyTorch momentum 0.01) -> ReLU, as the reference's BasicConv."""

    features: int
    kernel_size: int
    padding: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, self.kernel_size, 1, self.padding, torch_default_init=True,
                 dtype=self.dtype, name="conv")(x)
        return nn.relu(BatchNorm(momentum=0.01, dtype=self.dtype, name="bn")(x, train))


def _head(parent_prefix: str, x: jax.Array, feature_size: int, num_classes: int, train: bool, dtype) -> jax.Array:
    """The reference classifier Sequential, created in the caller's scope with reference names."""
    x = BatchNorm(momentum=0.1, dtype=dtype, name=f"{parent_prefix}_0")(x, train)
    x = Linear(feature_size, dtype=dtype, name=f"{parent_prefix}_1")(x)
    x = BatchNorm(momentum=0.1, dtype=dtype, name=f"{parent_prefix}_2")(x, train)
    x = nn.elu(x)
    logits = Linear(num_classes, dtype=dtype, name=f"{parent_prefix}_4")(x)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32 for the loss


class PMG(nn.Module):
    """Progressive multi-granularity network; returns (head1, head2, head3, concat) logits.

    `backbone` names a registered backbone (pmg_jax.backbones); `width` and `stage_sizes` override its
    base width and blocks per stage (0 / empty: its standard ones). Block channels follow the stages.
    `drop_path_rate` is the backbone's stochastic depth (those with it only); above 0, train-mode calls
    need `rngs={'dropout': key}`.
    Works for any input side divisible by the backbone's stride. Parameters are float32; `dtype` is the
    compute dtype (e.g. bfloat16).
    """

    num_classes: int
    backbone: str = "resnet50"
    feature_size: int = 512
    width: int = 0
    stage_sizes: Sequence[int] | None = None
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        arch = backbones.resolve(self.backbone, self.width, self.stage_sizes)
        stages = arch.build(self.dtype, name=BACKBONE, **backbone_options(self, arch.backbone))(x, train)
        pooled = []
        for k, (stage_name, feat) in enumerate(zip(STAGES, stages[-len(BLOCKS):]), start=1):
            feat = self._expose(stage_name, feat)
            y = BasicConv(self.feature_size, 1, 0, self.dtype, name=f"conv_block{k}_0")(feat, train)
            y = BasicConv(2 * self.feature_size, 3, 1, self.dtype, name=f"conv_block{k}_1")(y, train)
            y = self._expose(BLOCKS[k - 1], y)
            pooled.append(jnp.max(y, axis=(1, 2)))
        logits = [
            _head(f"classifier{k}", p, self.feature_size, self.num_classes, train, self.dtype)
            for k, p in enumerate(pooled, start=1)
        ]
        concat = jnp.concatenate(pooled, axis=-1)
        logits.append(_head("classifier_concat", concat, self.feature_size, self.num_classes, train, self.dtype))
        return tuple(logits)

    def _expose(self, name: str, y: jax.Array) -> jax.Array:
        """Perturbation point (gradient of the map) and sown activation, for CAM."""
        y = self.perturb(name, y)
        self.sow("intermediates", name, y)
        return y
