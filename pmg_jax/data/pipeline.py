"""Grain input pipelines: deterministic, resumable at any step, sharded per host.

Every example's place in the run is a *global position*: epoch e, batch b, slot j
(e * steps_per_epoch + b) * global_batch + j. Each position maps to a source index
through a per-epoch permutation seeded by (seed, e), and its augmentation draws from
numpy's Generator seeded by (seed, position). So the batches depend only on the
seed and the step, not on worker counts, hosts or restarts: the data-iterator state
is the step number, and resuming at step k yields exactly batch k.

Records are decoded in the workers. An unreadable image in training is replaced by
the next readable record in source order (so batches stay full and still depend
only on seed and step); in evaluation it is masked out. The main process reports
each such file once, with its path, and keeps the count (`Batches.unreadable`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterator, Protocol, Sequence

import grain
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pmg_jax.data import decode, transforms

log = logging.getLogger(__name__)

# Per-example marks from the workers, stripped in the main process by `Batches`.
_INDEX, _SKIPPED = "_source_index", "_skipped"


class Source(Protocol):
    """Random-access records: dicts with 'image' (a path, encoded bytes or an RGB array), 'label', maybe a box."""

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
    resize_backend: str = "opencv"
    normalize_on_device: bool = False

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> TransformSpec:
        """The spec a config's `data` section describes."""
        return cls(data.resize_size, data.crop_size, data.pad, data.hflip, tuple(data.mean), tuple(data.std),
                   data.resize_backend, data.normalize_on_device)

    def finish(self, crop: np.ndarray) -> np.ndarray:
        """A batch's image from a uint8 crop: normalised float32, or the crop itself when the device normalises."""
        return crop if self.normalize_on_device else transforms.normalize(crop, self.mean, self.std)


def normalize_on_device(images: jax.Array, spec: TransformSpec) -> jax.Array:
    """Model input from a batch's images (call inside the jitted step): uint8 crops are normalised, floats pass."""
    if images.dtype != jnp.uint8:
        return images
    mean, std = jnp.asarray(spec.mean, jnp.float32), jnp.asarray(spec.std, jnp.float32)
    return (images.astype(jnp.float32) * (1.0 / 255.0) - mean) / std


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


def first_readable(source: Source, index: int) -> tuple[dict, int]:
    """(decoded example, skipped): example `index`, or the next readable one in source order if it is unreadable.

    The substitute depends only on the data, so batches stay full and deterministic.
    """
    n = len(source)
    for skipped in range(n):
        try:
            return decode.load_example(source[(index + skipped) % n]), skipped
        except decode.UnreadableImage:
            continue
    raise decode.UnreadableImage(f"none of the {n} images of the source can be decoded")


class _TrainExample:
    """Global position -> transformed example (picklable for Grain worker processes)."""

    def __init__(self, source: Source, spec: TransformSpec, seed: int, examples_per_epoch: int):
        self.source, self.spec, self.seed, self.per_epoch = source, spec, seed, examples_per_epoch

    def __call__(self, position: int) -> dict:
        epoch, k = divmod(int(position), self.per_epoch)
        index = int(_epoch_permutation(self.seed, epoch, len(self.source))[k])
        example, skipped = first_readable(self.source, index)
        s = self.spec
        params = transforms.sample_crop(np.random.default_rng([self.seed, int(position)]), resize_size=s.resize_size,
                                        crop_size=s.crop_size, pad=s.pad, hflip=s.hflip)
        crop = transforms.train_crop(example["image"], params, resize_size=s.resize_size, crop_size=s.crop_size,
                                     pad=s.pad, backend=s.resize_backend)
        return {"image": s.finish(crop), "label": np.int32(example["label"]),
                _INDEX: np.int32(index), _SKIPPED: np.int32(skipped)}


