"""DataLoader workers that end on every exit path.

The contract, for every loader chx makes (training, extraction, evaluation, prediction):

- workers ignore SIGINT and SIGTERM (:func:`worker_init`): a signal sent to the whole process group
  (Ctrl-C, ``timeout``, a job scheduler) must not kill them under a main process that is still
  using them (training finishes its step and saves ``last.pt``); the main process decides;
- in exchange the main process ends them itself: :func:`batches` shuts its iterator down when the
  ``with`` block ends, normally or by any exception, and kills a worker that has not stopped within
  a second; and the CLI calls :func:`end_children` before it exits, which kills any child process
  still alive (a loader that was never closed, a worker stuck in a read).

Without the second half, an error raised in a worker reached the user as the right one-line error
and the process then hung forever: at interpreter exit ``multiprocessing`` sends SIGTERM to its
daemonic children and joins them, and the workers ignored the SIGTERM. If the main process is
killed outright (SIGKILL), the workers' own watchdog ends them within seconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Iterator

GRACE_S = 1.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every chx DataLoader: stop signals are the main process's to handle.
    A worker is born with them blocked (:func:`start`); ignoring them discards any that arrived
    in between, then they are unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Hold SIGINT/SIGTERM back in this thread while workers are forked: a worker forked inside
    inherits the block, so a signal to the process group between its birth and worker_init (torch
    installs its own SIGTERM handler there first) cannot kill it. Here, the signals are delivered
    when the block ends."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except (AttributeError, ValueError, OSError):   # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start(loader):
    """``iter(loader)``, its workers forked with stop signals blocked (see :func:`worker_init`)."""
    with _stop_signals_blocked():
        return iter(loader)


def close(iterator) -> None:
    """End a DataLoader iterator's workers now (no-op for a single-process iterator or None)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:   # a worker killed by a signal can make the orderly shutdown fail
            pass
    for w in getattr(iterator, "_workers", []) or []:
        _end(w)


@contextlib.contextmanager
def batches(loader) -> Iterator:
    """``with batches(loader) as it: for batch in it: ...``: the workers end with the block."""
    it = start(loader)
    try:
        yield it
    finally:
        close(it)


def end_children() -> None:
    """Kill every child process of this process that is still alive (the CLI's last step: a child
    left at that point has no work left to finish)."""
    for child in multiprocessing.active_children():
        _end(child, grace=0.0)


def _end(process, grace: float = GRACE_S) -> None:
    try:
        if grace and process.is_alive():
            process.join(grace)
        if process.is_alive():
            process.kill()
            process.join(GRACE_S)
    except (AssertionError, ValueError, OSError):   # not our child, or already closed
        pass
