"""Workers started before the daemon knows what they will load, so start-up overlaps.

A worker spends most of its start importing torch (over a second); the daemon spends a few
tenths of a second importing tornado, grpc and pydantic before it has read any archive. The
daemon's first act (`tsctl.local.launch`) is therefore to start the workers its start-up
models will likely need, each importing torch in the background while waiting for its
`Assign` frame; the worker pool then takes one of these instead of starting a process. Spares
that no start-up model took are stopped once start-up is over, so they cost no memory after it.

Runs in the daemon's main thread, before its event loop exists: stdlib imports only, nothing
here may import tornado, grpc, pydantic or torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Spare:
    """A started worker process waiting for its `Assign` frame on `sock`."""

    popen: subprocess.Popen[bytes]
    sock: socket.socket


@dataclass
class Spares:
    """The spares not taken yet; `take` hands one out, `discard` stops the rest."""

    waiting: list[Spare] = field(default_factory=list)

    def take(self) -> Spare | None:
        while self.waiting:
            spare = self.waiting.pop(0)
            if spare.popen.poll() is None:
                return spare
            spare.sock.close()  # it died waiting (its output is lost with it)
        return None

    def discard(self) -> None:
        for spare in self.waiting:
            spare.sock.close()
            with contextlib.suppress(ProcessLookupError):
                spare.popen.kill()
            spare.popen.wait()
            for pipe in (spare.popen.stdout, spare.popen.stderr):
                if pipe is not None:
                    pipe.close()
        self.waiting.clear()


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: How long an idle torch thread spins before it sleeps, in libgomp's spin iterations (torch's
#: CPU wheels use GNU OpenMP). libgomp's own default, 300,000 (about 7 ms here), spins through
#: every serial stretch of a batch and every pause between batches, on a core the daemon
#: needs; 10,000 (about 0.2 ms) still covers the gaps between a forward's parallel regions.
#: Measured in docs/benchmarks.md, "torch's idle threads". Set in the environment before
#: the worker starts: libgomp reads it once, when torch loads it.
GOMP_SPINCOUNT = "10000"


def worker_env() -> dict[str, str]:
    """The environment every worker starts with (its thread counts are set once assigned):
    the daemon's, and a short OpenMP spin unless the operator chose a wait policy or spin."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    return env


def spawn(preload: bool) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start `python -m tsctl.worker FD`; returns the process and the daemon's socket end.
    With `preload`, the worker imports torch while it waits for its assignment."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, "-m", "tsctl.worker", str(child.fileno())]
    if preload:
        command.append("--preload")
    try:
        popen = subprocess.Popen(
            command,
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(),
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return popen, parent


def expected(config: dict[str, Any], cores: int) -> int:
    """How many workers start-up will likely start: a guess from the raw config, made before
    anything is parsed. Only `--models` and the config's `models` count; a snapshot restore
    starts its workers when they are needed."""
    if not (config.get("load_models") or config.get("models")):
        return 0
    per_model = config.get("default_workers_per_model")
    wanted = per_model if isinstance(per_model, int) and per_model > 0 else cores
    return min(wanted, cores, 4)


def prestart(count: int) -> Spares:
    spares = Spares()
    for _ in range(count):
        try:
            popen, sock = spawn(preload=True)
        except OSError:
            break  # the pool starts workers itself and reports the error there
        spares.waiting.append(Spare(popen, sock))
    return spares
