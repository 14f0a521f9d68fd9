"""Run functions on several real processes joined by a gloo process group.

Importing torch and megatron-core costs seconds per process, so a :class:`RankPool` starts its
processes once and runs many functions in them. Each call sends a module-level function (pickled
by reference) and its arguments to every rank and returns the per-rank results in rank order.

* The first failing rank's traceback is raised in the caller as :class:`RankFailure`; the pool's
  processes are then stopped (the other ranks may be blocked in a collective) and restarted on
  the next call.
* A call that does not finish within its timeout raises :class:`RankTimeout` naming the ranks
  that never answered, instead of hanging.
* After every call the workers tear down megatron-core's model-parallel state, so calls do not
  leak topology into each other.

Workers run with one intra-op thread each (a small machine runs many ranks) and call
:func:`megatron_longvila.core.cpu_adaptations.adapt_megatron_for_cpu`, as every launcher does.

:func:`rank_runner` is the front end of the tools that run either under a launcher (this process
is one rank) or on a pool of their own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = float(os.environ.get("MLV_RANK_TIMEOUT", "300"))


class RankFailure(RuntimeError):
    """A function raised on one of the ranks; the message carries that rank's traceback."""


class RankTimeout(TimeoutError):
    """Some ranks did not finish a call in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    tasks: Any,
    results: Any,
    sys_path: list[str],
    env: dict[str, str],
) -> None:
    sys.path[:] = sys_path
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(1)
        from megatron_longvila.core import cpu_adaptations, platform

        cpu_adaptations.adapt_megatron_for_cpu()
        platform.init_distributed(backend="gloo", timeout_s=DEFAULT_TIMEOUT_S)
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    results.put((rank, "ready", None))

    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        groups_before = _process_groups()
        try:
            value = fn(*args, **kwargs)
            status = "ok"
        except BaseException:
            value = traceback.format_exc()
            status = "error"
        finally:
            _reset_megatron_state()
        if status == "ok":
            # After a failure the pool is closed anyway, and peers may be stuck in a collective.
            _destroy_groups_except(groups_before)
        results.put((rank, status, value))

    _exit_now()


def _exit_now() -> None:
    """Leave the worker at once, stopping the helper processes it started first.

    Tearing down the process groups one by one (megatron-core creates dozens per
    ``initialize_model_parallel`` and never destroys them) and the interpreter's own teardown take
    longer than close() waits, and a killed worker orphans its helpers (megatron's checkpoint
    writer keeps a multiprocessing Manager process). The OS closes the groups' sockets; nothing
    is left to flush but stdout/stderr.
    """
    for child in mp.active_children():
        child.terminate()
        child.join(timeout=5)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _process_groups() -> set:
    """The process groups this rank belongs to (torch keeps no public list of them)."""
    from torch.distributed import distributed_c10d

    return set(distributed_c10d._world.pg_map)


def _destroy_groups_except(keep: set) -> None:
    """Destroy the groups a call created (megatron-core never destroys its own).

    Each megatron-core ``initialize_model_parallel`` on 8 gloo ranks adds about 60 threads and
    120 sockets to every rank; kept, they pile up over a session. The barrier makes sure no rank
    is still using a group when its peers shut it down.
    """
    import torch.distributed as dist

    created = _process_groups() - keep
    if not created:
        return
    dist.barrier()
    for group in created:
        dist.destroy_process_group(group)


def _reset_megatron_state() -> None:
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import random as mcore_random

        parallel_state.destroy_model_parallel()
        parallel_state._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None  # destroy leaves it set
        mcore_random._CUDA_RNG_STATE_TRACKER = None
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    except Exception:
        pass


class RankPool:
    """``world_size`` worker processes in one gloo group, reused across calls."""

    def __init__(
        self,
        world_size: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None

    # ---- lifecycle ------------------------------------------------------------------------
    def _start(self, attempts: int = 3) -> None:
        """Start the workers; retry on a fresh port if another process took the chosen one."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except RankFailure as exc:
                if "EADDRINUSE" not in str(exc) and "address already in use" not in str(exc):
                    raise
                if attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self.world_size,
                    port,
                    self._tasks[rank],
                    self._results,
                    list(sys.path),
                    self.env,
                ),
                # Not daemonic: megatron's checkpoint writer starts helper processes of its own.
                daemon=False,
                name=f"rank{rank}",
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        atexit.register(self.close)
        self._collect("ready", timeout_s=self.timeout_s)

    def close(self) -> None:
        """Stop the workers (politely if idle, by force otherwise)."""
        for task_queue in self._tasks:
            with contextlib.suppress(Exception):
                task_queue.put(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._tasks, self._results = [], [], None
        atexit.unregister(self.close)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----------------------------------------------------------------------------
    def run(
        self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        return self._collect("ok", timeout_s=timeout_s or self.timeout_s, what=fn.__qualname__)

    def _collect(self, expected: str, timeout_s: float, what: str = "start-up") -> list[Any]:
        deadline = time.monotonic() + timeout_s
        values: dict[int, Any] = {}
        while len(values) < self.world_size:
            remaining = deadline - time.monotonic()
            try:
                rank, status, value = self._results.get(timeout=min(1.0, max(remaining, 0.01)))
            except queue.Empty:
                dead = {
                    r: p.exitcode
                    for r, p in enumerate(self._procs)
                    if not p.is_alive() and r not in values
                }
                if not dead and remaining > 0:
                    continue
                missing = sorted(set(range(self.world_size)) - set(values))
                self.close()
                if dead:
                    raise RankFailure(
                        f"{what}: rank(s) {sorted(dead)} exited without answering "
                        f"(exit codes {dead})"
                    ) from None
                raise RankTimeout(
                    f"{what}: rank(s) {missing} of {self.world_size} did not finish within "
                    f"{timeout_s:.0f}s"
                ) from None
            if status == "error":
                self.close()
                raise RankFailure(f"{what} failed on rank {rank} of {self.world_size}:\n{value}")
            values[rank] = value
        return [values[r] for r in range(self.world_size)]


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float | None = None, **kwargs
) -> list[Any]:
    """One-off convenience: start a pool, run ``fn`` once, stop the pool."""
    with RankPool(world_size) as pool:
        return pool.run(fn, *args, timeout_s=timeout_s, **kwargs)


Runner = Callable[..., list[Any]]


@contextlib.contextmanager
def rank_runner(world_size: int) -> Iterator[tuple[Runner, bool]]:
    """``(run, reporter)``: ``run(fn, *args)`` runs ``fn`` on every rank and returns what this
    process sees, and ``reporter`` says whether this process writes the results.

    Under a launcher (``WORLD_SIZE`` set) this process is one rank of the launched world:
    ``run`` returns ``[fn(*args)]`` and rank 0 reports. Otherwise a :class:`RankPool` of
    ``world_size`` gloo ranks runs ``fn`` and returns every rank's result.
    """
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        from megatron_longvila.core import cpu_adaptations, platform

        cpu_adaptations.adapt_megatron_for_cpu()
        platform.init_distributed()
        try:
            yield (lambda fn, *args, **kwargs: [fn(*args, **kwargs)]), dist.get_rank() == 0
        finally:
            dist.destroy_process_group()
        return
    with RankPool(world_size) as pool:
        yield pool.run, True
