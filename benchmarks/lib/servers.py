"""The two servers the benchmarks compare, started and stopped the same way: tsctl's daemon
(`tsctl serve start/stop`) and TorchServe 0.12 (`torchserve --start/--stop`, through
benchmarks.lib.torchserve).

Each start gets its own run folder under the work dir (config.properties, logs, state, temp
files) and free ports; with `grpc=True` the gRPC APIs are on too (tsctl picks free ports and
writes them in its pid file; TorchServe gets two more free ports). A server remembers every
process of its tree while it runs (`track`), so `stop()` can wait for all of them and kill
what lingers. Torch threads: tsctl gives each worker cores / total workers threads;
TorchServe, which has no such setting, gets the number as OMP_NUM_THREADS/MKL_NUM_THREADS in
its environment (its workers inherit it), unless made with `match_threads=False`: then its
workers keep torch's default, one thread per core each (what TorchServe does out of the box).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.lib.procs import (
    cmdline,
    cpu_count,
    environ_value,
    free_ports,
    kill_tracked,
    process_tree,
    start_ticks,
    stat_fields,
    wait_gone,
)
from benchmarks.lib.rest import Reply, call, ready_workers
from benchmarks.lib.script import log
from benchmarks.lib.torchserve import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TorchServeLauncher,
    write_properties,
)

SERVERS = ("tsctl", "TorchServe")


def threads_for(workers: int) -> int:
    """What tsctl gives each worker (used for TorchServe when tsctl's own is unknown)."""
    return max(1, cpu_count() // max(1, workers))


def server_order(servers: list[str], index: int) -> list[str]:
    """The servers in turn: alternate who goes first, so slow drift hits both alike."""
    return servers if index % 2 == 0 else servers[::-1]


class Server:
    """What both servers share: a run folder per start, process tracking, clean stop."""

    name = ""

    def __init__(self, work: Path, store: Path, grpc: bool = False) -> None:
        self.work = work
        self.store = store
        self.grpc = grpc
        self.runs = 0
        self.run_dir = work
        self.inference_port = 0
        self.management_port = 0
        self.metrics_port = 0
        self.grpc_address = ""  # host:port of the gRPC inference API, with grpc=True
        self.oip_address = ""  # host:port of tsctl's OIP gRPC service, with grpc=True
        self.root_pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.tracked: dict[int, int | None] = {}

    def launch(self, models: str, workers: int, threads: int) -> None:
        """Start the server with `models` (a --models value); return without waiting."""
        raise NotImplementedError

    def finish_start(self, model: str, workers: int) -> None:
        """Wait until the launch is done and `model` has `workers` READY workers."""
        raise NotImplementedError

    def worker_threads(self) -> list[int]:
        """Each live worker's torch threads."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def post(self, path: str, body: bytes, ctype: str, timeout: float) -> Reply:
        """POST `body` as `ctype` to `path` on the inference API."""
        address = f"http://127.0.0.1:{self.inference_port}"
        return call(address, "POST", path, body, {"Content-Type": ctype}, timeout)

    def _new_run(self) -> Path:
        self.runs += 1
        slug = self.name.lower()
        self.run_dir = self.work / f"{slug}-run{self.runs}"
        self.run_dir.mkdir(parents=True)
        self.root_pid = None
        self.tracked = {}
        return self.run_dir

    def _addresses(self, more_ports: int = 0) -> tuple[dict[str, object], list[int]]:
        """The config.properties lines that name the REST APIs, on new free ports, and
        `more_ports` other free ports."""
        ports = free_ports(3 + more_ports)
        self.inference_port, self.management_port, self.metrics_port, *more = ports
        properties: dict[str, object] = {
            "inference_address": f"http://127.0.0.1:{self.inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
        }
        return properties, more

    def _start_output(self) -> str:
        return (self.run_dir / "start.out").read_text(errors="replace").strip()[-2000:]

    def track(self) -> list[int]:
        """Remember the current process tree (so stop() can kill what lingers)."""
        if self.root_pid is None:
            return []
        pids = process_tree(self.root_pid)
        for pid in pids:
            self.tracked.setdefault(pid, start_ticks(pid))
        return pids

    def workers(self) -> list[int]:
        return [p for p in self.track() if p != self.root_pid]

    def _wait_ready(self, model: str, workers: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        management = f"http://127.0.0.1:{self.management_port}"
        while ready_workers(management, model) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {workers} workers not ready in time")
            if self.root_pid is not None and stat_fields(self.root_pid) is None:
                raise RuntimeError(f"{self.name}: the server exited during start-up")
            time.sleep(0.1)
        self.track()

    def _finish_stop(self) -> None:
        if not wait_gone(self.tracked, 30):
            killed = kill_tracked(self.tracked)
            log(f"  {self.name}: killed lingering processes {killed}")
            wait_gone(self.tracked, 10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self.root_pid = None


class TsctlServer(Server):
    name = "tsctl"

    def __init__(
        self,
        work: Path,
        store: Path,
        tsctl: Path,
        env: dict[str, str] | None = None,
        grpc: bool = False,
    ) -> None:
        super().__init__(work, store, grpc)
        self.tsctl = tsctl
        self.env = env or {}

    def launch(self, models: str, workers: int, threads: int) -> None:
        run = self._new_run()
        properties, _ = self._addresses()
        properties["enable_grpc"] = "true" if self.grpc else "false"
        if self.grpc:
            for api in ("inference", "management", "oip"):  # free ports, named in the pid file
                properties[f"grpc_{api}_address"] = "127.0.0.1"
                properties[f"grpc_{api}_port"] = 0
        properties["default_workers_per_model"] = workers
        config = write_properties(run / "config.properties", properties)
        command = [
            str(self.tsctl), "serve", "start", "--ncs", "--disable-token-auth",
            "--model-store", str(self.store), "--models", models,
            "--ts-config", str(config),
            "--state-dir", str(run / "state"), "--log-dir", str(run / "logs"),
        ]  # fmt: skip
        env = {**os.environ, **self.env, "TMPDIR": str(run)}
        with (run / "start.out").open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def _pid_info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.run_dir / "state" / ".tsctl.pid").read_text())
        return info

    def finish_start(self, model: str, workers: int) -> None:
        assert self.proc is not None
        try:
            code = self.proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("tsctl serve start did not return in time") from None
        if code != 0:
            raise RuntimeError(f"tsctl serve start failed ({code}): {self._start_output()}")
        self.root_pid = int(self._pid_info()["pid"])
        self.track()
        self._wait_ready(model, workers)
        if self.grpc:
            self.grpc_address = str(self._pid_info().get("grpc_inference_address") or "")
            if not self.grpc_address:
                raise RuntimeError("tsctl: no grpc_inference_address in the pid file")
            self.oip_address = str(self._pid_info().get("grpc_oip_address") or "")

    def worker_threads(self) -> list[int]:
        """Each live worker's torch threads, from its `worker ready (pid P, N threads)` line
        (the daemon writes the model log in batches: wait a little for the lines)."""
        deadline = time.monotonic() + 5
        while True:
            log_text = (self.run_dir / "logs" / "model_log.log").read_text(errors="replace")
            ready = dict(re.findall(r"worker ready \(pid (\d+), (\d+) threads\)", log_text))
            pids = self.workers()
            if all(str(pid) in ready for pid in pids) or time.monotonic() > deadline:
                return [int(ready[str(pid)]) for pid in pids if str(pid) in ready]
            time.sleep(0.05)

    def stop(self) -> None:
        if self.root_pid is None and self.proc is None:
            return
        self.track()
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(self.tsctl), "serve", "stop", "--state-dir", str(self.run_dir / "state")],
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
            )
        self._finish_stop()


class TorchServeServer(Server):
    name = "TorchServe"

    def __init__(
        self, work: Path, store: Path, venv: Path, grpc: bool = False, match_threads: bool = True
    ) -> None:
        super().__init__(work, store, grpc)
        self.venv = venv
        self.match_threads = match_threads
        self.launcher: TorchServeLauncher | None = None

    def launch(self, models: str, workers: int, threads: int) -> None:
        run = self._new_run()
        properties, ports = self._addresses(2 if self.grpc else 0)
        if self.grpc:
            grpc_inference, grpc_management = ports
            self.grpc_address = f"127.0.0.1:{grpc_inference}"
            properties["grpc_inference_address"] = "127.0.0.1"
            properties["grpc_inference_port"] = grpc_inference
            properties["grpc_management_address"] = "127.0.0.1"
            properties["grpc_management_port"] = grpc_management
        properties["default_workers_per_model"] = workers
        properties["install_py_dep_per_model"] = "false"
        config = write_properties(run / "config.properties", properties)
        # tsctl's per-worker torch threads; TorchServe's workers inherit this environment
        variables = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if not self.match_threads:
            variables = {}  # torch's default in each worker: one thread per core
        self.launcher = TorchServeLauncher(self.venv, run, variables)
        self.proc = self.launcher.launch(self.store, config, models)

    def finish_start(self, model: str, workers: int) -> None:
        assert self.proc is not None and self.launcher is not None
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("torchserve --start did not return in time") from None
        if code != 0:
            raise RuntimeError(f"torchserve --start failed ({code}): {self._start_output()}")
        self.root_pid = self.launcher.frontend_pid()
        self.track()
        self._wait_ready(model, workers)

    def worker_threads(self) -> list[int]:
        found = []
        for pid in self.workers():
            if "model_service_worker" in cmdline(pid):
                value = environ_value(pid, "OMP_NUM_THREADS")
                if value is None and not self.match_threads:
                    value = str(cpu_count())  # torch's default
                found.append(int(value) if value and value.isdigit() else 0)
        return found

    def stop(self) -> None:
        if self.root_pid is None and self.proc is None:
            return
        self.track()
        if self.launcher is not None:
            self.launcher.stop()
        self._finish_stop()


@contextlib.contextmanager
def running(
    server: Server, models: str, model: str, workers: int, threads: int
) -> Iterator[Server]:
    """`server` started with `models` and ready (`workers` READY workers of `model`); stopped
    when the block ends."""
    log(f"  starting {server.name} ({models}, {workers} worker(s), {threads} thread(s) each)")
    try:
        server.launch(models, workers, threads)
        server.finish_start(model, workers)
        yield server
    finally:
        server.stop()
