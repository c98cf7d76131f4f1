"""Measuring on a shared machine: how much CPU *other* processes used while a block ran, waiting
for them to go quiet first, and running a disturbed measurement again.

"Others" are everything but this script, its reaped children (wrk, h2load, a plain loop) and
the server's process tree: /proc/stat busy time minus those, in cores.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import TypeVar

from benchmarks.lib.load import Load
from benchmarks.lib.procs import busy_seconds, tree_cpu_seconds
from benchmarks.lib.script import log

#: a run during which other processes used more CPU than this (in cores) is tried again
DISTURBED_CORES = 0.25

L = TypeVar("L", bound=Load)


class CpuMeter:
    """How much CPU others used while the block ran: machine busy time minus ours."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.other_cores = 0.0

    def _ours(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, a loop, once reaped
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return cpu + tree_cpu_seconds(self.root)

    def __enter__(self) -> CpuMeter:
        self._start = (time.perf_counter(), busy_seconds(), self._ours())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start[0]
        others = (busy_seconds() - self._start[1]) - (self._ours() - self._start[2])
        self.other_cores = max(0.0, others / wall) if wall > 0 else 0.0


class QuietGate:
    """Waits, within a total budget, for other processes on the machine to go quiet."""

    def __init__(self, budget_s: float, per_wait_s: float = 45.0) -> None:
        self.budget_s = budget_s
        self.per_wait_s = per_wait_s
        self.waited_s = 0.0

    def wait(self, root: int | None) -> float:
        """Block until others used < DISTURBED_CORES / 2 over one second; return that load."""
        limit = min(self.per_wait_s, self.budget_s - self.waited_s)
        started = time.monotonic()
        while True:
            with CpuMeter(root) as meter:
                time.sleep(1.0)
            spent = time.monotonic() - started
            if meter.other_cores < DISTURBED_CORES / 2 or spent >= limit:
                self.waited_s += max(0.0, spent - 1.0)
                if spent > 1.5:
                    log(f"    waited {spent:.0f} s for the machine to go quiet")
                return meter.other_cores

    def measured(self, run: Callable[[], L], root: int | None, retries: int, what: str) -> L:
        """`run()` under a CpuMeter; again (up to `retries` times) while others disturbed it.

        Before each attempt it waits (bounded by the budget) for the machine to go quiet.
        Keeps the least disturbed attempt.
        """
        best: L | None = None
        for attempt in range(1, retries + 2):
            self.wait(root)
            with CpuMeter(root) as meter:
                load = run()
            load.other_cores = meter.other_cores
            load.attempts = attempt
            if best is None or load.other_cores < best.other_cores:
                best = load
            if load.other_cores <= DISTURBED_CORES or load.error:
                break
            log(f"    {what}: other processes used {load.other_cores:.2f} cores; running it again")
        assert best is not None
        return best
