"""PMG: a registered backbone with three granularity blocks on its last three stages, three heads and a
concat head, and the structure everything else derives from (passes, heads, what feeds them, CAM maps).

Submodule names follow the reference PyTorch code (`features`, `conv_block1_0`, `classifier1_4`,
`classifier_concat_0`, ...), with `.k` written as `_k`. Every map a CAM can explain passes through a
`perturb` point and is `sow`n under 'intermediates', so Grad-CAM reads activations and their
gradients from this very module (see `pmg_jax.cam`); both are no-ops unless those collections are used.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pmg_jax import backbones
from pmg_jax.layers import BatchNorm, Conv, Linear, checkpointed

BACKBONE = "features"  # scope of the backbone's parameters (the reference's name): its learning-rate group
HEADS = ("head1", "head2", "head3", "concat")  # the model's logits, in this order
CONCAT = HEADS.index("concat")
COMBINED = "combined"  # the prediction PMG is judged by (the paper's number): see combined_logits
BLOCKS = ("block1", "block2", "block3")  # granularity block k feeds head k and the concat head
STAGES = ("layer2", "layer3", "layer4")  # the backbone stage maps the blocks read, named as in ResNet
# The maps a CAM can show (pmg_jax.cam says which head explains each): the blocks, 'concat' (the seed's sum of the
# block maps, or the concat head's gradient through them) and the backbone stage maps the blocks read.
CAM_MAPS = (*BLOCKS, "concat", *STAGES)


def combined_logits(logits: Sequence[jax.Array]) -> jax.Array:
    """The combined prediction's logits, the reference's and the paper's: the sum of the four heads' logits."""
    return sum(logits[1:], logits[0])


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most probable classes of one probability vector as (index, probability), a tie to the lower index."""
    probabilities = np.asarray(probabilities)
    return [(int(i), float(probabilities[i])) for i in np.argsort(-probabilities, kind="stable")[:k]]


