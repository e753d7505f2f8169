"""The backbone registry: each entry builds a Flax module that returns its stage maps and declares what the
rest of pmg_jax needs to know (stages, channels, which stage each parameter belongs to, how its PyTorch
state dicts are recognised)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn

from pmg_jax.errors import PMGError


class UnsupportedWeights(PMGError, ValueError):
    """A state dict of a backbone's family in a form it cannot build (e.g. timm's resnet50c); one line."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registered backbone.

    build(width=, stage_sizes=, dtype=, name=) returns a module whose `__call__(x, train)` gives one
    NHWC map per stage. `channels(width, stage_sizes)` are their channel counts; `stage_of(path)` is
    the 1-based stage of a parameter path inside the backbone (0 for the stem), which says what
    feeds each head; `infer(shapes)` reads a PyTorch state dict's {name: shape} (names without
    a `features.` prefix) and returns {'width', 'stage_sizes'} when it holds this backbone, else
    None; `torch_ignore` are name prefixes of such state dicts PMG does not use (its classifier).
    `options` are the keywords of OPTIONS that build also takes (a backbone without them builds
    only with their defaults): remat=True recomputes its stem and each stage in the backward,
    saving only the stage outputs, with parameter names unchanged; bn_group_size / bn_group_stats
    are those of its BatchNorms (`layers.BatchNorm` group_size / group_stats).
    drop_path_rate is its stochastic depth (the rate of the last block; train-mode calls then draw
    from the 'dropout' rng). tiles=(n1, n2, ...) runs stage s on the n_s x n_s tiles of its input stacked
    along the batch and stitches its output tiles back (`layers.split_tiles` / `stitch_tiles`; 0: untiled),
    in training only. `input_strides` are the input pixels per pixel of each stage's input (what `tiling_error`
    checks tilings against).
    """

    name: str
    build: Callable[..., nn.Module]
    width: int
    stage_sizes: tuple[int, ...]
    channels: Callable[[int, tuple[int, ...]], tuple[int, ...]]
    stage_of: Callable[[tuple[str, ...]], int]
    infer: Callable[[Mapping[str, tuple[int, ...]]], dict | None] | None = None
    torch_ignore: tuple[str, ...] = ()
    stride: int = 32  # input pixels per pixel of the last stage: the input side must be a multiple
    options: tuple[str, ...] = ()
    input_strides: tuple[int, ...] = (4, 4, 8, 16)

    @property
    def num_stages(self) -> int:
        return len(self.stage_sizes)

    def tiling_error(self, image_size: int, tiles: tuple[int, ...]) -> str:
        """Why `tiles` cannot tile this backbone's stages at input side `image_size` ('' when they can): each
        tiled stage's input must cut into n x n equal tiles each of whose sides the stage's stride divides
        (so that the stitched output is the untiled one's size)."""
        if len(tiles) > self.num_stages:
            return f"{len(tiles)} tilings for the {self.num_stages} stages of {self.name}"
        ends = (*self.input_strides[1:], self.stride)
        for s, (n, into, out) in enumerate(zip(tiles, self.input_strides, ends, strict=False), start=1):
            side = image_size // into
            if n > 1 and (image_size % into or side % (n * (out // into))):
                return (
                    f"stage {s} of {self.name} gets a {side}-pixel input at image size {image_size}, which does "
                    f"not cut into {n} x {n} tiles of a side its stride {out // into} divides"
                )
        return ""

    def tiling_multiple(self, tilings: Iterable[tuple[int, ...]]) -> int:
        """The least input side every one of `tilings` can tile: sides that work are its multiples."""
        ends = (*self.input_strides[1:], self.stride)
        need = [n * out for tiles in tilings for n, out in zip(tiles, ends, strict=False) if n > 1]
        return math.lcm(self.stride, *need)


REGISTRY: dict[str, Backbone] = {}
OPTIONS = {
    "remat": False,
    "bn_group_size": 0,
    "bn_group_stats": "mean",
    "drop_path_rate": 0.0,
    "tiles": (),
}  # build options and their defaults


def register(backbone: Backbone) -> Backbone:
    """Add (or replace) a backbone under its name; returns it."""
    if backbone.num_stages < 3:
        raise ValueError(f"backbone {backbone.name}: PMG needs at least 3 stages, it declares {backbone.num_stages}")
    REGISTRY[backbone.name] = backbone
    return backbone


def get(name: str) -> Backbone:
    """The registered backbone `name`; ValueError naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class Arch:
    """A backbone with its widths and depths resolved (0 and () mean the backbone's standard ones)."""

    backbone: Backbone
    width: int
    stage_sizes: tuple[int, ...]

    @property
    def channels(self) -> tuple[int, ...]:
        return self.backbone.channels(self.width, self.stage_sizes)

    def build(self, dtype, name: str, **options) -> nn.Module:
        """The backbone's module; `options` (of OPTIONS) reach build where the backbone declares them and
        must be at their defaults where it does not (ValueError)."""
        declared = {k: v for k, v in options.items() if k in self.backbone.options}
        for key, value in options.items():
            if key not in declared and value != OPTIONS[key]:
                raise ValueError(f"backbone {self.backbone.name} does not take the build option {key}={value!r}")
        return self.backbone.build(width=self.width, stage_sizes=self.stage_sizes, dtype=dtype, name=name, **declared)


def resolve(name: str, width: int = 0, stage_sizes: tuple[int, ...] | None = ()) -> Arch:
    """The backbone `name` at `width` with `stage_sizes` (0 / empty: its standard values)."""
    b = get(name)
    return Arch(b, width or b.width, tuple(stage_sizes or b.stage_sizes))
