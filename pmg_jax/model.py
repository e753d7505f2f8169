"""PMG: a ResNet trunk with three granularity blocks, three heads and a concat head.

Submodule names follow the reference PyTorch code (`features`, `conv_block1_0`,
`classifier1_4`, `classifier_concat_0`, ...), with `.k` written as `_k`.
Every block output passes through a `perturb` point and is `sow`n under
'intermediates' so Grad-CAM reads activations and their gradients from this very
module (see `pmg_jax.cam`); both are no-ops unless those collections are used.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from pmg_jax.layers import BatchNorm, Conv, Linear
from pmg_jax.resnet import ResNet

# Names of the maps exposed for CAM, in model order.
CAM_LAYERS = ("layer2", "layer3", "layer4", "block1", "block2", "block3")


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

    Works for any input side divisible by 32; block channels follow the backbone.
    Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16).
    """

    num_classes: int
    backbone: str = "resnet50"
    feature_size: int = 512
    width: int = 64
    stage_sizes: Sequence[int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        stages = ResNet(arch=self.backbone, width=self.width, stage_sizes=self.stage_sizes, dtype=self.dtype,
                        name="features")(x, train)
        pooled = []
        for k, feat in enumerate(stages[1:], start=1):
            feat = self._expose(f"layer{k + 1}", feat)
            y = BasicConv(self.feature_size, 1, 0, self.dtype, name=f"conv_block{k}_0")(feat, train)
            y = BasicConv(2 * self.feature_size, 3, 1, self.dtype, name=f"conv_block{k}_1")(y, train)
            y = self._expose(f"block{k}", y)
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
