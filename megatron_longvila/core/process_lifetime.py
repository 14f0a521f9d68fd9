"""Helper processes end with the process that started them.

A rank killed by SIGKILL (or a builder's main process) runs no cleanup, so its helpers must
notice on their own. :func:`exit_with_parent` runs first thing in a child: on Linux the kernel
delivers SIGKILL to it when its parent exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon
thread polls the parent id. Use it as the ``initializer`` of process pools and managers.

:func:`checkpoint_writer_exits_with_parent` applies it to megatron-core's checkpoint writer,
whose results queue lives in a ``multiprocessing`` Manager process that otherwise outlives a
killed rank (and keeps the resource tracker alive with it).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5
_managers: list[SyncManager] = []  # kept alive for the life of this process


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Make this (child) process exit when ``parent_pid`` (default: its parent now) exits.

    Pass the parent's pid from the parent when the child might start after the parent is gone:
    the child then exits at once instead of living on under a new parent.
    """
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os._exit(1)


def checkpoint_writer_exits_with_parent() -> None:
    """Give megatron-core's checkpoint writer (``filesystem_async``) a results queue whose
    Manager process exits with this one. Call before the first ``dist_checkpointing.save``;
    later calls do nothing."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # as megatron makes it
    manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
    _managers.append(manager)
    filesystem_async._results_queue = manager.Queue()
