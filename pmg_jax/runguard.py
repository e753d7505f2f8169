"""One training per workdir, and Ctrl-C / SIGTERM that never leave a run half-written (standard library only, so
that a command can install it before importing anything slow).

RunLock: an exclusive `flock` on <workdir>/train.lock, held while a training runs there. A second training on
the same workdir is refused in one line naming the holder (pid and host); the kernel drops the lock when its
process dies, kill -9 included, so a stale lock never blocks a resume.

Interrupts: the signals are handled by a watcher thread woken through `signal.set_wakeup_fd`, so they are
acknowledged at once even while the main thread waits inside XLA. Before training starts, the first signal
exits at once (status 128 + signal) and removes the workdir if this process created it. Once training runs,
the first asks the loop to stop after the iteration (which writes a checkpoint); a second exits at once. Orbax
writes each checkpoint into a temporary directory and renames it when complete, so a checkpoint cut short is
never listed and is cleaned up by the next run; every file this package rewrites is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator

from pmg_jax.errors import PMGError

LOCK_NAME = "train.lock"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunLocked(PMGError, RuntimeError):
    """Another training holds the workdir."""


class RunLock:
    """An exclusive flock on <workdir>/train.lock for as long as this object lives (or until release)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's name stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not named itself yet"
            os.close(fd)
            raise RunLocked(
                f"{workdir} is in use by another training ({holder}); wait for it to end or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would let two processes lock different files)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (what makedirs would create), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _say(line: str) -> None:
    """One line on stderr, written directly (the main thread may hold sys.stderr's buffer)."""
    os.write(2, (line + "\n").encode())


def _noted(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the watcher thread has already acted on the signal."""


class Interrupts:
    """SIGINT and SIGTERM during a training (see the module docstring). `signal` is the first one received
    once training started; the loop stops after its iteration when it is set."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._training = False
        self._created: str | None = None
        self._lock = threading.Lock()
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int] | None = None
        self._previous_fd = -1
        self._depth = 0  # nested `with`: installed by the outermost

    def __enter__(self) -> Interrupts:
        self._depth += 1
        if self._depth > 1 or threading.current_thread() is not threading.main_thread():
            return self  # installed already, or not the main thread (signals are the main thread's)
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._previous = {sig: signal.signal(sig, _noted) for sig in SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = (read, write)
        threading.Thread(target=self._watch, args=(read,), name="pmg-interrupts", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth or self._wakeup is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._wakeup[1])  # the watcher reads end-of-file and ends
        self._wakeup = None

    @contextlib.contextmanager
    def creating(self, workdir: str) -> Iterator[None]:
        """Around creating the workdir: a signal waits for it, and removes what it made until training starts."""
        with self._lock:
            made = _first_missing(workdir)
            yield
            self._created = made if not self._training else None

    def training(self) -> None:
        """Training has started: from now on a signal stops after the iteration."""
        with self._lock:
            self._training, self._created = True, None

    def _watch(self, read: int) -> None:
        while data := os.read(read, 64):
            for signum in data:
                if signum in SIGNALS:
                    self._on_signal(signum)
        os.close(read)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            if not self._training:
                if self._created:
                    shutil.rmtree(self._created, ignore_errors=True)
                _say(
                    f"{name}: stopped before training started; "
                    + ("removed " + self._created if self._created else "nothing was written")
                )
                os._exit(128 + signum)
            if self.signal is None:
                self.signal = signum
                _say(f"{name}: stopping after this iteration, which writes a checkpoint; Ctrl-C again to stop now")
                return
            _say(f"{name}: stopped now; the checkpoints already written are intact (one cut short is ignored)")
            os._exit(128 + signum)