def accuracy_table(accuracies: dict[str, float]) -> list[str]:
    """Two aligned lines, the outputs' names over their accuracies (%): evaluation's and prediction's table."""
    return [" | ".join(f"{name:>8}" for name in accuracies), " | ".join(f"{v:8.2f}" for v in accuracies.values())]


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass of a training iteration: the input (a jigsaw of config.jigsaw.granularities[jigsaw], or the
    original images when None) and the head whose loss it trains."""

    head: int
    jigsaw: int | None


# The passes of an iteration: jigsaw 8 -> head1, 4 -> head2, 2 -> head3, the originals -> concat.
PASSES = (Pass(0, 0), Pass(1, 1), Pass(2, 2), Pass(CONCAT, None))
# config.schedule -> the passes each optimizer update of an iteration trains, in order. progressive (the
# reference): one update per pass; joint: the four inputs as one batch and one update of their summed loss.
SCHEDULES = {"progressive": tuple((p,) for p in PASSES), "joint": (PASSES,)}
REMAT = ("none", "blocks", "stages")  # PMG.remat: what the backward recomputes (see PMG)
DTYPES = ("float32", "bfloat16", "float64")  # PMG.dtype: what it computes in (its parameters stay float32)
# config.bn_stats: the running statistics an update keeps, of every module or of those that feed its heads (feeds)
BN_STATS = ("all", "used")


def updates_per_iteration(schedule: str) -> int:
    """Optimizer updates per training iteration under `schedule` (what the learning-rate schedule counts)."""
    return len(SCHEDULES[schedule])


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


class BasicConv(nn.Module):
    """conv (no bias unless `bias`, PMG-V2's) -> BN (PyTorch momentum 0.01) -> ReLU, as the reference's BasicConv."""

    features: int
    kernel_size: int
    padding: int = 0
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    bn_group_stats: str = "mean"
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(
            self.features,
            self.kernel_size,
            1,
            self.padding,
            torch_default_init=True,
            dtype=self.dtype,
            bias=self.bias,
            name="conv",
        )(x)
        bn = BatchNorm(
            momentum=0.01, dtype=self.dtype, group_size=self.bn_group_size, group_stats=self.bn_group_stats, name="bn"
        )
        return nn.relu(bn(x, train))


def granularity_block(first: BasicConv, second: BasicConv, x: jax.Array, train: bool) -> jax.Array:
    """A granularity block: its two basic convs."""
    return second(first(x, train), train)


def _classifier(bn0: BatchNorm, fc1: Linear, bn2: BatchNorm, fc4: Linear, x: jax.Array, train: bool) -> jax.Array:
    """The reference classifier Sequential: BN1d, Linear, BN1d, ELU, Linear."""
    return fc4(nn.elu(bn2(fc1(bn0(x, train)), train)))


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
    remat: str = "none"
    bn_group_size: int = 0
    bn_group_stats: str = "mean"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        """In training, `remat` trades compute for memory (jax.checkpoint, nothing saveable inside a region):
        'blocks' recomputes each granularity block (its two basic convs) and each head in the backward,
        saving only their inputs and outputs (the stage maps, the block maps the CAMs and max pools read,
        the pooled features); 'stages' also recomputes the backbone's stem and each of its stages, saving
        only the stage outputs (backbones that declare the 'remat' build option). Evaluation never remats.
        `bn_group_size` > 0: every BatchNorm normalises training batches in groups of that many images
        (`layers.BatchNorm`, ghost BatchNorm), keeping the running statistics `bn_group_stats` says.
        """
        pooled = [jnp.max(y, axis=(1, 2)) for _, y in self._blocks(self._stages(x, train), train)]
        prefixes = [f"classifier{k}" for k in range(1, len(BLOCKS) + 1)] + ["classifier_concat"]
        inputs = [*pooled, jnp.concatenate(pooled, axis=-1)]
        return tuple(self._head(prefix, p, train) for prefix, p in zip(prefixes, inputs, strict=True))

    def _remat(self, train: bool) -> str:
        """`remat` in training; evaluation never remats."""
        return self.remat if train else "none"

    def _stages(self, x: jax.Array, train: bool, tiles: Sequence[int] = ()) -> tuple[jax.Array, ...]:
        """The backbone's stage maps; `tiles` (PMG-V2's training) is each stage's tiling, 0 for none."""
        arch = backbones.resolve(self.backbone, self.width, self.stage_sizes)
        return arch.build(
            self.dtype,
            name=BACKBONE,
            remat=self._remat(train) == "stages",
            bn_group_size=self.bn_group_size,
            bn_group_stats=self.bn_group_stats,
            drop_path_rate=self.drop_path_rate,
            **({"tiles": tuple(tiles)} if any(tiles) else {}),
        )(x, train)

    def _blocks(
        self, stages: Sequence[jax.Array], train: bool, bias: bool = False
    ) -> list[tuple[jax.Array, jax.Array]]:
        """(stage map, block map) of each granularity block on the last stages, both exposed for CAM
        (`bias`: the convs carry one, PMG-V2's)."""
        block = checkpointed(granularity_block, 3) if self._remat(train) != "none" else granularity_block
        conv = functools.partial(
            BasicConv, dtype=self.dtype, bn_group_size=self.bn_group_size, bn_group_stats=self.bn_group_stats, bias=bias
        )
        maps = []
        for k, (stage_name, feat) in enumerate(zip(STAGES, stages[-len(BLOCKS) :]), start=1):
            feat = self._expose(stage_name, feat)
            y = block(
                conv(self.feature_size, 1, 0, name=f"conv_block{k}_0"),
                conv(2 * self.feature_size, 3, 1, name=f"conv_block{k}_1"),
                feat,
                train,
            )
            maps.append((feat, self._expose(BLOCKS[k - 1], y)))
        return maps

    def _head(self, prefix: str, x: jax.Array, train: bool, classifier: Callable = _classifier) -> jax.Array:
        """One head's classifier (BN1d, Linear, BN1d, activation, Linear: `classifier`) on pooled features,
        its logits in float32 (bf16 -> f32 for the loss)."""
        if self._remat(train) != "none":
            classifier = checkpointed(classifier, 5)
        groups = {"group_size": self.bn_group_size, "group_stats": self.bn_group_stats}
        out = classifier(
            BatchNorm(momentum=0.1, dtype=self.dtype, name=f"{prefix}_0", **groups),
            Linear(self.feature_size, dtype=self.dtype, name=f"{prefix}_1"),
            BatchNorm(momentum=0.1, dtype=self.dtype, name=f"{prefix}_2", **groups),
            Linear(self.num_classes, dtype=self.dtype, name=f"{prefix}_4"),
            x,
            train,
        )
        return out.astype(jnp.promote_types(out.dtype, jnp.float32))

    def _expose(self, name: str, y: jax.Array) -> jax.Array:
        """Perturbation point (gradient of the map) and sown activation, for CAM."""
        y = self.perturb(name, y)
        self.sow("intermediates", name, y)
        return y
