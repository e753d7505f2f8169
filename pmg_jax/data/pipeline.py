"""Grain input pipelines: deterministic, resumable at any step, sharded per host.

Every example's place in the run is a *global position*: epoch e, batch b, slot j
(e * steps_per_epoch + b) * global_batch + j. Each position maps to a source index
through a per-epoch permutation seeded by (seed, e), and its augmentation is a hash
of (seed, position) (`transforms.position_crop`). So the batches depend only on the
seed and the step, not on worker counts, hosts or restarts: the data-iterator state
is the step number, and resuming at step k yields exactly batch k.

Records are decoded in the workers. An unreadable image (corrupt, or over the pixel cap
`TransformSpec.max_pixels`, checked from its header) in training is replaced by
the next readable record in source order (so batches stay full and still depend
only on seed and step); in evaluation it is masked out. The main process reports
each such file once, with its path, and keeps the count (`Batches.unreadable`).

Worker processes write each batch's images into a `slots.SlotRing` in shared memory
that lives as long as the iterator; the main process copies them out (see slots.py
for why Grain's per-batch shared memory was not kept).

With a `positives.Pairing` (PMG-V2), each training example also brings another image of its class, chosen
and cropped from (seed, position) too, in 'positive' (shaped as 'image'); a ring slot then holds both halves.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import cv2
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from pmg_jax.data import decode, positives, slots, transforms

log = logging.getLogger(__name__)

# Per-example marks from the workers, stripped in the main process by `Batches`: the permuted source index, the
# unreadable images passed over to fill the slot, and for a positive its first candidate and those passed over.
_INDEX, _SKIPPED = "_source_index", "_skipped"
_PAIR_FIRST, _PAIR_SKIPPED = "_pair_first", "_pair_skipped"
# In place of the images, when a worker process wrote them into a SlotRing: the step they belong to.
_STEP = "_step"


class Source(Protocol):
    """Random-access records: dicts with 'image' (a path, encoded bytes or an RGB array), 'label', maybe a box.

    A source whose records carry part points (P, 3) also has `part_names` (P names).
    """

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
    resize_backend: str = "auto"
    normalize_on_device: bool = False
    max_pixels: int = decode.DEFAULT_MAX_PIXELS  # larger images are unreadable (checked from their header)

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> TransformSpec:
        """The spec a config's `data` section describes."""
        return cls(
            data.resize_size,
            data.crop_size,
            data.pad,
            data.hflip,
            tuple(data.mean),
            tuple(data.std),
            data.resize_backend,
            data.normalize_on_device,
            data.max_image_pixels,
        )


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


def part_names(source: Source) -> tuple[str, ...]:
    """The names of the parts a source's records carry; none for a source without part annotations."""
    return tuple(getattr(source, "part_names", ()))


def first_readable(source: Source, index: int, max_pixels: int = decode.DEFAULT_MAX_PIXELS) -> tuple[dict, int]:
    """(decoded example, skipped): example `index`, or the next readable one in source order if it is unreadable
    (or has more than `max_pixels` pixels).

    The substitute depends only on the data, so batches stay full and deterministic.
    """
    n = len(source)
    for skipped in range(n):
        try:
            return decode.load_example(source[(index + skipped) % n], max_pixels), skipped
        except decode.UnreadableImage:
            continue
    raise decode.UnreadableImage(f"none of the {n} images of the source can be decoded")


_scratch = threading.local()  # per-thread reusable buffers (Grain's in-process reading runs two threads)


def _buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """This thread's uint8 buffer `name` of `shape`, allocated once and reused for every image."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.shape != shape:
        buf = np.empty(shape, np.uint8)
        setattr(_scratch, name, buf)
    return buf


def image_shape(spec: TransformSpec, layout: Layout, pairs: bool = False) -> tuple[int, ...]:
    """Shape of a host batch's images; with `pairs`, (2, ...): the examples, then their positives."""
    shape = (layout.local_batch, spec.crop_size, spec.crop_size, 3)
    return (2, *shape) if pairs else shape


def image_dtype(spec: TransformSpec) -> type:
    """uint8 crops when the device normalises, else normalised float32."""
    return np.uint8 if spec.normalize_on_device else np.float32


