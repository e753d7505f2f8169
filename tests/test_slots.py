"""Shared-memory slots between input workers and the main process: hand-over order, reuse and shutdown."""

import errno
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pmg_jax.data import pipeline, slots, synthetic

SPEC = pipeline.TransformSpec(resize_size=36, crop_size=32, pad=2, normalize_on_device=True)


def demo(size: int = 40) -> synthetic.DemoSource:
    return synthetic.DemoSource(synthetic.DemoSpec(num_classes=4, image_size=32), "train", size)


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))


def test_a_slot_is_written_again_only_after_its_last_step_was_taken():
    ring = slots.SlotRing(2, (3,), np.int64, first_step=5)
    for step in (5, 6):  # the first round is free
        ring.slot_for(step)[:] = step
    written = threading.Event()

    def writer():
        ring.slot_for(7)[:] = 7  # slot 1 of 2, still holding step 5
        written.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not written.wait(0.3)
    np.testing.assert_array_equal(ring.take(6), [6, 6, 6])  # the other slot: no effect on the writer
    assert not written.wait(0.3)
    np.testing.assert_array_equal(ring.take(5), [5, 5, 5])
    assert written.wait(10)
    thread.join()
    out = np.zeros(3, np.int64)
    assert ring.take(7, out) is out and out.tolist() == [7, 7, 7]
    ring.close()


def test_closing_wakes_a_waiting_writer_and_frees_the_memory():
    ring = slots.SlotRing(1, (4,), np.uint8)
    ring.slot_for(0)
    errors = []

    def writer():
        try:
            ring.slot_for(1)
        except slots.PipelineClosed as e:
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    assert shm_exists(ring.name)
    ring.close()
    thread.join(10)
    assert not thread.is_alive() and len(errors) == 1
    assert not shm_exists(ring.name)


def test_too_little_shared_memory_is_one_clear_error_at_the_start(monkeypatch):
    made = []

    def full(fd, offset, length):
        made.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(slots.os, "posix_fallocate", full)
    message = r"^/dev/shm cannot hold .* 3 batch buffers, No space left on device \(3 MiB\)"
    with pytest.raises(slots.SharedMemoryTooSmall, match=message) as e:
        slots.SlotRing(3, (1024, 1024), np.uint8)
    assert "--shm-size" in str(e.value) and "data.workers" in str(e.value)
    assert made and not os.path.exists(made[0].removesuffix(" (deleted)"))  # nothing left behind


def test_host_buffers_are_reused_only_when_nothing_holds_them():
    buffers = slots.HostBuffers((2,), np.uint8, keep=2)
    a = buffers.get()
    b = buffers.get()
    assert a is not b
    view = a[:1]
    del a
    c = buffers.get()  # `a` lives on through its view
    assert c is not view.base and c is not b
    del view, c
    assert buffers.get() is not b  # the first array is free again; `b` is not


def test_worker_batches_equal_in_process_ones_whether_kept_or_dropped():
    """Batches that the caller keeps are never written over; dropped ones are recycled, with the same result."""
    layout = pipeline.Layout(8)
    want = list(pipeline.train_batches(demo(), SPEC, layout, seed=4, num_epochs=3)[1])
    _, batches = pipeline.train_batches(demo(), SPEC, layout, seed=4, num_epochs=3, workers=1, prefetch=1)
    dropped = [{k: v.copy() for k, v in b.items()} for b in batches]  # each batch freed before the next
    assert len(dropped) == len(want) == 15  # 15 steps through 3 slots: every slot is reused
    for got, ref in zip(dropped, want):
        assert got.keys() == ref.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], ref[k])


def test_a_ring_with_positives_has_room_for_both_halves():
    layout = pipeline.Layout(8)
    one = slots.ring_bytes(5, (8, 32, 32, 3), np.uint8)
    assert pipeline.shared_memory_bytes(SPEC, layout, 2, 1) == one
    assert pipeline.shared_memory_bytes(SPEC, layout, 2, 1, pairs=True) == slots.ring_bytes(
        5, (2, 8, 32, 32, 3), np.uint8
    )
    assert pipeline.shared_memory_bytes(SPEC, layout, 0, 1, pairs=True) == 0


def test_eval_in_workers_masks_padding_and_closing_stops_them():
    src = demo(21)
    want = list(pipeline.eval_batches(src, SPEC, pipeline.Layout(2), with_box=True)[1])
    assert len(want) == 11 and want[-1]["mask"].tolist() == [1, 0]
    # 5 slots for 11 batches: after two are read, the workers fill the ring and wait
    assert pipeline.ring_slots(2, 1) == 5
    got = list(pipeline.eval_batches(src, SPEC, pipeline.Layout(2), with_box=True, workers=2, prefetch=1)[1])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
    _, batches = pipeline.eval_batches(src, SPEC, pipeline.Layout(2), with_box=True, workers=2, prefetch=1)
    next(batches), next(batches)
    name = batches._ring.name
    batches.close()  # nine batches unread: the workers wait for slots
    assert not shm_exists(name)
    assert not multiprocessing.active_children()


def test_training_checks_room_for_train_and_eval_buffers_before_any_work(tmp_path, monkeypatch):
    from conftest import tiny_demo_config

    from pmg_jax import loop
    from pmg_jax import state as state_lib

    config = tiny_demo_config(**{"data.workers": 2, "data.prefetch": 1})
    layout = pipeline.Layout(config.batch_size)
    spec = state_lib.transform_spec(config)
    need = pipeline.shared_memory_bytes(spec, layout, 2, 1) + pipeline.shared_memory_bytes(
        spec, pipeline.Layout(config.eval_batch_size), 2, loop.EVAL_PREFETCH
    )
    crop = spec.crop_size
    assert need == slots.ring_bytes(5, (config.batch_size, crop, crop, 3), np.uint8) + slots.ring_bytes(
        6, (config.eval_batch_size, crop, crop, 3), np.uint8
    )
    free = need - 1

    class Stat:
        f_bavail, f_frsize = free, 1

    monkeypatch.setattr(slots.os, "statvfs", lambda path: Stat)
    with pytest.raises(slots.SharedMemoryTooSmall, match=r"MiB free"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path) == []  # refused before any work


WORKER_SCRIPT = """
import multiprocessing, sys, threading, time
sys.path.insert(0, {root!r})
from pmg_jax.data import pipeline, synthetic

if __name__ == "__main__":
    src = synthetic.DemoSource(synthetic.DemoSpec(num_classes=4, image_size=32), "train", 40)
    spec = pipeline.TransformSpec(36, 32, 2, normalize_on_device=True)
    _, it = pipeline.train_batches(src, spec, pipeline.Layout(4), seed=0, num_epochs=50, workers=2, prefetch=1)
    threading.Thread(target=next, args=(it,), daemon=True).start()  # starts the workers
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.01)
    # the workers are still starting up: the hardest moment to be orphaned
    print(it._ring.name, *[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_the_main_process_ends_its_workers_and_frees_the_shared_memory(tmp_path):
    """kill -9 of the trainer must not leave input workers spinning or /dev/shm filled, even mid-start."""
    script = tmp_path / "hold.py"
    script.write_text(WORKER_SCRIPT.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        name, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert len(pids) >= 2 and all(alive(p) for p in pids) and shm_exists(name)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(alive(p) for p in pids) or shm_exists(name)):
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), "input workers outlived their main process"
    assert not shm_exists(name), "the ring's shared memory outlived every process using it"