class _EvalExample:
    """Position -> transformed example; past the end (padding) or unreadable, a zero example with mask 0."""

    def __init__(self, source: Source, spec: TransformSpec, with_box: bool):
        self.source, self.spec, self.with_box = source, spec, with_box

    def _masked(self, index: int, skipped: int) -> dict:
        s = self.spec
        out = {"image": s.finish(np.zeros((s.crop_size, s.crop_size, 3), np.uint8)), "label": np.int32(0),
               "mask": np.float32(0), _INDEX: np.int32(index), _SKIPPED: np.int32(skipped)}
        if self.with_box:
            out["box"] = np.zeros(4, np.float32)
        return out

    def __call__(self, position: int) -> dict:
        position = int(position)
        if position >= len(self.source):
            return self._masked(position, 0)
        try:
            example = decode.load_example(self.source[position])
        except decode.UnreadableImage:
            return self._masked(position, 1)
        s = self.spec
        crop = transforms.eval_crop(example["image"], resize_size=s.resize_size, crop_size=s.crop_size,
                                    backend=s.resize_backend)
        out = {"image": s.finish(crop), "label": np.int32(example["label"]), "mask": np.float32(1),
               _INDEX: np.int32(position), _SKIPPED: np.int32(0)}
        if self.with_box:
            box = example["box"]
            out["box"] = (np.zeros(4, np.float32) if box is None else transforms.eval_box(
                box, example["image"].shape, resize_size=s.resize_size, crop_size=s.crop_size))
        return out


class UnreadableLog:
    """Main-process side of skipping: reports each unreadable image once, with its path, and counts them."""

    def __init__(self, source: Source):
        self.source = source
        self.indices: set[int] = set()

    def note(self, index: int, count: int) -> None:
        """Record that `count` images from source `index` on (wrapping) were skipped."""
        for i in ((index + j) % len(self.source) for j in range(count)):
            if i in self.indices:
                continue
            self.indices.add(i)
            record = self.source[i]
            try:
                decode.load_example(record)
                reason = f"{decode.record_name(record)}: unreadable in an input worker, readable now"
            except decode.UnreadableImage as e:
                reason = str(e)
            log.warning("skipping unreadable image %s (%d skipped so far)", reason, len(self.indices))


class Batches:
    """Iterator over host batches that reports unreadable images as they are skipped.

    The workers mark each example with its source index and the number of images
    skipped to fill it; this strips those marks and feeds them to `unreadable`.
    """

    def __init__(self, batches: Iterator[dict], source: Source):
        self._batches = batches
        self.unreadable = UnreadableLog(source)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._batches)
        except StopIteration:
            if self.unreadable.indices:
                log.warning("%d unreadable images were skipped", len(self.unreadable.indices))
            raise
        indices, skipped = batch.pop(_INDEX), batch.pop(_SKIPPED)
        for i in np.flatnonzero(skipped):
            self.unreadable.note(int(indices[i]), int(skipped[i]))
        return batch


def _iterate(ds: grain.MapDataset, workers: int, prefetch: int) -> Iterator[dict]:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=prefetch))
    if workers:
        if not flags.FLAGS.is_parsed():
            # Grain's worker start reads an absl flag, which fails outside absl.app (google/grain#1355).
            flags.FLAGS.mark_as_parsed()
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
) -> tuple[int, Batches]:
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
    return steps_per_epoch, Batches(_iterate(ds[start_step:], workers, prefetch), source)


def eval_batches(
    source: Source,
    spec: TransformSpec,
    layout: Layout,
    *,
    workers: int = 0,
    prefetch: int = 2,
    with_box: bool = False,
) -> tuple[int, Batches]:
    """(num_batches, iterator) over every example exactly once; the last batch is padded, 'mask' marks real ones."""
    num_batches = -(-len(source) // layout.global_batch)
    local = layout.local_batch
    fn = _EvalExample(source, spec, with_box)
    ds = (
        grain.MapDataset.range(num_batches * local)
        .map(lambda i: fn(layout.global_position(i // local, i % local)))
        .batch(local, drop_remainder=True)
    )
    return num_batches, Batches(_iterate(ds, workers, prefetch), source)


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

