"""Run a test's worker function in N fresh processes (torch.distributed over gloo on 127.0.0.1),
and fail by name, never hang, when one of them gets stuck.

Workers are *spawned*, not forked. By the time a distributed test runs, the pytest process holds a
dozen threads (torch's OpenMP pool, the local Hub server, tqdm monitors,
fsspec's event loop, jemalloc's background thread); a forked child inherits their locks but not the
threads, and a CI run hung for 90 minutes inside the forked 2-process checkpoint test. A spawned
child starts from a clean interpreter and re-imports the test module (a few seconds each).
"""

from __future__ import annotations

import faulthandler
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT`` / ``tcp://``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn, deadline_s: float, args: tuple) -> None:
    # a worker still running after deadline_s prints every thread's Python stack to stderr (pytest
    # shows it under the failing test) and exits with status 1, which fails run_workers by rank
    faulthandler.dump_traceback_later(deadline_s, exit=True)
    fn(rank, *args)
    faulthandler.cancel_dump_traceback_later()


def run_workers(fn, nprocs: int, *args, deadline_s: float = 180.0) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; returns when all exited with status 0.

    ``fn`` must be a module-level function of an importable module (a test module is: pytest puts
    ``tests/`` on ``sys.path``, and spawned children inherit it). A worker that raises or exits
    non-zero fails this call with its rank and traceback (the others are terminated); one that is
    stuck after ``deadline_s`` dumps its stacks and exits; and should a worker not even answer that,
    all are killed ``deadline_s + 60`` s after the start and ``TimeoutError`` names them."""
    context = mp.start_processes(_entry, args=(fn, deadline_s, args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    give_up = time.monotonic() + deadline_s + 60
    while not context.join(timeout=1.0):
        if time.monotonic() > give_up:
            stuck = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"worker(s) {stuck} of {nprocs} still running {deadline_s + 60:.0f} s after the "
                               f"start (each had {deadline_s:.0f} s); killed")


def stuck_worker(rank: int, stuck_rank: int) -> None:
    """For the helper's own test: rank ``stuck_rank`` waits forever, the others return at once."""
    while rank == stuck_rank:
        time.sleep(0.1)
