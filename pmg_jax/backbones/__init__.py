"""Backbones PMG can sit on: a registry of Flax modules that return their stage maps, and what each declares.

PMG puts its granularity blocks on the last three stages. Register your own with
`register(Backbone(...))` before building a model (`registry.Backbone` says what to declare);
nothing else in pmg_jax names a backbone's modules.
"""

from pmg_jax.backbones import convnext, resnet
from pmg_jax.backbones.registry import REGISTRY, Arch, Backbone, UnsupportedWeights, get, register, resolve

__all__ = ["REGISTRY", "Arch", "Backbone", "UnsupportedWeights", "get", "register", "resolve"]

for _backbone in (*resnet.BACKBONES, *convnext.BACKBONES):
    register(_backbone)