class _BatchMaker:
    """Writes each transformed image straight into its slot of the batch array.

    In Grain worker processes that array is a slot of a `SlotRing` in shared memory,
    and the batch handed through Grain carries the step number in its place.
    """

    pairs = False  # whether each example brings a positive (the images array is then (2, B, ...))

    def __init__(self, source: Source, spec: TransformSpec, layout: Layout, ring: slots.SlotRing | None):
        self.source, self.spec, self.layout, self.ring = source, spec, layout, ring

    def _new_images(self, step: int) -> np.ndarray:
        if self.ring is not None:
            return self.ring.slot_for(step)
        return np.empty(image_shape(self.spec, self.layout, self.pairs), image_dtype(self.spec))

    def _pack(self, step: int, images: np.ndarray, batch: dict) -> dict:
        if self.ring is not None:
            return {_STEP: np.int64(step), **batch}
        return {**split_images(images, self.pairs), **batch}

    def _crop_target(self, images: np.ndarray, slot: int) -> np.ndarray:
        """Where a uint8 crop goes: its slot, or a scratch buffer when the slot holds normalised floats."""
        if self.spec.normalize_on_device:
            return images[slot]
        return _buffer("crop", images.shape[1:])

    def _finish(self, images: np.ndarray, slot: int, crop: np.ndarray) -> None:
        if not self.spec.normalize_on_device:
            transforms.normalize(crop, self.spec.mean, self.spec.std, out=images[slot])

    def _resize_buffer(self) -> np.ndarray:
        return _buffer("resized", (self.spec.resize_size, self.spec.resize_size, 3))


def split_images(images: np.ndarray, pairs: bool) -> dict[str, np.ndarray]:
    """A batch's 'image' (and with `pairs`, 'positive') from the array the batch maker wrote."""
    return {"image": images[0], "positive": images[1]} if pairs else {"image": images}


class _TrainBatch(_BatchMaker):
    """Step -> this host's share of that step's batch (picklable for Grain worker processes)."""

    def __init__(
        self,
        source: Source,
        spec: TransformSpec,
        layout: Layout,
        seed: int,
        examples_per_epoch: int,
        ring: slots.SlotRing | None = None,
        pairing: positives.Pairing | None = None,
    ):
        super().__init__(source, spec, layout, ring)
        self.seed, self.per_epoch, self.pairing = seed, examples_per_epoch, pairing
        self.pairs = pairing is not None

    def _crop(self, out: np.ndarray, slot: int, image: np.ndarray, position: int, stream: int) -> None:
        """The train transform of `image` at `position` (crop randomness from `stream`) into out[slot]."""
        s = self.spec
        params = transforms.position_crop(
            self.seed,
            position,
            resize_size=s.resize_size,
            crop_size=s.crop_size,
            pad=s.pad,
            hflip=s.hflip,
            stream=stream,
        )
        crop = transforms.train_crop(
            image,
            params,
            resize_size=s.resize_size,
            crop_size=s.crop_size,
            pad=s.pad,
            backend=s.resize_backend,
            out=self._crop_target(out, slot),
            scratch=self._resize_buffer(),
        )
        self._finish(out, slot, crop)

    def __call__(self, step: int) -> dict:
        s, n = self.spec, self.layout.local_batch
        step = int(step)
        images = self._new_images(step)
        anchors = images[0] if self.pairs else images
        labels, indices, skips, firsts, pair_skips = (np.zeros(n, np.int32) for _ in range(5))
        for slot in range(n):
            position = self.layout.global_position(step, slot)
            epoch, k = divmod(position, self.per_epoch)
            indices[slot] = int(_epoch_permutation(self.seed, epoch, len(self.source))[k])
            example, skips[slot] = first_readable(self.source, int(indices[slot]), s.max_pixels)
            labels[slot] = example["label"]
            self._crop(anchors, slot, example["image"], position, transforms.CROP_STREAM)
            if self.pairs:
                index = (int(indices[slot]) + int(skips[slot])) % len(self.source)  # the example actually used
                firsts[slot] = self.pairing.first(index, self.seed, position)
                positive, pair_skips[slot] = self.pairing.pick(self.source, index, int(firsts[slot]), s.max_pixels)
                image = example["image"] if positive is None else positive["image"]  # none readable: itself
                self._crop(images[1], slot, image, position, transforms.POSITIVE_CROP_STREAM)
        marks = {_INDEX: indices, _SKIPPED: skips}
        if self.pairs:
            marks.update({_PAIR_FIRST: firsts, _PAIR_SKIPPED: pair_skips})
        return self._pack(step, images, {"label": labels, **marks})


