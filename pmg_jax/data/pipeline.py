"""Grain input pipelines: deterministic, resumable at any step, sharded per host.

Every example's place in the run is a *global position*: epoch e, batch b, slot j
(e * steps_per_epoch + b) * global_batch + j. Each position maps to a source index
through a per-epoch permutation seeded by (seed, e), and its augmentation draws from
numpy's Generator seeded by (seed, position). So the batches depend only on the
seed and the step, not on worker counts, hosts or restarts: the data-iterator state
is the step number, and resuming at step k yields exactly batch k.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Protocol, Sequence

import grain
import jax
import numpy as np

from pmg_jax.data import transforms


class Source(Protocol):
    """Random-access examples: dicts with 'image' (RGB uint8 HxWx3, encoded bytes or a path) and 'label'."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """Sizes and normalisation of the reference transforms."""

    resize_size: int
    crop_size: int
    pad: int = 8
    hflip: bool = True
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the global batch splits over hosts: this process loads slots [offset, offset + size)."""

    global_batch: int
    process_index: int = 0
    process_count: int = 1

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def global_position(self, batch: int, slot: int) -> int:
        return batch * self.global_batch + self.process_index * self.local_batch + slot


def host_layout(global_batch: int) -> Layout:
    """This process's share of a global batch."""
    return Layout(global_batch, jax.process_index(), jax.process_count())


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def _image_of(example: dict) -> np.ndarray:
    """RGB uint8 HxWx3 from an in-memory array (sources that decode themselves)."""
    image = example["image"]
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"source returned an image that is not RGB HxWx3: {getattr(image, 'shape', type(image))}")
    return image


class _TrainExample:
    """Global position -> transformed example (picklable for Grain worker processes)."""

    def __init__(self, source: Source, spec: TransformSpec, seed: int, examples_per_epoch: int):
        self.source, self.spec, self.seed, self.per_epoch = source, spec, seed, examples_per_epoch

    def __call__(self, position: int) -> dict:
        epoch, k = divmod(int(position), self.per_epoch)
        index = int(_epoch_permutation(self.seed, epoch, len(self.source))[k])
        example = self.source[index]
        rng = np.random.default_rng([self.seed, int(position)])
        s = self.spec
        image, _ = transforms.train_transform(
            _image_of(example), rng, resize_size=s.resize_size, crop_size=s.crop_size, pad=s.pad,
            mean=s.mean, std=s.std, hflip=s.hflip,
        )
        return {"image": image, "label": np.int32(example["label"])}


class _EvalExample:
    """Position -> transformed example, or a masked zero example past the end (padding)."""

    def __init__(self, source: Source, spec: TransformSpec, with_box: bool):
        self.source, self.spec, self.with_box = source, spec, with_box

    def __call__(self, position: int) -> dict:
        s = self.spec
        if position >= len(self.source):
            out = {"image": np.zeros((s.crop_size, s.crop_size, 3), np.float32), "label": np.int32(0),
                   "mask": np.float32(0)}
            if self.with_box:
                out["box"] = np.zeros(4, np.float32)
            return out
        example = self.source[int(position)]
        box = example.get("box") if self.with_box else None
        image, box = transforms.eval_transform(
            _image_of(example), resize_size=s.resize_size, crop_size=s.crop_size, mean=s.mean, std=s.std, box=box
        )
        out = {"image": image, "label": np.int32(example["label"]), "mask": np.float32(1)}
        if self.with_box:
            out["box"] = box if box is not None else np.zeros(4, np.float32)
        return out


def _iterate(ds: grain.MapDataset, workers: int, prefetch: int) -> Iterator[dict]:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=prefetch))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    return iter(it)


def train_batches(
    source: Source,
    spec: TransformSpec,
    layout: Layout,
    *,
    seed: int,
    num_epochs: int,
    start_step: int = 0,
    workers: int = 0,
    prefetch: int = 2,
) -> tuple[int, Iterator[dict]]:
    """(steps_per_epoch, iterator of this host's batches from `start_step` to the end of training).

    Each epoch is a fresh permutation of the source; its last incomplete batch is
    dropped, as in the reference.
    """
    steps_per_epoch = len(source) // layout.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(source)} examples, fewer than one batch of {layout.global_batch}")
    examples_per_epoch = steps_per_epoch * layout.global_batch
    total_steps = steps_per_epoch * num_epochs
    local = layout.local_batch
    fn = _TrainExample(source, spec, seed, examples_per_epoch)
    ds = (
        grain.MapDataset.range(total_steps * local)
        .map(lambda i: fn(layout.global_position(i // local, i % local)))
        .batch(local, drop_remainder=True)
    )
    return steps_per_epoch, _iterate(ds[start_step:], workers, prefetch)


def eval_batches(
    source: Source,
    spec: TransformSpec,
    layout: Layout,
    *,
    workers: int = 0,
    prefetch: int = 2,
    with_box: bool = False,
) -> tuple[int, Iterator[dict]]:
    """(num_batches, iterator) over every example exactly once; the last batch is padded, 'mask' marks real ones."""
    num_batches = -(-len(source) // layout.global_batch)
    local = layout.local_batch
    fn = _EvalExample(source, spec, with_box)
    ds = (
        grain.MapDataset.range(num_batches * local)
        .map(lambda i: fn(layout.global_position(i // local, i % local)))
        .batch(local, drop_remainder=True)
    )
    return num_batches, _iterate(ds, workers, prefetch)


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assemble each host's share into global arrays sharded over the mesh's 'data' axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_device(
    batches: Iterator[dict], sharding: jax.sharding.Sharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Keep `size` batches in flight to the devices while the current step runs."""
    queue: list[dict[str, jax.Array]] = []
    for batch in batches:
        queue.append(to_global(batch, sharding))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue

