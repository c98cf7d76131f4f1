"""Multi-process model instances: one worker that is several processes started by torchrun.

A model whose `model-config.yaml` has `parallelType`, `parallelLevel` or a `torchrun` section
(TorchServe's keys) gets instances of `parallelLevel` ranks (torchrun's `nproc-per-node`).
Each instance is one `WorkerProcess` to the pool: its child is
`python -m torch.distributed.run ... -m tsctl.worker 0 --ranks PATH`, from the daemon's own
interpreter, whose stdin is the daemon's end of a socketpair. torchrun closes every other
inherited descriptor but leaves stdin to its ranks, so rank 0 reads its frames there; the other
ranks reach rank 0 through a Unix socket at PATH, in a folder only this user may enter, and
rank 0 passes each frame on to them (`tsctl.worker.ranks`). The daemon therefore talks to one
socket per instance, as for any worker: batches, chunks, results, the same bounds.

The instance lives and dies whole: torchrun runs with `--max-restarts 0`, so a rank that dies
makes it stop the others and exit, which the daemon sees (the exit of its child) and answers
by replacing the instance. When the daemon kills an instance it kills torchrun's process
group and each rank's (torchrun starts every rank in a session of its own), and every rank
has asked the kernel to kill it when torchrun dies, so no rank outlives its instance.

GPUs: an instance takes `parallelLevel` of them, consecutive ones of the model's `deviceIds`
(or of every GPU the server uses), block after block for its instances; torchrun's environment
has `CUDA_VISIBLE_DEVICES` set to them, so rank `LOCAL_RANK` uses `cuda:LOCAL_RANK`.

Runs on the daemon's event loop: `spawn` is a fork and exec (a few milliseconds, as for any
worker), `kill` reads a few files under /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tsctl.errors import ArchiveError, WorkerStartFailed
from tsctl.ipc.messages import WorkerSpec
from tsctl.server.settings import ModelSettings, TorchrunSettings
from tsctl.server.workers.process import AdoptedChild, Child, WorkerProcess
from tsctl.server.workers.spares import worker_env

#: the relay socket's name in an instance's private folder
RELAY = "ranks.sock"
#: the longest path a Unix socket may bind to (Linux's sun_path, less its NUL)
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Torchrun:
    """How a model's instances are launched: its parallel type, ranks and torchrun options."""

    parallel_type: str
    level: int
    options: TorchrunSettings
    #: each next instance's GPUs (empty: on the CPU)
    next_devices: Callable[[], tuple[int, ...]]

    def factory(self, spec: Callable[[], WorkerSpec]) -> Callable[[str], WorkerProcess]:
        """What the pool calls to make each instance (`spec`: the model's spec as it is then)."""

        def make(worker_id: str) -> WorkerProcess:
            devices = self.next_devices()
            assigned = replace(
                spec(),
                worker_id=worker_id,
                threads=self.options.omp_number_threads,
                gpu_id=devices[0] if devices else None,
                parallel_type=self.parallel_type,
                parallel_level=self.level,
            )
            return WorkerProcess(assigned, launcher=Instance(self, assigned, devices))

        return make

    def command(self, spec: WorkerSpec, relay: Path, log_dir: Path) -> list[str]:
        """torchrun's command line for one instance (TorchServe's options, `--max-restarts 0`:
        the daemon restarts an instance whole)."""
        options = self.options
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(self.level),
            "--rdzv-backend",
            options.rdzv_backend,
            "--rdzv-endpoint",
            options.rdzv_endpoint or "localhost:0",
            "--rdzv-id",
            f"{spec.model_name}_{spec.worker_id}",
            "--max-restarts",
            "0",
            "--log-dir",
            str(log_dir),
        ]
        if options.rdzv_conf:
            command += ["--rdzv-conf", options.rdzv_conf]
        if options.monitor_interval is not None:
            command += ["--monitor-interval", f"{options.monitor_interval:g}"]
        return [*command, "-m", "tsctl.worker", "0", "--ranks", str(relay)]

    def environment(self, devices: tuple[int, ...]) -> dict[str, str]:
        env = worker_env()
        env["OMP_NUM_THREADS"] = str(self.options.omp_number_threads)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        return env


class Instance:
    """One instance's launch: the `Launcher` its `WorkerProcess` starts it with."""

    def __init__(self, torchrun: Torchrun, spec: WorkerSpec, devices: tuple[int, ...]) -> None:
        self.torchrun = torchrun
        self.spec = spec
        self.devices = devices
        self.folder: Path | None = None

    def spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """Start torchrun with the daemon's socket as its stdin, in a private folder of its
        own (mode 0700: the relay socket and torchrun's logs; removed once it has ended)."""
        self.folder = folder = Path(tempfile.mkdtemp(prefix="tsctl-ranks-"))
        relay = folder / RELAY
        if len(os.fsencode(relay)) > MAX_SOCKET_PATH:  # rank 0 could not bind it
            shutil.rmtree(folder, ignore_errors=True)
            raise WorkerStartFailed(
                f"the ranks' socket {relay} is longer than a Unix socket's path may be "
                f"({MAX_SOCKET_PATH} bytes): set TMPDIR to a shorter folder"
            )
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            popen = subprocess.Popen(
                self.torchrun.command(self.spec, relay, folder / "logs"),
                stdin=child.fileno(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.torchrun.environment(self.devices),
                start_new_session=True,  # its own process group, killed whole
            )
        except BaseException:
            parent.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            child.close()
        return popen, parent

    async def adopt(self, popen: subprocess.Popen[bytes]) -> Child:
        assert self.folder is not None
        return RankTree(await AdoptedChild.adopt(popen), self.folder)


class RankTree:
    """torchrun and its ranks as one child: `kill` ends them all, `wait` returns once torchrun
    has exited (it stops its ranks first) and removes the instance's folder."""

    def __init__(self, torchrun: AdoptedChild, folder: Path) -> None:
        self.torchrun = torchrun
        self.folder = folder
        self.stdout = torchrun.stdout
        self.stderr = torchrun.stderr

    @property
    def pid(self) -> int:
        return self.torchrun.pid

    @property
    def returncode(self) -> int | None:
        return self.torchrun.returncode

    def kill(self) -> None:
        if self.returncode is not None:
            return
        ranks = children(self.pid)  # before torchrun goes: then they are orphans
        for group in (self.pid, *ranks):  # each rank leads a session (and group) of its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)

    async def wait(self) -> int:
        code = await self.torchrun.wait()
        # torchrun's logs may be many files: removed off the event loop
        await asyncio.to_thread(shutil.rmtree, self.folder, ignore_errors=True)
        return code


def children(pid: int) -> list[int]:
    """The processes `pid` started that still run (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def launcher(model: str, settings: ModelSettings, gpus: int) -> Torchrun | None:
    """How `model`'s instances start when it has several processes each, else None.
    `ArchiveError` naming the setting when they cannot be given what they ask for."""
    options = settings.torchrun
    level = settings.parallel_level
    if options is None and not level and settings.parallel_type is None:
        return None
    if options is not None and level and level != options.nproc_per_node:
        raise ArchiveError(
            f"model {model}: model-config.yaml: parallelLevel {level} and torchrun "
            f"nproc-per-node {options.nproc_per_node} differ (give one, or the same)"
        )
    if options is None:
        options = TorchrunSettings.model_validate({"nproc-per-node": level or 1})
    level = options.nproc_per_node
    return Torchrun(
        settings.parallel_type or "", level, options, _devices(model, settings, gpus, level)
    )


def _devices(
    model: str, settings: ModelSettings, gpus: int, level: int
) -> Callable[[], tuple[int, ...]]:
    """Each next instance's GPUs: none on the CPU (`deviceType: cpu`, or no GPU), else blocks
    of `level` consecutive entries of `deviceIds` (default: every GPU), in turn."""
    if gpus == 0 or (settings.device_type or "").lower() == "cpu":
        return lambda: ()
    ids = settings.device_ids or list(range(gpus))
    unknown = [i for i in ids if not 0 <= i < gpus]
    if unknown:
        raise ArchiveError(
            f"model {model}: model-config.yaml: deviceIds: GPU {unknown[0]} does not exist "
            f"(this server uses {gpus}: 0 to {gpus - 1})"
        )
    if len(ids) < level:
        raise ArchiveError(
            f"model {model}: each instance has {level} ranks, one GPU each, but "
            f"{'deviceIds names' if settings.device_ids else 'this server uses'} {len(ids)}"
        )
    blocks: Iterator[tuple[int, ...]] = itertools.cycle(
        [tuple(ids[i : i + level]) for i in range(0, len(ids) - level + 1, level)]
    )
    return lambda: next(blocks)