class _EvalBatch(_BatchMaker):
    """Batch number -> this host's share of it; past the end (padding) or unreadable, a zero image with mask 0."""

    def __init__(
        self,
        source: Source,
        spec: TransformSpec,
        layout: Layout,
        with_box: bool,
        ring: slots.SlotRing | None = None,
        with_parts: bool = False,
    ):
        super().__init__(source, spec, layout, ring)
        self.with_box = with_box
        self.num_parts = len(part_names(source)) if with_parts else 0

    def __call__(self, batch: int) -> dict:
        s, n = self.spec, self.layout.local_batch
        batch = int(batch)
        images = self._new_images(batch)
        labels, indices, skips = (np.zeros(n, np.int32) for _ in range(3))
        mask, boxes = np.zeros(n, np.float32), np.zeros((n, 4), np.float32)
        parts = np.zeros((n, self.num_parts, 3), np.float32)  # invisible unless an example has them
        for slot in range(n):
            position = indices[slot] = self.layout.global_position(batch, slot)
            example = None
            if position < len(self.source):
                try:
                    example = decode.load_example(self.source[position], s.max_pixels)
                except decode.UnreadableImage:
                    skips[slot] = 1
            if example is None:
                blank = self._crop_target(images, slot)
                blank[...] = 0
                self._finish(images, slot, blank)
                continue
            crop = transforms.eval_crop(
                example["image"],
                resize_size=s.resize_size,
                crop_size=s.crop_size,
                backend=s.resize_backend,
                out=self._crop_target(images, slot),
                scratch=self._resize_buffer(),
            )
            self._finish(images, slot, crop)
            labels[slot], mask[slot] = example["label"], 1.0
            if self.with_box and example["box"] is not None:
                boxes[slot] = transforms.eval_box(
                    example["box"], example["image"].shape, resize_size=s.resize_size, crop_size=s.crop_size
                )
            if self.num_parts and example["parts"] is not None:
                parts[slot] = transforms.eval_parts(
                    example["parts"], example["image"].shape, resize_size=s.resize_size, crop_size=s.crop_size
                )
        out = {"label": labels, "mask": mask, _INDEX: indices, _SKIPPED: skips}
        if self.with_box:
            out["box"] = boxes
        if self.num_parts:
            out["parts"] = parts
        return self._pack(batch, images, out)


class UnreadableLog:
    """Main-process side of skipping: reports each unreadable image once, with its path, and counts them."""

    def __init__(self, source: Source, max_pixels: int = decode.DEFAULT_MAX_PIXELS):
        self.source, self.max_pixels = source, max_pixels
        self.indices: set[int] = set()

    def note(self, index: int, count: int) -> None:
        """Record that `count` images from source `index` on (wrapping) were skipped."""
        self.note_each((index + j) % len(self.source) for j in range(count))

    def note_each(self, indices: Iterable[int]) -> None:
        """Record that the images at source `indices` were skipped."""
        for i in map(int, indices):
            if i in self.indices:
                continue
            self.indices.add(i)
            record = self.source[i]
            try:
                decode.load_example(record, self.max_pixels)
                reason = f"{decode.record_name(record)}: unreadable in an input worker, readable now"
            except decode.UnreadableImage as e:
                reason = str(e)
            log.warning("skipping unreadable image %s (%d skipped so far)", reason, len(self.indices))


