"""Reused shared-memory slots that carry batch images from input worker processes to the main process.

Grain hands a worker's output to the main process in a new shared-memory block per
element, which the main process unlinks after use. Every batch therefore lands on
pages the kernel has to find and zero first, which on virtual machines is dear: a
16 x 448 x 448 x 3 batch took 5.7 ms to copy into a fresh block against 0.8 ms into
a used one (bench/RESULTS.md), a fifth of the time it takes to decode and crop. So the main process
makes `slots` image buffers once; the worker that produces step k writes its images
into slot k % slots as soon as the main process has copied step k - slots out, and
returns only small arrays and the step through Grain. The main process copies the
images out (the caller owns what it gets: device transfers may read it after the next
batch is requested) and hands the slot back.

Steps are consumed in order, so the lowest step not yet consumed never waits on a
later one: the scheme cannot deadlock, whatever the number of workers or slots.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading
import time
import weakref
from multiprocessing import shared_memory

import numpy as np

from pmg_jax.errors import PMGError

_HEADER = 8  # int64 words before the per-slot words: [closed, unused...]


class SharedMemoryTooSmall(PMGError, RuntimeError):
    """/dev/shm cannot hold the ring; the message says how much was asked and what to change."""


class PipelineClosed(RuntimeError):
    """The main process closed the pipeline while a worker waited for a slot."""


_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier from the standard library: release then acquire of one lock.

    Everything before the release happens before it, everything after the second
    acquire after that, and the two are ordered on the same lock.
    """
    _lock.acquire()
    _lock.release()
    _lock.acquire()
    _lock.release()


def _release(shm: shared_memory.SharedMemory, header: np.ndarray) -> None:
    header[0] = 1  # waiting workers give up
    try:
        shm.unlink()  # the pages go when the last mapping does
    except FileNotFoundError:
        pass


def _map(shm: shared_memory.SharedMemory) -> mmap.mmap:
    """This process's own mapping of `shm`, which lives as long as the arrays made from it.

    SharedMemory.close refuses while arrays view its buffer; closing it at once and
    mapping the block separately leaves the unmapping to the garbage collector.
    """
    mapping = mmap.mmap(shm._fd, shm.size)
    shm.close()
    return mapping


class HostBuffers:
    """Arrays for batches handed to the caller, each reused once nothing outside holds it any more.

    Copying a batch into new memory costs up to 5x a copy into used memory here, so
    the main process keeps `keep` arrays. One is reused only when its reference count
    shows no other holder: not the caller, a view of it, a memoryview or a device
    array aliasing it. Anything still in use is never written over.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type, keep: int = 4):
        self.shape, self.dtype, self.keep = shape, dtype, keep
        self._arrays: list[np.ndarray] = []

    def get(self) -> np.ndarray:
        for array in self._arrays:
            if sys.getrefcount(array) <= 3:  # the list, `array` and getrefcount's own argument
                return array
        array = np.empty(self.shape, self.dtype)
        if len(self._arrays) < self.keep:
            self._arrays.append(array)
        return array


def _too_small(size: int, detail: str) -> SharedMemoryTooSmall:
    return SharedMemoryTooSmall(
        f"/dev/shm cannot hold {detail} ({size / 2**20:.0f} MiB): give the machine or container more shared "
        f"memory (docker run --shm-size), or lower data.workers or the batch size"
    )


def ring_bytes(slots: int, shape: tuple[int, ...], dtype: np.dtype | type) -> int:
    """Shared memory that a SlotRing of `slots` arrays of `shape` and `dtype` takes."""
    return 8 * (_HEADER + slots) + slots * math.prod(shape) * np.dtype(dtype).itemsize


def check_room(size: int, what: str) -> None:
    """Raise SharedMemoryTooSmall now if /dev/shm has less than `size` bytes free (where there is a /dev/shm)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return
    if stat.f_bavail * stat.f_frsize < size:
        raise _too_small(size, f"{what}: {stat.f_bavail * stat.f_frsize / 2**20:.0f} MiB free")


class SlotRing:
    """`slots` arrays of `shape` and `dtype` in one shared-memory block, lent out by step number.

    Made in the main process (which owns and unlinks the block); pickled into the
    worker processes, which attach to it by name on first use.
    """

    def __init__(self, slots: int, shape: tuple[int, ...], dtype: np.dtype | type, first_step: int = 0):
        self.slots, self.shape, self.dtype = int(slots), tuple(int(d) for d in shape), np.dtype(dtype)
        self._slot_bytes = math.prod(self.shape) * self.dtype.itemsize
        size = ring_bytes(self.slots, self.shape, self.dtype)
        shm = shared_memory.SharedMemory(create=True, size=size)
        try:
            # Reserve every page now: tmpfs that runs out later raises SIGBUS on first touch instead.
            os.posix_fallocate(shm._fd, 0, size)
        except OSError as e:
            shm.close()
            shm.unlink()
            raise _too_small(size, f"the input pipeline's {self.slots} batch buffers, {e.strerror}") from None
        self.name = shm.name
        self._attach(_map(shm))
        # Slot k % slots may take step k once step k - slots is consumed; the first round is free.
        for step in range(first_step, first_step + self.slots):
            self._writable[step % self.slots] = step
        self._finalizer = weakref.finalize(self, _release, shm, self._header)

    def _attach(self, mapping: mmap.mmap) -> None:
        words = np.ndarray((_HEADER + self.slots,), np.int64, buffer=mapping)
        self._header, self._writable = words[:_HEADER], words[_HEADER:]
        offset = 8 * (_HEADER + self.slots)
        self._arrays = [
            np.ndarray(self.shape, self.dtype, buffer=mapping, offset=offset + i * self._slot_bytes)
            for i in range(self.slots)
        ]

    def __getstate__(self) -> dict:
        return {"slots": self.slots, "shape": self.shape, "dtype": self.dtype.str, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.slots, self.shape, self.dtype = state["slots"], tuple(state["shape"]), np.dtype(state["dtype"])
        self._slot_bytes = math.prod(self.shape) * self.dtype.itemsize
        self.name = state["name"]
        self._header = None
        self._finalizer = None

    def slot_for(self, step: int) -> np.ndarray:
        """(In a worker) the array to write step `step`'s images into, once the main process has freed it."""
        if self._header is None:
            self._attach(_map(shared_memory.SharedMemory(self.name)))
        i, delay = step % self.slots, 0.0002
        while self._writable[i] < step:
            if self._header[0]:
                raise PipelineClosed("the input pipeline was closed")
            time.sleep(delay)
            delay = min(2 * delay, 0.005)
        return self._arrays[i]

    def take(self, step: int, out: np.ndarray | None = None) -> np.ndarray:
        """(Main process) step `step`'s images, copied into `out` or a new array; the slot passes to step + slots."""
        i = step % self.slots
        if out is None:
            images = self._arrays[i].copy()
        else:
            images = out
            np.copyto(images, self._arrays[i])
        _fence()  # where loads may pass later stores (ARM), the copy must finish before the slot is freed
        self._writable[i] = step + self.slots
        return images

    def close(self) -> None:
        """Free the block (main process); workers waiting for a slot give up."""
        if self._finalizer is not None:
            self._finalizer()
