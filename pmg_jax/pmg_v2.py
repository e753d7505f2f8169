"""PMG-V2 (Du et al., T-PAMI 2021): a registered backbone whose stages may run on tiles of their input
(category-consistent block convolution, the backbone build option `tiles`), three granularity blocks on its
last three stages with a head each, and the consistency features of those stages.

Parameter names are PMG's (`features`, `conv_block1_0`, `classifier1_4`, ...), which are the official
PyTorch code's with `.k` written as `_k`; its BasicConvs carry a conv bias (`conv_block1_0/conv/bias`), and
there is no concat head. The CAM points (`block1..3`, `layer2..4`) are PMG's, so `pmg_jax.cam` reads it alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pmg_jax import model
from pmg_jax.layers import BatchNorm, Linear
from pmg_jax.model import PMG

HEADS = model.HEADS[: len(model.BLOCKS)]  # PMG's block heads, in this order (no concat); their sum is the prediction
CONSISTENCY_POOL = 7  # the consistency features' average pool (window and stride), the official code's
CONSISTENCY_EPS = 1e-9  # added to the max - min of the min-max normalisation


def consistency_feature(x: jax.Array) -> jax.Array:
    """(B, C) of NHWC `x`: a 7x7 average pool with stride 7 (no padding; a map under 7 pixels is pooled
    whole, where the official code fails), its global max, min-max normalised over the channels."""
    window = (min(CONSISTENCY_POOL, x.shape[1]), min(CONSISTENCY_POOL, x.shape[2]))
    pooled = nn.avg_pool(x.astype(jnp.promote_types(x.dtype, jnp.float32)), window, window, "VALID")
    f = jnp.max(pooled, axis=(1, 2))
    low, high = jnp.min(f, axis=-1, keepdims=True), jnp.max(f, axis=-1, keepdims=True)
    return (f - low) / (high - low + CONSISTENCY_EPS)


def _classifier(bn0: BatchNorm, fc1: Linear, bn2: BatchNorm, fc4: Linear, x: jax.Array, train: bool) -> jax.Array:
    """The official classifier Sequential: BN1d, Linear, BN1d, ReLU, Linear."""
    return fc4(nn.relu(bn2(fc1(bn0(x, train)), train)))


class PMGV2(PMG):
    """PMG-V2 over a registered backbone; returns (head1, head2, head3) logits, and with `consistency=True`
    also the consistency features of the three stage maps the blocks read: ((logits...), (f1, f2, f3)).

    It extends `pmg_jax.model.PMG` and overrides only the forward: its fields, CAM points, backbone (`_stages`),
    granularity blocks (`_blocks`, with a conv bias) and heads (`_head`, with a ReLU) are PMG's. `tiles`
    (training only; evaluation never tiles) is the tiling n of each backbone stage's input, 0 for none: the
    stage runs on its input's n x n tiles stacked along the batch and its output tiles are stitched back
    (`layers.split_tiles` / `stitch_tiles`).
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, tiles: Sequence[int] = (), consistency: bool = False
    ) -> tuple:
        stages = self._stages(x, train, tiles if train else ())
        logits, features = [], []
        for k, (feat, y) in enumerate(self._blocks(stages, train, bias=True), start=1):
            if consistency:  # training's only: inference (and export: jax2onnx cannot convert flax's avg_pool) skips it
                features.append(consistency_feature(feat))
            logits.append(self._head(f"classifier{k}", jnp.max(y, axis=(1, 2)), train, _classifier))
        return (tuple(logits), tuple(features)) if consistency else tuple(logits)