class Batches:
    """Iterator over host batches that reports unreadable images as they are skipped.

    The workers mark each example with its source index and the number of images
    skipped to fill it (and its positive's, with `pairing`); this strips those marks and
    feeds them to `unreadable`. When worker processes wrote the images into `ring`, this
    copies them out.
    """

    def __init__(
        self,
        batches: Iterator[dict],
        source: Source,
        ring: slots.SlotRing | None = None,
        max_pixels: int = decode.DEFAULT_MAX_PIXELS,
        pairing: positives.Pairing | None = None,
    ):
        self._batches, self._ring, self._pairing = batches, ring, pairing
        self._host = None if ring is None else slots.HostBuffers(ring.shape, ring.dtype)
        self.unreadable = UnreadableLog(source, max_pixels)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._batches)
        except StopIteration:
            if self.unreadable.indices:
                log.warning("%d unreadable images were skipped", len(self.unreadable.indices))
            raise
        if _STEP in batch:
            images = self._ring.take(int(batch.pop(_STEP)), self._host.get())
            batch = {**split_images(images, self._pairing is not None), **batch}
        indices, skipped = batch.pop(_INDEX), batch.pop(_SKIPPED)
        for i in np.flatnonzero(skipped):
            self.unreadable.note(int(indices[i]), int(skipped[i]))
        if self._pairing is not None:
            self._note_positives(indices, skipped, batch.pop(_PAIR_FIRST), batch.pop(_PAIR_SKIPPED))
        return batch

    def _note_positives(self, indices: np.ndarray, skipped: np.ndarray, firsts: np.ndarray, passed: np.ndarray) -> None:
        """Report the candidate positives passed over as unreadable (the first `passed` of each one's candidates)."""
        n = len(self.unreadable.source)
        for i in np.flatnonzero(passed):
            index = (int(indices[i]) + int(skipped[i])) % n
            self.unreadable.note_each(self._pairing.candidates(index, int(firsts[i]))[: passed[i]])

    def close(self) -> None:
        """Stop the workers and free the shared memory (also done when the iterator is garbage collected)."""
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()  # first: a worker waiting for a slot would hold up Grain's shutdown
        close = getattr(getattr(self, "_batches", None), "close", None)
        if close is not None:
            close()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _opencv_threads(workers: int) -> int:
    """OpenCV threads for each of `workers` input processes: the cores shared out, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _init_worker(opencv_threads: int, main_pid: int, worker_index: int, worker_count: int) -> None:
    """In each input worker: its share of OpenCV's threads, and exit once the main process is gone.

    Grain's workers outlive a main process that is killed (kill -9, OOM): they block on a
    full queue forever. A thread here notices that the worker's parent is no longer the
    main process (even if that happened while the worker was starting) and ends it, so
    the resource tracker can then remove the shared memory.
    """
    cv2.setNumThreads(opencv_threads)

    def watch() -> None:
        while os.getppid() == main_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pmg-watch-parent", daemon=True).start()


def ring_slots(workers: int, prefetch: int) -> int:
    """Ring slots: one for the batch each worker makes, one it has ready, and `prefetch` more.

    Progress never depends on the count (steps are consumed in order); fewer slots only
    let workers run less far ahead: with workers + prefetch slots the bench ran ~2% slower.
    """
    return 2 * workers + prefetch


def shared_memory_bytes(spec: TransformSpec, layout: Layout, workers: int, prefetch: int, pairs: bool = False) -> int:
    """/dev/shm that an iterator with `workers` worker processes takes (none without workers); `pairs`: with
    positives, twice the images."""
    if not workers:
        return 0
    return slots.ring_bytes(ring_slots(workers, prefetch), image_shape(spec, layout, pairs), image_dtype(spec))


def _iterate(
    make: Callable[[slots.SlotRing | None], _BatchMaker],
    source: Source,
    spec: TransformSpec,
    layout: Layout,
    count: int,
    start: int,
    workers: int,
    prefetch: int,
    pairing: positives.Pairing | None = None,
) -> Batches:
    """Batches start..count-1 of make(ring), read in-process (two threads) or by `workers` processes."""
    ring, pairs = None, pairing is not None
    if workers:
        ring = slots.SlotRing(ring_slots(workers, prefetch), image_shape(spec, layout, pairs), image_dtype(spec), start)
    ds = grain.MapDataset.range(count).map(make(ring))[start:]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=prefetch))
    if workers:
        # The images travel in `ring`; what Grain carries is a few bytes, cheaper pickled than in new shared memory.
        it = grain.experimental.WithOptionsIterDataset(it, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
        if not flags.FLAGS.is_parsed():
            # Grain's worker start reads an absl flag, which fails outside absl.app (google/grain#1355).
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch),
            worker_init_fn=functools.partial(_init_worker, _opencv_threads(workers), os.getpid()),
        )
    return Batches(iter(it), source, ring, spec.max_pixels, pairing)


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
    pairing: positives.Pairing | None = None,
) -> tuple[int, Batches]:
    """(steps_per_epoch, iterator of this host's batches from `start_step` to the end of training).

    Each epoch is a fresh permutation of the source; its last incomplete batch is
    dropped, as in the reference. With `pairing` (`positives.Pairing.of(source)`), each
    batch also has 'positive': every example's positive, augmented independently.
    """
    steps_per_epoch = len(source) // layout.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(source)} examples, fewer than one batch of {layout.global_batch}")
    examples_per_epoch = steps_per_epoch * layout.global_batch

    def make(ring: slots.SlotRing | None) -> _TrainBatch:
        return _TrainBatch(source, spec, layout, seed, examples_per_epoch, ring, pairing)

    return steps_per_epoch, _iterate(
        make, source, spec, layout, steps_per_epoch * num_epochs, start_step, workers, prefetch, pairing
    )


def eval_batches(
    source: Source,
    spec: TransformSpec,
    layout: Layout,
    *,
    workers: int = 0,
    prefetch: int = 2,
    with_box: bool = False,
    with_parts: bool = False,
) -> tuple[int, Batches]:
    """(num_batches, iterator) over every example exactly once; the last batch is padded, 'mask' marks real ones.

    with_parts adds 'parts' (B, P, 3) [x, y, visible] in crop pixels when the source has part names;
    a source without them gives batches without 'parts'.
    """
    num_batches = -(-len(source) // layout.global_batch)

    def make(ring: slots.SlotRing | None) -> _EvalBatch:
        return _EvalBatch(source, spec, layout, with_box, ring, with_parts)

    return num_batches, _iterate(make, source, spec, layout, num_batches, 0, workers, prefetch)


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
